"""Named registries: a name in a config selects a model, optimizer, plan or schedule."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Generic, TypeVar

from shardwise.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to factories, filled with the `register` decorator."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            close = difflib.get_close_matches(name, self._entries, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ConfigError(
                f"unknown {self.kind} {name!r}; {hint}known: {', '.join(sorted(self._entries))}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)


MODELS: Registry[Callable] = Registry("model")
"""Model builders: ``fn(model_cfg: ModelConfig, seq_len: int, *, device, seed) -> nn.Module``."""

TP_PLANS: Registry[Callable] = Registry("tensor-parallel plan")
"""Tensor-parallel plans per model name: ``fn(cfg: Config, dims: ParallelDims) -> Plan``;
raises `ConfigError` when the model's shapes do not split over the degrees."""
