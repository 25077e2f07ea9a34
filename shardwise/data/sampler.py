"""Fixed-length training sequences and the data-parallel order in which they are drawn.

[Note: layout-independent data order]
The order of sequences depends only on (seed, global batch, number of sequences), never on
the data-parallel degree: epoch e is the permutation drawn from a generator seeded with
``seed + e``, optimizer step s of the epoch takes the permuted indices [s*G, (s+1)*G), and
rank r of dp takes the contiguous slice [r*G/dp, (r+1)*G/dp) of those. The union of all
ranks' batches, in rank order, is therefore the batch a single process would see, which is
what parity tests against the single-process reference rely on, and a run may resume with a
different dp degree and still see the same sequences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from shardwise.errors import CheckpointError, ConfigError, DataError


class TokenDataset:
    """Non-overlapping windows of `seq_len` + 1 tokens: sample i starts at token i * seq_len.

    The extra token makes the target: ``target[t] = input[t + 1]``. Windows share their
    boundary token, so every token they cover, except the first, is a target exactly once.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, seq_len: int) -> None:
        self.tokens = torch.as_tensor(tokens)
        self.seq_len = seq_len
        self._offsets = torch.arange(seq_len + 1)

    def __len__(self) -> int:
        return max(self.tokens.numel() - 1, 0) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input, target) of sample `index`, each int64 of shape [seq_len]."""
        inputs, targets = self.gather(torch.tensor([index]))
        return inputs[0], targets[0]

    def gather(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets) of the samples `indices`, each int64 of shape [len(indices), T]."""
        starts = indices.to(torch.int64) * self.seq_len
        windows = self.tokens[starts[:, None] + self._offsets].to(torch.int64)
        return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


class DistributedBatchSampler:
    """This rank's sample indices for each optimizer step; deterministic and resumable.

    See [Note: layout-independent data order]. The remainder of an epoch that does not fill
    a global batch is dropped.
    """

    def __init__(
        self, num_samples: int, global_batch: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        if global_batch < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ConfigError(
                f"data sampler needs global_batch >= 1 and 0 <= dp_rank < dp_size; got "
                f"global_batch={global_batch}, dp_rank={dp_rank}, dp_size={dp_size}"
            )
        if global_batch % dp_size:
            raise ConfigError(
                f"train.global_batch={global_batch} is not divisible by the data-parallel "
                f"degree {dp_size}; use a multiple of {dp_size}"
            )
        self.num_samples = num_samples
        self.global_batch = global_batch
        self.local_batch = global_batch // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.epoch = 0
        self.step_in_epoch = 0
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.int64)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (full global batches) in one pass over the samples."""
        return self.num_samples // self.global_batch

    def next_indices(self) -> torch.Tensor:
        """Indices (int64, [global_batch / dp_size]) of this rank's next batch; advances."""
        if self.steps_per_epoch == 0:
            raise DataError(
                f"{self.num_samples} samples do not fill one global batch of {self.global_batch}"
            )
        start = self.step_in_epoch * self.global_batch + self.dp_rank * self.local_batch
        indices = self._permutation()[start : start + self.local_batch]
        self.step_in_epoch += 1
        if self.step_in_epoch == self.steps_per_epoch:
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        """Position of the next batch, plus what must match for it to mean the same batch."""
        return {
            "epoch": self.epoch,
            "step_in_epoch": self.step_in_epoch,
            "seed": self.seed,
            "num_samples": self.num_samples,
            "global_batch": self.global_batch,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the dp degree may differ from the one that saved it."""
        for key in ("seed", "num_samples", "global_batch"):
            if state[key] != getattr(self, key):
                raise CheckpointError(
                    f"data order was saved with {key}={state[key]} but this run has "
                    f"{key}={getattr(self, key)}; resume with the same data and batch settings"
                )
        if not 0 <= state["step_in_epoch"] < max(self.steps_per_epoch, 1):
            raise CheckpointError(
                f"data state has step_in_epoch={state['step_in_epoch']}, outside "
                f"[0, {self.steps_per_epoch}) for this corpus and global batch"
            )
        self.epoch = int(state["epoch"])
        self.step_in_epoch = int(state["step_in_epoch"])

    def _permutation(self) -> torch.Tensor:
        if self._perm_epoch != self.epoch:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            self._perm = torch.randperm(self.num_samples, generator=generator)
            self._perm_epoch = self.epoch
        return self._perm


class BatchIterator:
    """Batches of (inputs, targets) for this rank, one per optimizer step."""

    def __init__(self, dataset: TokenDataset, sampler: DistributedBatchSampler) -> None:
        if len(dataset) < sampler.global_batch:
            raise DataError(
                f"corpus has {len(dataset)} sequences of {dataset.seq_len} tokens; one global "
                f"batch needs {sampler.global_batch}: lower train.global_batch/micro_batch or "
                f"data.seq_len, or add data"
            )
        if len(dataset) != sampler.num_samples:
            raise ValueError(
                f"sampler draws from {sampler.num_samples} samples, dataset has {len(dataset)}"
            )
        self.dataset = dataset
        self.sampler = sampler

    @property
    def epoch(self) -> int:
        """Epoch the next batch belongs to (0-based)."""
        return self.sampler.epoch

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps in one pass over the corpus."""
        return self.sampler.steps_per_epoch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets): int64 CPU tensors of shape [global_batch / dp_size, seq_len]."""
        return self.dataset.gather(self.sampler.next_indices())

    def state_dict(self) -> dict[str, int]:
        """The sampler's position (the dataset is rebuilt from config)."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with exactly the batch that would have come after the saved one."""
        self.sampler.load_state_dict(state)
