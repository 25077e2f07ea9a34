"""ZeRO: sharded optimizer states, gradients and parameters."""
