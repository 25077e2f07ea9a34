"""Module hooks that bring parameters in around their use: one driver for ZeRO-3's units and
for the chunks of ``offload.policy``.

A *site* is one place parameters are used: the modules whose calls need them, the groups that
hold them (chunks) and the parameters whose gradients end the site's backward. `ModuleHooks`
turns the modules' hooks into calls of a `Residency`: the chunk manager
(zero/chunks/manager.py), which decides what they mean per chunk:

    ZeRO-3 unit (zero/params.py)    an access all-gathers it; the last release frees it at
                                    once (after backward, and after forward with
                                    reshard_after_forward); a prefetch starts the all-gather
    chunk of offload.policy         an access brings it to the device (a gathered chunk:
                                    gathers it); a release leaves it evictable where it is,
                                    ranked by its next use

[Note: the hook protocol] For every site:

    forward pre-hook       access its groups; prefetch the group after its last one (groups
                           are in execution order), unless autograd is running
    forward hook           release them ("forward"); hook every output that requires grad
    output-gradient hook   (the gradient arrives just before the site's backward) access its
                           groups again; prefetch the group before its first
    post-accumulate-grad   `on_grad` first (a store that keeps gradients elsewhere moves it);
      hook of a parameter  once every parameter of the site has its gradient for this
                           backward, release the groups ("backward") as many times as the
                           backward accessed them (a module called twice)
    finish_backward()      release what is still in use: sites some of whose parameters got
                           no gradient

A forward while autograd is running is activation checkpointing's recomputation: the group
after it in forward order has had its backward already, so nothing is prefetched. Torch stops
the recomputation as soon as the tensors backward needs exist (non-reentrant checkpoint's
early stop): the site then had its pre-hook but never its forward hook. Such an unclosed
forward access is released with the site's backward accesses (its backward follows the
recomputation), or at `finish_backward` at the latest.

A tied parameter belongs to every site that holds it, and its gradient is accumulated once,
after its last use in backward, so those sites stay in use from the first one's backward to
the last. Parameter hooks go on at the first backward: materialising a meta parameter swaps
it (`torch.utils.swap_tensors`), which drops hooks registered before.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import nn


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a module's output (a tensor, or tuples, lists and dicts of them)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in output_tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in output_tensors(item)]
    return []


def in_backward() -> bool:
    """Whether autograd is running (a forward now is a recomputation)."""
    return torch._C._current_graph_task_id() != -1


class Residency(Protocol):
    """Where a group's parameters are, as the hooks need them (module docstring)."""

    def access(self, group: Any, read_only: bool = False) -> None: ...

    def release(self, group: Any, after: Literal["forward", "backward"]) -> None: ...

    def prefetch(self, group: Any) -> bool: ...


@dataclass(frozen=True)
class Site:
    """One place parameters are used; see the module docstring."""

    name: str
    modules: tuple[nn.Module, ...]
    """Whose calls use the groups."""
    groups: tuple[int, ...]
    """Positions of the groups in `ModuleHooks.groups`."""
    params: tuple[nn.Parameter, ...]
    """The trainable parameters whose gradients end the site's backward."""


class ModuleHooks:
    """Drives a `Residency` from module hooks; see [Note: the hook protocol]."""

    def __init__(
        self,
        sites: Sequence[Site],
        groups: Sequence[Any],
        residency: Residency,
        on_grad: Callable[[nn.Parameter], None] | None = None,
        prefetch: bool = True,
    ) -> None:
        """`groups` in execution order (what prefetching walks); `on_grad(param)` runs in a
        parameter's post-accumulate-grad hook while it has a gradient."""
        self.sites = {site.name: site for site in sites}
        self.groups = list(groups)
        self.residency = residency
        self.on_grad = on_grad
        self.prefetch = prefetch
        self.owners: dict[int, list[str]] = {}
        """Parameter id -> the sites holding it (several for a tied weight)."""
        self.prefetched = 0
        """Prefetches started."""
        self._handles: list[Any] = []
        self._grad_hooked: set[int] = set()
        self._accesses: dict[str, int] = {}
        """Site -> backward accesses not yet released."""
        self._forwards: dict[str, int] = {}
        """Site -> forward accesses whose forward hook has not run (yet, or ever: a
        recomputation stopped early)."""
        self._pending: dict[str, set[int]] = {}
        """Site -> its parameters whose gradient this backward has not brought yet."""
        for site in sites:
            for param in site.params:
                self.owners.setdefault(id(param), []).append(site.name)
            for module in site.modules:
                self._handles.append(
                    module.register_forward_pre_hook(lambda *_, n=site.name: self.before_forward(n))
                )
                self._handles.append(
                    module.register_forward_hook(
                        lambda _m, _i, out, n=site.name: self.after_forward(n, out)
                    )
                )

    def remove(self) -> None:
        """Take every hook off the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._grad_hooked.clear()

    def _groups(self, name: str) -> list[Any]:
        return [self.groups[i] for i in self.sites[name].groups]

    def _prefetch(self, index: int) -> None:
        if self.prefetch and 0 <= index < len(self.groups):
            self.prefetched += self.residency.prefetch(self.groups[index])

    # -- forward -----------------------------------------------------------------------------

    def before_forward(self, name: str) -> None:
        for group in self._groups(name):
            self.residency.access(group, read_only=True)
        self._forwards[name] = self._forwards.get(name, 0) + 1
        if not in_backward():
            self._prefetch(max(self.sites[name].groups) + 1)

    def after_forward(self, name: str, output: object) -> None:
        self._release_forward(name, 1)
        for tensor in output_tensors(output):
            if tensor.requires_grad:
                tensor.register_hook(lambda _grad, n=name: self.before_backward(n))

    # -- backward ----------------------------------------------------------------------------

    def before_backward(self, name: str) -> None:
        site = self.sites[name]
        for group in self._groups(name):
            self.residency.access(group, read_only=True)
        for param in site.params:
            if id(param) not in self._grad_hooked:
                self._grad_hooked.add(id(param))
                self._handles.append(param.register_post_accumulate_grad_hook(self._grad_ready))
        self._accesses[name] = self._accesses.get(name, 0) + 1
        self._pending.setdefault(name, {id(p) for p in site.params})
        self._prefetch(min(site.groups) - 1)

    def _grad_ready(self, param: nn.Parameter) -> None:
        if self.on_grad is not None and param.grad is not None:
            self.on_grad(param)
        for name in self.owners[id(param)]:
            pending = self._pending.get(name)
            if pending is None:
                continue
            pending.discard(id(param))
            if not pending:
                del self._pending[name]
                self._release_backward(name)

    def _release_forward(self, name: str, times: int) -> None:
        self._forwards[name] -= times
        for _ in range(times):
            for group in self._groups(name):
                self.residency.release(group, "forward")

    def _release_backward(self, name: str) -> None:
        self._release_forward(name, self._forwards.get(name, 0))  # a stopped recomputation
        for _ in range(self._accesses.pop(name)):
            for group in self._groups(name):
                self.residency.release(group, "backward")

    def finish_backward(self) -> None:
        """After a backward: release the groups of sites still waiting for a gradient, and of
        forwards left open by a stopped recomputation."""
        for name in list(self._accesses):
            self._pending.pop(name, None)
            self._release_backward(name)
        for name, times in self._forwards.items():
            if times:
                self._release_forward(name, times)
