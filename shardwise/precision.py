"""Mixed precision: which dtype each copy of the model state lives in, and fp16 loss scaling.

`MixedPrecisionPolicy` names three dtypes (compute/params, gradient reduction, optimizer master
weights), resolved once from `PrecisionConfig` by `policy_from_config`. The engine does the
casts; this module only decides.

`DynamicLossScaler` implements dynamic loss scaling for fp16 (Micikevicius et al., "Mixed
Precision Training", 2018, section 3.2): the loss is multiplied by a scale S before backward
so that small gradients do not flush to zero in fp16; gradients are divided by S before the
optimizer step; a step whose gradients hold inf/NaN is skipped and S shrinks, and S grows again
after a run of clean steps. Its state machine is the table `_TRANSITIONS`.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from shardwise.accelerator import Accelerator, get_accelerator
from shardwise.config import PrecisionConfig
from shardwise.distributed import comm
from shardwise.errors import CheckpointError, ConfigError

logger = logging.getLogger("shardwise")

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class MixedPrecisionPolicy:
    """The dtypes of the three copies of model state in mixed-precision training."""

    param_dtype: torch.dtype
    """Dtype of the model's parameters and activations, i.e. the compute dtype."""
    reduce_dtype: torch.dtype
    """Dtype gradients are all-reduced / reduce-scattered in across data-parallel ranks."""
    master_dtype: torch.dtype = torch.float32
    """Dtype of the optimizer's copy of the weights (the one updates accumulate into)."""

    @property
    def needs_master_weights(self) -> bool:
        """Whether the optimizer must keep its own copy of the weights in `master_dtype`."""
        return self.param_dtype != self.master_dtype

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 has 5 exponent bits: small gradients underflow unless the loss is scaled."""
        return self.param_dtype == torch.float16


def policy_from_config(cfg: PrecisionConfig, accelerator: Accelerator) -> MixedPrecisionPolicy:
    """Resolve ``precision.dtype`` ("auto" asks the accelerator) and ``precision.reduce_dtype``."""
    if cfg.dtype == "auto":
        param_dtype = accelerator.default_dtype()
    else:
        param_dtype = _DTYPES[cfg.dtype]
    if param_dtype == torch.float16 and accelerator.device_type == "cpu":
        logger.warning(
            "precision.dtype='fp16' on a CPU: fp16 matmuls have no fast kernels there and run "
            "much slower than fp32; use 'fp32' (or 'bf16' on CPUs with AMX)"
        )
    reduce_dtype = torch.float32 if cfg.reduce_dtype == "fp32" else param_dtype
    return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)


def make_loss_scaler(
    policy: MixedPrecisionPolicy, cfg: PrecisionConfig
) -> DynamicLossScaler | None:
    """A loss scaler configured by ``precision.*`` when the policy computes in fp16, else None."""
    if not policy.needs_loss_scaling:
        return None
    return DynamicLossScaler(
        initial_scale=cfg.initial_scale,
        growth_interval=cfg.growth_interval,
        hysteresis=cfg.hysteresis,
        min_scale=cfg.min_scale,
    )


class LossScalerStateError(RuntimeError):
    """The loss scaler's state matches no row (or several rows) of its transition table."""


class Event(enum.Enum):
    """What one optimizer step's gradients were, as seen by every rank together."""

    CLEAN = "clean"
    """Every gradient on every rank was finite."""
    OVERFLOW = "overflow"
    """Some gradient on some rank was inf or NaN."""


@dataclass
class _ScalerState:
    """Everything `DynamicLossScaler` needs to resume exactly (also its `state_dict`)."""

    scale: float
    """Current loss scale S."""
    clean_run: int
    """Clean steps since the last overflow or the last growth; always < growth_interval."""
    hysteresis_left: int
    """Overflows left until the next one halves S; in 1..hysteresis."""
    skipped_steps: int = 0
    """Optimizer steps skipped because of an overflow, since the start of training."""


# [Note: hysteresis]
# The counter `hysteresis_left` starts at `hysteresis` and drops by one on every overflow; the
# overflow that finds it at 1 halves the scale and refills it. So with hysteresis=h the h-th
# overflow halves S, and the h-1 before it are only skipped ("tolerated"). As in DeepSpeed with
# consecutive_hysteresis=False, the overflows need not be consecutive: a clean step does not
# refill the counter; only a growth of S (growth_interval clean steps in a row) does. Unlike
# DeepSpeed, a halving refills it too, so every halving costs h skipped steps (DeepSpeed leaves
# it at 1 after the first halving and then halves on every overflow until the next growth).

_GROWTH = 2.0
"""Factor S grows by after growth_interval clean steps."""
_BACKOFF = 0.5
"""Factor S shrinks by when the hysteresis is used up."""


def _continues_clean_run(s: DynamicLossScaler) -> bool:
    return s._state.clean_run + 1 < s.growth_interval


def _completes_clean_run(s: DynamicLossScaler) -> bool:
    return s._state.clean_run + 1 == s.growth_interval


def _hysteresis_remains(s: DynamicLossScaler) -> bool:
    return 1 < s._state.hysteresis_left <= s.hysteresis


def _backoff_stays_above_floor(s: DynamicLossScaler) -> bool:
    st = s._state
    return st.hysteresis_left == 1 and st.scale * _BACKOFF >= s.min_scale


def _backoff_crosses_floor(s: DynamicLossScaler) -> bool:
    st = s._state
    return st.hysteresis_left == 1 and s.min_scale <= st.scale < s.min_scale / _BACKOFF


def _count_clean(s: DynamicLossScaler) -> None:
    s._state.clean_run += 1


def _grow(s: DynamicLossScaler) -> None:
    s._state.scale *= _GROWTH
    s._state.clean_run = 0
    s._state.hysteresis_left = s.hysteresis


def _tolerate(s: DynamicLossScaler) -> None:
    s._state.hysteresis_left -= 1
    s._state.clean_run = 0
    s._state.skipped_steps += 1


def _back_off(s: DynamicLossScaler) -> None:
    s._state.scale *= _BACKOFF
    s._state.hysteresis_left = s.hysteresis
    s._state.clean_run = 0
    s._state.skipped_steps += 1


def _back_off_to_floor(s: DynamicLossScaler) -> None:
    s._state.scale = s.min_scale
    s._state.hysteresis_left = s.hysteresis
    s._state.clean_run = 0
    s._state.skipped_steps += 1


@dataclass(frozen=True)
class _Transition:
    """One row of the loss scaler's state machine."""

    name: str
    """Short name, used in logs and errors."""
    event: Event
    """The event this row handles."""
    guard: Callable[[DynamicLossScaler], bool]
    """Predicate on the scaler's state; exactly one row per (event, state) may hold."""
    action: Callable[[DynamicLossScaler], None]
    """Mutation of the scaler's state."""
    should_step: bool
    """Whether the optimizer applies this step's gradients."""


# For every legal state (0 <= clean_run < growth_interval, 1 <= hysteresis_left <= hysteresis,
# scale >= min_scale) exactly one row matches each event; any other state matches none and
# `update` raises. See [Note: hysteresis].
_TRANSITIONS: tuple[_Transition, ...] = (
    # CLEAN, the run of clean steps is still short of growth_interval: count it, step.
    _Transition("count", Event.CLEAN, _continues_clean_run, _count_clean, should_step=True),
    # CLEAN, this step completes growth_interval clean steps: S *= 2, refill hysteresis, step.
    _Transition("grow", Event.CLEAN, _completes_clean_run, _grow, should_step=True),
    # OVERFLOW with hysteresis left: keep S, use up one unit of hysteresis, skip the step.
    _Transition("tolerate", Event.OVERFLOW, _hysteresis_remains, _tolerate, should_step=False),
    # OVERFLOW with hysteresis used up, S/2 >= min_scale: S /= 2, refill hysteresis, skip.
    _Transition("back_off", Event.OVERFLOW, _backoff_stays_above_floor, _back_off, False),
    # OVERFLOW with hysteresis used up, S/2 < min_scale: S = min_scale, refill, skip.
    _Transition("floor", Event.OVERFLOW, _backoff_crosses_floor, _back_off_to_floor, False),
)


class DynamicLossScaler:
    """Dynamic loss scale for fp16 training, driven by the table `_TRANSITIONS`.

    Per optimizer step: ``scaler.scale_loss(loss).backward()``, then
    ``found_inf = scaler.unscale_and_check_(grads, groups)`` (before clipping), then
    ``if scaler.update(found_inf): optimizer.step()``.
    """

    def __init__(
        self,
        initial_scale: float = 2.0**16,
        growth_interval: int = 1000,
        hysteresis: int = 2,
        min_scale: float = 1.0,
    ) -> None:
        if min_scale > initial_scale:
            raise ConfigError(
                f"precision.min_scale={min_scale:g} is above precision.initial_scale="
                f"{initial_scale:g}; use a min_scale <= initial_scale"
            )
        self.growth_interval = growth_interval
        """Clean steps in a row after which S doubles."""
        self.hysteresis = hysteresis
        """The hysteresis-th overflow since the last change of S halves S."""
        self.min_scale = min_scale
        """S never goes below this."""
        self._state = _ScalerState(
            scale=float(initial_scale), clean_run=0, hysteresis_left=hysteresis
        )

    @property
    def scale(self) -> float:
        """Current loss scale S."""
        return self._state.scale

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps skipped because of an overflow."""
        return self._state.skipped_steps

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S``. Compute the loss in fp32: S = 2^16 is already inf in fp16."""
        return loss * self._state.scale

    def unscale_and_check_(
        self, grads: list[torch.Tensor], groups: Sequence = (), device: torch.device | None = None
    ) -> bool:
        """Divide `grads` by S in place; return whether any is inf/NaN.

        The flag is all-reduced (MAX) over each of `groups`, so ranks holding different
        gradient shards (ZeRO-2/3, tensor parallelism) or different micro-batches take one
        decision together. Every rank of a group must call this, even with no gradients: a
        rank that may have none passes its `device` for the flag.
        """
        device = grads[0].device if grads else device or get_accelerator().device(0)
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        for same_device in _group_by_device(grads):
            flag = torch.zeros(1, dtype=torch.float32, device=same_device[0].device)
            inv = torch.full_like(flag, 1.0 / self._state.scale)
            # torch's fused unscale-and-check (CPU and CUDA): grads *= inv, flag = 1 on inf/NaN.
            torch._amp_foreach_non_finite_check_and_unscale_(same_device, flag, inv)
            found_inf = torch.maximum(found_inf, flag.to(device))
        return found_on_any_rank(found_inf, groups)

    def update(self, found_inf: bool) -> bool:
        """Advance the state machine by one step; return whether the optimizer should step."""
        event = Event.OVERFLOW if found_inf else Event.CLEAN
        matches = [row for row in _TRANSITIONS if row.event is event and row.guard(self)]
        if len(matches) != 1:
            names = ", ".join(row.name for row in matches) or "none"
            raise LossScalerStateError(
                f"loss scaler: event {event.name} in state {self._state} with growth_interval="
                f"{self.growth_interval}, hysteresis={self.hysteresis}, min_scale="
                f"{self.min_scale:g} matches {names}; exactly one transition must match"
            )
        row = matches[0]
        old_scale = self._state.scale
        row.action(self)
        if not row.should_step:
            log = logger.warning if row.name == "floor" else logger.info
            log(
                "fp16 gradient overflow: skipping step (%s), loss scale %g -> %g",
                row.name,
                old_scale,
                self._state.scale,
            )
        elif row.name == "grow":
            logger.debug("loss scale %g -> %g", old_scale, self._state.scale)
        return row.should_step

    def state_dict(self) -> dict[str, Any]:
        """The counters needed to continue the exact sequence of scales after a restart."""
        st = self._state
        return {
            "scale": st.scale,
            "clean_run": st.clean_run,
            "hysteresis_left": st.hysteresis_left,
            "skipped_steps": st.skipped_steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()`; it must be a legal state for this scaler's settings."""
        missing = {"scale", "clean_run", "hysteresis_left", "skipped_steps"} - set(state)
        if missing:
            raise CheckpointError(f"loss scaler state lacks {sorted(missing)}")
        restored = _ScalerState(
            scale=float(state["scale"]),
            clean_run=int(state["clean_run"]),
            hysteresis_left=int(state["hysteresis_left"]),
            skipped_steps=int(state["skipped_steps"]),
        )
        if not (
            restored.scale >= self.min_scale
            and 0 <= restored.clean_run < self.growth_interval
            and 1 <= restored.hysteresis_left <= self.hysteresis
        ):
            raise CheckpointError(
                f"loss scaler state {restored} does not fit precision.min_scale="
                f"{self.min_scale:g}, growth_interval={self.growth_interval}, hysteresis="
                f"{self.hysteresis}; resume with the settings the checkpoint was written with"
            )
        self._state = restored


def found_on_any_rank(found: torch.Tensor, groups: Sequence) -> bool:
    """Whether any rank of each of `groups` found an inf/NaN (`found`: this rank's flag, a
    one-element float tensor, nonzero if so): the ranks take one decision together."""
    for group in groups:
        comm.all_reduce_(found, group, op=dist.ReduceOp.MAX)
    return bool(found.item())


def _group_by_device(grads: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """`grads` split into lists on one device each (the fused kernel needs one device)."""
    groups: dict[torch.device, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault(g.device, []).append(g)
    return list(groups.values())
