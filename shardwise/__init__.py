"""shardwise: ZeRO, heterogeneous memory and every kind of parallelism in one design."""

from shardwise.config import Config
from shardwise.distributed.dims import ParallelDims
from shardwise.engine import Engine, initialize

__version__ = "0.1.0"

__all__ = ["Config", "Engine", "ParallelDims", "initialize", "__version__"]
