"""Parallel degrees, validated against the world size, and the one DeviceMesh built from them.

`ParallelDims` is the single explicit parallel context (DESIGN.md principle 1): it is built
from the config and the world size, checks every constraint before any process group work
(so no rank is left waiting on a collective another rank never reaches), and builds one
`DeviceMesh` whose named axes every component receives as an argument.

Axes, outer to inner: ``("dp_replicate", "dp_shard", "pp", "sp", "tp")``. Inner axes get
neighbouring ranks, so the chattiest traffic (tp, then sp) stays inside a node. Degree-1 axes
are kept. The 2d, 2.5d and 3d tensor-parallel layouts factorise the tp axis into named
sub-axes (`TP_AXES`: ``tp_row x tp_col``, ``tp_dep x tp_row x tp_col``); the whole tp group is
then their flattening, so code gets it with `tp_mesh(mesh)` whatever the layout.

[Note: flattened dp axis] The gradient reducer needs one group spanning dp_replicate x
dp_shard. `build_mesh` makes it with ``DeviceMesh._flatten("dp")`` — a private method, but
the one torchtitan uses; it exists and works in torch 2.13 on CPU/gloo (checked by
tests/distributed/test_dims.py). Two quirks: ``mesh["dp"]`` works but emits a UserWarning
("slicing a flattened dim from root mesh will be deprecated"), so prefer `dp_mesh(mesh)`,
which calls ``_flatten("dp")`` again — idempotent, it returns the mesh cached on the root
mesh, no new group. When dp spans the whole world torch reuses the default group. Should
``_flatten`` vanish from a later torch, the fallback is ``DeviceMesh.from_group`` over a
group from ``dist.new_subgroups_by_enumeration`` with the rank lists of
``mesh["dp_replicate", "dp_shard"].mesh`` flattened row-major — same ranks, same order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from shardwise.errors import ConfigError

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from shardwise.config import ParallelConfig

AXIS_NAMES: tuple[str, ...] = ("dp_replicate", "dp_shard", "pp", "sp", "tp")
"""Mesh axes, outer (far apart ranks) to inner (neighbouring ranks)."""

DP_AXIS = "dp"
"""Name of the flattened dp_replicate x dp_shard axis that `build_mesh` adds."""

TpMode = Literal["1d", "2d", "2.5d", "3d"]

TP_AXES: dict[str, tuple[str, ...]] = {
    "1d": ("tp",),
    "2d": ("tp_row", "tp_col"),
    "2.5d": ("tp_dep", "tp_row", "tp_col"),
    "3d": ("tp_dep", "tp_row", "tp_col"),
}
"""The mesh axes the tp degree is factorised into, per layout, outer to inner."""


@dataclass(frozen=True)
class ParallelDims:
    """Resolved parallel degrees of one run; their product is the world size."""

    dp_replicate: int
    """Data-parallel replicas (model states replicated), in ranks."""
    dp_shard: int
    """Data-parallel shard degree (model states sharded, ZeRO/FSDP), in ranks."""
    pp: int
    """Pipeline stages, in ranks."""
    tp: int
    """Tensor-parallel degree, in ranks (q^2 for 2d, depth*q^2 for 2.5d, q^3 for 3d)."""
    sp: int
    """Sequence-parallel degree (ring attention / Ulysses), in ranks."""
    tp_mode: TpMode
    """Tensor-parallel layout: 1d (Megatron), 2d (SUMMA), 2.5d (Tesseract) or 3d."""
    tp_depth: int
    """Depth d of the 2.5d layout; 1 for every other layout."""
    world_size: int
    """Processes in the default group; must equal the product of the degrees."""

    def __post_init__(self) -> None:
        _check_positive(self)
        _check_tp_layout(self.tp, self.tp_mode, self.tp_depth, self.world_size)
        product = self.dp_replicate * self.dp_shard * self.pp * self.sp * self.tp
        if product != self.world_size:
            raise ConfigError(
                f"parallel degrees dp_replicate x dp_shard x pp x sp x tp = "
                f"{self.dp_replicate}x{self.dp_shard}x{self.pp}x{self.sp}x{self.tp} = "
                f"{product} do not match world size {self.world_size}"
            )

    @classmethod
    def from_config(cls, cfg: ParallelConfig, world_size: int) -> ParallelDims:
        """Resolve ``dp_shard = -1`` and validate; raises `ConfigError` with one-line messages."""
        if world_size < 1:
            raise ConfigError(f"world size {world_size} is not a number of processes (>= 1)")
        dp_shard = cfg.dp_shard
        if dp_shard == -1:
            others = cfg.dp_replicate * cfg.pp * cfg.sp * cfg.tp
            if world_size % others:
                raise ConfigError(
                    f"parallel.dp_shard=-1 cannot be resolved: world size {world_size} is not "
                    f"divisible by dp_replicate x pp x sp x tp = {cfg.dp_replicate}x{cfg.pp}x"
                    f"{cfg.sp}x{cfg.tp} = {others}; use a multiple of {others} processes"
                )
            dp_shard = world_size // others
        if cfg.tp_sequence_parallel and cfg.tp == 1:
            raise ConfigError(
                "parallel.tp_sequence_parallel=true splits the sequence over the tensor-parallel "
                "ranks, but parallel.tp=1; set tp > 1 or leave it false"
            )
        return cls(
            dp_replicate=cfg.dp_replicate,
            dp_shard=dp_shard,
            pp=cfg.pp,
            tp=cfg.tp,
            sp=cfg.sp,
            tp_mode=cfg.tp_mode,
            tp_depth=cfg.tp_depth,
            world_size=world_size,
        )

    @classmethod
    def tensor_parallel(cls, tp: int, tp_mode: TpMode = "1d", tp_depth: int = 1) -> ParallelDims:
        """A layout of `tp` ranks that only tensor-parallelise (every other degree 1)."""
        return cls(
            dp_replicate=1,
            dp_shard=1,
            pp=1,
            tp=tp,
            sp=1,
            tp_mode=tp_mode,
            tp_depth=tp_depth,
            world_size=tp,
        )

    @property
    def dp(self) -> int:
        """Data-parallel degree: dp_replicate x dp_shard ranks see different data."""
        return self.dp_replicate * self.dp_shard

    @property
    def axis_names(self) -> tuple[str, ...]:
        """Mesh axis names, outer to inner (the tp axis factorised as `TP_AXES` says)."""
        return AXIS_NAMES[:-1] + TP_AXES[self.tp_mode]

    @property
    def tp_shape(self) -> tuple[int, ...]:
        """Sizes of the tp sub-axes: (tp,), (q, q), (depth, q, q) or (q, q, q)."""
        if self.tp_mode == "1d":
            return (self.tp,)
        if self.tp_mode == "2d":
            q = round(self.tp**0.5)
            return (q, q)
        if self.tp_mode == "2.5d":
            q = round((self.tp // self.tp_depth) ** 0.5)
            return (self.tp_depth, q, q)
        q = round(self.tp ** (1 / 3))
        return (q, q, q)

    def hidden_split(self, sequence_split: bool = False) -> tuple[int, int, int]:
        """Into how many parts one tp rank's share of a hidden state [B, T, h] between layers
        divides each dimension: 1d keeps it whole (with Megatron-SP, `sequence_split`, the
        sequence over the tp ranks); 2d and 2.5d hold a batch block of depth x q and a hidden
        block of q ([Note: summa layout]); 3d a batch block of q^2 and a hidden block of q (its
        layout P)."""
        if self.tp_mode == "1d":
            return (1, self.tp if sequence_split else 1, 1)
        *_, q = self.tp_shape
        rows = q * q if self.tp_mode == "3d" else self.tp_depth * q
        return (rows, 1, q)

    @property
    def mesh_shape(self) -> tuple[int, ...]:
        """Degrees in `axis_names` order."""
        return (self.dp_replicate, self.dp_shard, self.pp, self.sp, *self.tp_shape)

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """One DeviceMesh with the five named axes plus the flattened ``"dp"`` axis.

        Get the dp axis with `dp_mesh(mesh)` (``mesh["dp"]`` works too, with a warning).

        Collective over the default group: every rank must call it. ``device_type`` comes
        from `shardwise.accelerator.get_accelerator().device_type`.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        actual = dist.get_world_size() if dist.is_initialized() else 1
        if actual != self.world_size:
            raise ConfigError(
                f"parallel degrees were resolved for world size {self.world_size} but "
                f"{actual} processes are running; resolve them with the running world size"
            )
        mesh = init_device_mesh(device_type, self.mesh_shape, mesh_dim_names=self.axis_names)
        # See [Note: flattened dp axis]; the same holds for a factorised tp axis.
        mesh["dp_replicate", "dp_shard"]._flatten(DP_AXIS)
        tp_mesh(mesh)
        grad_mesh(mesh)
        replica_mesh(mesh)
        return mesh

    def dp_rank(self, mesh: DeviceMesh) -> int:
        """This rank's index among the dp ranks (the data shard it reads), in [0, dp)."""
        return mesh.get_local_rank("dp_replicate") * self.dp_shard + mesh.get_local_rank("dp_shard")


def dp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D flattened ``"dp"`` axis of a mesh from `ParallelDims.build_mesh` (no new group:
    `_flatten` returns the cached one)."""
    return mesh["dp_replicate", "dp_shard"]._flatten(DP_AXIS)


def grad_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks whose gradients are averaged: the dp axis, and with sequence parallelism the
    sp ranks too (same parameters, other tokens of the same rows)."""
    if mesh["sp"].size() == 1:
        return dp_mesh(mesh)
    return mesh["dp_replicate", "dp_shard", "sp"]._flatten("dp_sp")


def replica_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ranks holding the same ZeRO shards: the dp_replicate axis, and with sequence
    parallelism the sp ranks too."""
    if mesh["sp"].size() == 1:
        return mesh["dp_replicate"]
    return mesh["dp_replicate", "sp"]._flatten("dp_replicate_sp")


def tp_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The 1-D tp axis of a mesh from `ParallelDims.build_mesh`: the ``"tp"`` axis, or the
    flattening of the tp sub-axes of a 2d/2.5d/3d layout (cached on the root mesh)."""
    names = mesh.mesh_dim_names
    if "tp" in names:
        return mesh["tp"]
    return mesh[tuple(n for n in names if n.startswith("tp_"))]._flatten("tp")


def _check_positive(dims: ParallelDims) -> None:
    for name in ("dp_replicate", "dp_shard", "pp", "tp", "sp", "tp_depth", "world_size"):
        value = getattr(dims, name)
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"parallel.{name}={value!r} must be a whole number >= 1")


def valid_tp_degrees(tp_mode: TpMode, tp_depth: int, limit: int) -> list[int]:
    """Tensor-parallel degrees the layout allows, up to `limit` ranks."""
    if tp_mode == "1d":
        return list(range(1, limit + 1))
    side_power, factor = {"2d": (2, 1), "2.5d": (2, tp_depth), "3d": (3, 1)}[tp_mode]
    degrees = []
    q = 1
    while factor * q**side_power <= limit:
        degrees.append(factor * q**side_power)
        q += 1
    return degrees


MAX_LISTED_TP = 64
"""Valid tp degrees are listed up to this many ranks in errors."""


def fitting_tp_degrees(dims: ParallelDims, fits: Callable[[ParallelDims], bool]) -> str:
    """The tp degrees above 1 of `dims`'s layout (up to `MAX_LISTED_TP`) for which
    ``fits(tp-only dims)`` holds, for an error message: ``"2, 4"`` or ``"none above 1"``."""
    degrees = valid_tp_degrees(dims.tp_mode, dims.tp_depth, MAX_LISTED_TP)
    layouts = [ParallelDims.tensor_parallel(tp, dims.tp_mode, dims.tp_depth) for tp in degrees]
    return ", ".join(str(d.tp) for d in layouts if d.tp > 1 and fits(d)) or "none above 1"


_TP_SHAPE = {"2d": "a square q^2", "2.5d": "tp_depth x q^2", "3d": "a cube q^3"}


def _check_tp_layout(tp: int, tp_mode: str, tp_depth: int, world_size: int) -> None:
    if tp_mode not in ("1d", "2d", "2.5d", "3d"):
        raise ConfigError(f"parallel.tp_mode={tp_mode!r} is not a layout; use 1d, 2d, 2.5d or 3d")
    if tp_depth > 1 and tp_mode != "2.5d":
        raise ConfigError(
            f"parallel.tp_depth={tp_depth} only applies to tp_mode='2.5d' (tp_mode is "
            f"{tp_mode!r}); set tp_depth=1 or tp_mode='2.5d'"
        )
    if tp_mode == "1d":
        return
    valid = valid_tp_degrees(tp_mode, tp_depth, world_size)
    if tp in valid:
        return
    shape = _TP_SHAPE[tp_mode].replace("tp_depth", f"tp_depth={tp_depth}")
    allowed = ", ".join(map(str, valid)) if valid else "none"
    raise ConfigError(
        f"parallel.tp={tp} does not fit tp_mode={tp_mode!r}, which needs tp = {shape}; "
        f"valid tp up to world size {world_size}: {allowed}"
    )
