"""Tensor-parallel plans: data that says how each module of an unmodified model is split.

A `Plan` maps module-name patterns (``fnmatch`` syntax, e.g. ``"blocks.*.attn.qkv"``) to a
`ParallelStyle`, and names the loss that reads the model's (sharded) output, if the plan
leaves it sharded. Applying it
(`apply_tensor_parallel`) swaps each matched module for its parallel version built from the
module's own full weights: parameter names stay the same, only their shapes shrink to this
rank's shard, so the model's forward code, optimizer grouping and checkpoint names are
unchanged (DESIGN.md principle 2).

Every style receives the `TensorParallelContext`: the mesh (with the tp sub-axes of the
layout, see `shardwise.distributed.dims.TP_AXES`) and the shard book-keeping. Two facts about
each shard are recorded there because code outside the layer needs them:

* tied parameters (GPT's head shares the embedding's weight) must become one shard, sharded
  one way; `TensorParallelContext.shard` returns the shard made first and refuses a second,
  different layout;
* ``replicas`` — how many tp ranks hold an identical copy of a shard — so the global gradient
  norm counts each element once (`TensorParallel.replicas`). A parameter no style touched is
  replicated on every tp rank.

Gradients of a replicated parameter whose uses see different data on different tp ranks
(layer norms in sequence- or 2D-sharded regions) are partial sums: the style routes the
parameter through `shardwise.distributed.comm.copy_to_group` (identity forward, all-reduce
backward), so every rank ends the backward with the full gradient.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Protocol

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from shardwise.distributed import comm
from shardwise.distributed.dims import TP_AXES, TpMode, tp_mesh
from shardwise.errors import ConfigError

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class TensorParallelContext:
    """The tp part of the mesh, as a layer sees it, and the shards made so far."""

    def __init__(self, mesh: DeviceMesh, mode: TpMode) -> None:
        missing = [axis for axis in TP_AXES[mode] if axis not in mesh.mesh_dim_names]
        if missing:
            raise ConfigError(
                f"tp_mode={mode!r} needs mesh axes {TP_AXES[mode]}, but the mesh has "
                f"{mesh.mesh_dim_names}; build it with ParallelDims(tp_mode={mode!r})"
            )
        self.mesh = mesh
        self.mode = mode
        # id(original) -> (weak reference to it, layout, shard); the reference tells a live
        # original from a freed one whose id was reused.
        self._shards: dict[int, tuple[weakref.ref, str, nn.Parameter]] = {}
        self.replicas: dict[int, int] = {}
        """id(shard parameter) -> tp ranks holding an identical copy of it."""
        self.origins: dict[int, tuple[torch.Size, Callable[[torch.Tensor], torch.Tensor]]] = {}
        """id(shard parameter) -> (the full parameter's shape, the `make` that cut it)."""

    def group(self, axis: str) -> DeviceMesh:
        """The 1-D mesh of a tp axis: ``"tp"`` (all tp ranks) or a sub-axis of the layout."""
        return tp_mesh(self.mesh) if axis == "tp" else self.mesh[axis]

    def rank(self, axis: str) -> int:
        return comm.group_rank(self.group(axis))

    def size(self, axis: str) -> int:
        return comm.group_size(self.group(axis))

    def shard(
        self,
        param: nn.Parameter,
        layout: str,
        make: Callable[[torch.Tensor], torch.Tensor],
        replicas: int = 1,
    ) -> nn.Parameter:
        """This rank's shard of `param`: ``make(full) -> local``, made once per parameter.

        `layout` names the split (e.g. ``"rows"``); a tied parameter asked for again with the
        same layout gets the same shard, with another layout it is an error. `replicas` is how
        many tp ranks hold this very shard.
        """
        made = self._shards.get(id(param))
        if made is not None and made[0]() is param:
            if made[1] != layout:
                raise ConfigError(
                    f"a tied parameter is split two ways by the tensor-parallel plan "
                    f"({made[1]!r} and {layout!r}); tie only layers split the same way"
                )
            return made[2]
        with torch.no_grad():
            local = make(param.detach()).contiguous().clone()
        shard = nn.Parameter(local, requires_grad=param.requires_grad)
        self._shards[id(param)] = (weakref.ref(param), layout, shard)
        self.replicas[id(shard)] = replicas
        self.origins[id(shard)] = (param.shape, make)
        return shard


class ParallelStyle(Protocol):
    """How one module is split: returns its replacement (or the module, changed in place)."""

    def apply(self, module: nn.Module, ctx: TensorParallelContext) -> nn.Module: ...


@dataclass(frozen=True)
class Plan:
    """A tensor-parallel plan for one layout: module patterns -> styles, and the loss."""

    mode: TpMode
    layers: dict[str, ParallelStyle]
    loss: Callable[[TensorParallelContext], LossFn] | None = None
    """Builds the loss that takes the model's local output and the full targets; None when
    the plan leaves the model's output whole (a head with ``gather_output``), so the ordinary
    loss applies."""


@dataclass
class TensorParallel:
    """What applying a plan produced, for the engine."""

    ctx: TensorParallelContext
    loss_fn: LossFn | None
    """The loss of the split output; None: the output is whole, use the ordinary loss."""
    replicas: dict[int, int] = field(default_factory=dict)
    """id(parameter) -> tp ranks holding an identical copy (tp size for untouched ones)."""

    def global_index(self, tensor: torch.Tensor) -> tuple[torch.Size, torch.Tensor | None]:
        """The full tensor's shape and, for a shard, where each of its elements sits in the
        full tensor flattened (int64, in the shard's flat order); None for a tensor the plan
        did not split. Computed by cutting an index tensor as the parameter was cut (every
        style's `make` only selects elements)."""
        origin = self.ctx.origins.get(id(tensor))
        if origin is None:
            return tensor.shape, None
        shape, make = origin
        positions = torch.arange(shape.numel(), dtype=torch.int64).view(shape)
        return shape, make(positions).flatten()


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh, plan: Plan) -> TensorParallel:
    """Split `model` in place by `plan` over the tp axes of `mesh`.

    The model must be materialised (every rank builds the same full model from the same
    seed; each keeps its shards). Every pattern must match at least one module.
    """
    ctx = TensorParallelContext(mesh, plan.mode)
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError(
            "tensor parallelism splits a materialised model: build it on a device "
            "(not 'meta') before initialize()"
        )
    names = [name for name, _ in model.named_modules()]
    for pattern, style in plan.layers.items():
        matched = [name for name in names if fnmatchcase(name, pattern)]
        if not matched:
            raise ConfigError(
                f"tensor-parallel plan pattern {pattern!r} matches no module of "
                f"{type(model).__name__}"
            )
        for name in matched:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            replacement = style.apply(parent.get_submodule(child), ctx)
            setattr(parent, child, replacement)
    tp_size = ctx.size("tp")
    replicas = {id(p): ctx.replicas.get(id(p), tp_size) for p in model.parameters()}
    loss_fn = None if plan.loss is None else plan.loss(ctx)
    return TensorParallel(ctx=ctx, loss_fn=loss_fn, replicas=replicas)


def require_module(module: nn.Module, kind: type[nn.Module], style: str) -> None:
    """Refuse a style applied to a module it cannot split (a wrong plan pattern)."""
    if not isinstance(module, kind):
        raise ConfigError(
            f"{style} applies to {kind.__name__}, not {type(module).__name__}; fix the plan"
        )


def split(tensor: torch.Tensor, dim: int, parts: int, index: int) -> torch.Tensor:
    """Block `index` of `parts` equal blocks of `tensor` along `dim`."""
    if tensor.shape[dim] % parts:
        raise ConfigError(
            f"a tensor of shape {tuple(tensor.shape)} does not split into {parts} equal "
            f"blocks along dim {dim}"
        )
    size = tensor.shape[dim] // parts
    return tensor.narrow(dim, index * size, size)


def split_fused(tensor: torch.Tensor, dim: int, fused: int, parts: int, index: int) -> torch.Tensor:
    """Block `index` of a tensor whose `dim` concatenates `fused` equal pieces (q|k|v): the
    block of every piece, concatenated, so the shard is again [q_i | k_i | v_i]."""
    pieces = tensor.chunk(fused, dim)
    return torch.cat([split(piece, dim, parts, index) for piece in pieces], dim)
