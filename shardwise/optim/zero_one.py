"""0/1 Adam: 1-bit Adam's machinery with the variance updated at doubling gaps, then local
steps that exchange nothing between synchronisations.

Lu et al., "Maximizing Communication Efficiency for Large-scale Training via 0/1 Adam"
(ICLR 2023). Two policies on top of `OneBitAdam` (docs/onebit_adam.md, section 0/1 Adam):

* **Variance at doubling gaps** (steps 1 .. freeze_step): the variance is updated, on exactly
  averaged gradients, at every step at first; after every `variance_gap_doubles_after` updates
  the gap between two updates doubles (1, 2, 4, ...: the paper's T_v with its kappa). The
  steps between use it frozen, their gradients averaged at one bit per element as 1-bit
  Adam's compressed steps are (the same exchange, the same formula).
* **Local steps** (after freeze_step): the variance stays as it was. Each rank steps its own
  parameters on its own gradient (m = b1 m + (1 - b1) g, the frozen step's update), nothing
  is exchanged; every `interval` steps the ranks synchronise. The interval starts at 1 and
  doubles after every `sync_interval_doubles_after` steps, up to `sync_interval_max` (the
  paper's H).

[Note: 0/1 Adam's synchronisation] Each rank's displacement since the last synchronisation,
d = synced - p (its local steps' updates and weight decay), is averaged over the ranks through
the compressed exchange with error feedback (the errors are zeroed at the first local step:
until then they held gradients). Every rank then sets p = D synced - drift, where D is the
product of the local steps' decay factors (the same on every rank) and drift = mean(d) -
(1 - D) synced is what Adam's steps moved, and takes drift (sqrt(v) + c2 eps) / sum(lr c2 / c1)
as its momentum: the learning-rate-weighted mean of the momenta the ranks stepped with (the
paper's m = u / sum(lr)). Every rank computes this from the same inputs (the exchange gives
every rank the same average, bitwise), so after a synchronisation the ranks hold the same
parameters and momenta, bitwise. Elements the momentum mask holds (v == 0) only decay.

Unlike DeepSpeed's ZeroOneAdam, the last synchronised parameters are kept (`synced`, 4 bytes
per parameter, counted by the plan), instead of undoing the local updates by subtraction:
rounding would otherwise leave each rank a slightly different starting point after every
synchronisation, and the ranks would drift apart. A save, a load and `full_state_dict`
synchronise first (the store's `sync_update`), so a checkpoint holds one agreed model and a
resumed run continues bitwise as the uninterrupted one, which synchronised at the same save.
"""

from __future__ import annotations

import torch

from shardwise.config import OptimConfig
from shardwise.optim.onebit import OneBitAdam


class ZeroOneAdam(OneBitAdam):
    """1-bit Adam with the variance updated at doubling gaps, then local steps with
    compressed synchronisations (module docstring)."""

    def __init__(self, params, cfg: OptimConfig, freeze_step: int) -> None:
        super().__init__(params, cfg, freeze_step)
        self.stale_from = min(freeze_step, cfg.variance_gap_doubles_after) + 1
        self.gap_doubles_after = cfg.variance_gap_doubles_after
        self.interval_doubles_after = cfg.sync_interval_doubles_after
        self.interval_max = cfg.sync_interval_max
        for group in self.param_groups:
            group.setdefault("local_steps", 0)  # since the last synchronisation
            group.setdefault("lr_sum", 0.0)  # sum of lr c2 / c1 over them
            group.setdefault("decay", 1.0)  # product of their weight-decay factors
        self.synced: dict[torch.Tensor, torch.Tensor] = {}
        """Parameter -> its value at the last synchronisation, taken at the first local
        step after it (or after a load, which follows one)."""

    def _exact(self, step: int) -> bool:
        """Whether step `step` updates the variance: T_v, the gaps 1, 2, 4, ... each taken
        `gap_doubles_after` times, up to the freeze."""
        if step > self.freeze_step:
            return False
        start, gap = 0, 1
        while step > start + gap * self.gap_doubles_after:
            start, gap = start + gap * self.gap_doubles_after, 2 * gap
        return (step - start) % gap == 0

    @property
    def frozen(self) -> bool:
        """Whether the next step's gradients travel compressed (a step with the variance
        frozen, before the local steps)."""
        step = self.param_groups[0]["step"] + 1
        return step <= self.freeze_step and not self._exact(step)

    @property
    def local(self) -> bool:
        """Whether the next step's gradients stay on their rank (a local step)."""
        return self.param_groups[0]["step"] + 1 > self.freeze_step

    @property
    def steps_since_freeze(self) -> int:
        return self.param_groups[0]["step"] - self.freeze_step

    @property
    def sync_due(self) -> bool:
        """Whether the step just taken ends a synchronisation interval."""
        after = self.steps_since_freeze
        if after <= 0:
            return False
        interval = min(self.interval_max, 2 ** ((after - 1) // self.interval_doubles_after))
        return after % interval == 0

    @property
    def unsynced(self) -> bool:
        """Whether local steps were taken since the last synchronisation."""
        return any(group["local_steps"] for group in self.param_groups)

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        if group["step"] > self.freeze_step:
            for p in params:
                if p not in self.synced:
                    self.synced[p] = p.detach().clone()
            group["local_steps"] += 1
            group["lr_sum"] += group["lr"] * self._scale(group)
            group["decay"] *= 1 - group["lr"] * group["weight_decay"]
        super()._step_group(group, params)

    @torch.no_grad()
    def synchronise(self, averaged: dict[torch.Tensor, torch.Tensor]) -> None:
        """Take the ranks' mean displacement since the last synchronisation (`averaged`:
        parameter -> mean of synced - p, overwritten here) as every rank's parameters and
        momentum ([Note: 0/1 Adam's synchronisation]). Called for some of the parameters at a
        time, then `synchronised` once."""
        for group in self.param_groups:
            decay, lr_sum = group["decay"], group["lr_sum"]
            eps = group["eps"] * self._variance_correction(group)
            for p in group["params"]:
                if p not in averaged:
                    continue
                state, synced = self.state[p], self.synced[p]
                drift = averaged[p].sub_(synced, alpha=1 - decay)
                drift.mul_(state["exp_avg_sq"] > 0)  # the momentum mask: decay only
                p.copy_(synced).mul_(decay).sub_(drift)
                if lr_sum > 0:
                    denom = torch.sqrt(state["exp_avg_sq"]).add_(eps)
                    torch.mul(drift, denom, out=state["exp_avg"]).div_(lr_sum)
                else:  # a learning rate of 0 all interval: no step to take a momentum from
                    state["exp_avg"].zero_()
                synced.copy_(p)

    def synchronised(self) -> None:
        """A synchronisation is complete: a new interval of local steps starts."""
        for group in self.param_groups:
            group["local_steps"], group["lr_sum"], group["decay"] = 0, 0.0, 1.0

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.synced.clear()  # a checkpoint is taken synchronised: its parameters
