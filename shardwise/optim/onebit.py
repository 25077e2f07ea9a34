"""1-bit Adam: AdamW for a warm-up, then the variance frozen and gradients sent compressed.

Tang et al., "1-bit Adam: Communication Efficient Large-Scale Training with Adam's Convergence
Speed" (ICML 2021). Adam's variance stabilises early in training; once it is frozen the
update m / (sqrt(v) + eps) is linear in the gradients, and linear updates tolerate
error-compensated compression. So:

* steps 1 .. freeze_step: exactly AdamW (the same formula as torch.optim.AdamW: decoupled
  weight decay, bias corrections), on exactly reduced gradients;
* later steps: v stays as it was at freeze_step (its bias correction too); the momentum (at
  zero.stage 0; the gradient with ZeRO 1-2) travels compressed to one bit per element
  (shardwise/distributed/compressed.py, [Note: the compressed exchange]; [Note: compressed
  momentum] below): m = b1 m + (1 - b1) g, p -= lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^F))
  + eps);
* variance refresh (``optim.variance_refresh`` = k > 0): every k-th step after the freeze runs
  on exact gradients and updates v with that one sample standing for the k steps since the
  last update (v = b2^k v + (1 - b2^k) g^2), the bias correction moving to this step. A
  variance frozen at 20% of a short run was measured to cost 3% of final loss by itself
  (docs/onebit_adam.md); 0/1 Adam (Lu et al., 2022) updates the variance on a schedule for
  the same reason. k = 0 is the paper's 1-bit Adam. The error buffers are in gradient units,
  so a change of v leaves them valid.

Update bound (``optim.update_bound`` = b > 0): after the freeze each element's step
m_hat / (sqrt(v_hat) + eps) is clamped to [-b, b] (in units of lr). Adam bounds its own step:
a gradient that grows grows v with it, and a steady gradient gives a step of about 1. A frozen v
does not follow, so a gradient that grows after the freeze moves its elements by as much more.
On preset mini (lr 3e-3) that fed back into loss spikes and gradient norms of 10-100: a final
loss 1.34x AdamW's, and 1.43x with exact gradients, no compression at all (docs/onebit_adam.md).
Clamped at 1 (the step of a steady gradient) it ended 1.036x AdamW's. The bound is elementwise
on the owner's update, after the exchange, so the exchange stays linear in the gradients.

Momentum mask: an element whose gradient was exactly zero through the whole warm-up (v == 0,
e.g. embedding rows of tokens that never occur) would get compression noise in its momentum
and an update of noise / eps; its momentum is held at zero instead (DeepSpeed asks the user for
this mask; v == 0 states it exactly).

The step count lives in each param group (``group["step"]``), so it is saved with the
optimizer's state dict and a resumed run knows whether it is past the freeze.

[Note: compressed momentum] As in the paper (and DeepSpeed), a frozen step at zero.stage 0
averages the ranks' momenta, not their gradients: each rank forms b1 m + (1 - b1) g_r on its
own gradient g_r (its gradients are not reduced: the reducer's LOCAL exchange), the compressed
exchange averages these per bucket with error feedback, and the average becomes every rank's
momentum (`take_momentum` sets the gradient whose momentum update gives it, so the step
itself is unchanged). The shared b1 m dominates what is compressed, so its signs and scales
fit far better than a gradient's: on the default GPT run the final loss went from 1.013-1.017x
AdamW's (gradients compressed) to 0.979x, and on preset mini from 1.036x to 1.009x
(docs/onebit_adam.md). Each rank clips its own gradient (the norm of the local gradients), and
fp16 overflow flags are all-reduced over the data-parallel ranks, so all skip alike. With ZeRO
1-2 a rank holds the momentum of its slice only, so there the gradients travel compressed,
to the slice owners.

[Note: frozen denominators] Between two exact steps v does not change, so neither does the
denominator sqrt(v) + eps c2 of the frozen steps. It is computed at the first frozen step after
an exact one (or after a load) and kept (`denominators`, 4 bytes per element of the optimizer's
parameters, counted by the planner and `memory_report`; not saved: it is derived from v). Where
v == 0 the kept denominator is +inf, so the masked elements' step m / denominator is 0 without
a pass over m each step; their momentum, which the mask held at zero, is zeroed at the next
exact step instead, so every step's parameters are those of the formula (the same division,
bitwise), and only a checkpoint taken between exact steps holds the masked elements' unused
momentum. This halves the frozen step on a CPU (8 passes over memory per element -> 4).
"""

from __future__ import annotations

import math

import torch

from shardwise.config import OptimConfig


class OneBitAdam(torch.optim.Optimizer):
    """AdamW until `freeze_step`, then Adam with its variance frozen (module docstring)."""

    def __init__(self, params, cfg: OptimConfig, freeze_step: int) -> None:
        defaults = {
            "lr": cfg.lr,
            "betas": cfg.betas,
            "eps": cfg.eps,
            "weight_decay": 0.0,
            "step": 0,
            "variance_step": 0,
        }
        super().__init__(params, defaults)
        self.freeze_step = freeze_step
        self.stale_from = freeze_step + 1
        """The first step whose variance may be stale: steps from it on are bounded, and
        an exact step zeroes the momentum the mask held."""
        self.refresh = cfg.variance_refresh
        self.bound = cfg.update_bound
        self._beta1 = {p: group["betas"][0] for group in self.param_groups for p in group["params"]}
        self.denominators: dict[torch.Tensor, torch.Tensor] = {}
        """Parameter -> the denominator of its frozen steps ([Note: frozen denominators]);
        empty from each exact step until the next frozen one."""

    def _exact(self, step: int) -> bool:
        """Whether optimizer step `step` (1, 2, ...) runs on exact gradients and updates v."""
        after = step - self.freeze_step
        return after <= 0 or (self.refresh > 0 and after % self.refresh == 0)

    @property
    def frozen(self) -> bool:
        """Whether the next step's gradients travel compressed (the variance is frozen)."""
        return not self._exact(self.param_groups[0]["step"] + 1)

    @torch.no_grad()
    def local_momentum(self, p: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """This rank's momentum after the next step on its own gradient, b1 m + (1 - b1) g,
        written into `out` (flat) ([Note: compressed momentum])."""
        beta1 = self._beta1[p]
        m = self.state[p]["exp_avg"].view(-1)
        return torch.lerp(m, p.grad.view(-1), 1 - beta1, out=out)

    @torch.no_grad()
    def take_momentum(self, p: torch.Tensor, averaged: torch.Tensor) -> None:
        """Make the next step's momentum `averaged` (flat): the gradient whose momentum update
        b1 m + (1 - b1) g gives it, (averaged - b1 m) / (1 - b1), is written into ``p.grad``
        (in place: the local gradient is not needed any more)."""
        beta1, grad = self._beta1[p], p.grad
        torch.mul(self.state[p]["exp_avg"], beta1, out=grad)
        torch.sub(averaged.view_as(p), grad, out=grad).div_(1 - beta1)

    @torch.no_grad()
    def step(self, closure=None) -> None:
        for group in self.param_groups:
            group["step"] += 1
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._step_group(group, params)

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.denominators.clear()  # derived from the v just loaded

    def _step_group(self, group: dict, params: list[torch.Tensor]) -> None:
        """One parameter at a time, in one scratch buffer: the temporaries are a parameter's,
        reused, not the whole model's (fresh model-sized buffers made this step 2x slower on a
        CPU)."""
        step, lr, eps, decay = group["step"], group["lr"], group["eps"], group["weight_decay"]
        beta1, beta2 = group["betas"]
        exact = self._exact(step)
        weight = beta2 ** (step - group["variance_step"])  # v decays by b2 for each step
        if exact:
            group["variance_step"] = step
        correction2 = self._variance_correction(group)
        stale = step >= self.stale_from
        bound = self.bound if stale else 0.0
        scale = self._scale(group)
        scratch = params[0].new_empty(max(p.numel() for p in params), dtype=torch.float32)
        for p in params:
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            m, v = state["exp_avg"], state["exp_avg_sq"]
            buffer = scratch[: p.numel()].view_as(p)
            if decay:
                p.mul_(1 - lr * decay)
            if exact:
                self.denominators.pop(p, None)
                if stale:  # the momentum the frozen steps' mask held at zero
                    m.mul_(torch.gt(v, 0, out=buffer))
                m.lerp_(p.grad, 1 - beta1)
                # one sample stands for the steps since the last
                v.mul_(weight).addcmul_(p.grad, p.grad, value=1 - weight)
                denom = torch.sqrt(v, out=buffer).add_(eps * correction2)
            else:
                m.lerp_(p.grad, 1 - beta1)
                denom = self._frozen_denominator(p, v, eps * correction2)
            if bound:  # scale * clamp(m / denom, +-bound / scale): one pass fewer
                limit = bound / scale
                p.add_(torch.div(m, denom, out=buffer).clamp_(-limit, limit), alpha=-lr * scale)
            else:
                p.addcdiv_(m, denom, value=-lr * scale)

    @staticmethod
    def _variance_correction(group: dict) -> float:
        """c2 = sqrt(1 - b2^t_v), t_v the step of the variance's last update."""
        return math.sqrt(1 - group["betas"][1] ** group["variance_step"])

    @classmethod
    def _scale(cls, group: dict) -> float:
        """The step's factor on m / (sqrt(v) + c2 eps): both bias corrections, c2 / c1, since
        m / (sqrt(v) / c2 + eps) = c2 m / (sqrt(v) + c2 eps) (one pass fewer)."""
        return cls._variance_correction(group) / (1 - group["betas"][0] ** group["step"])

    def _frozen_denominator(self, p: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
        """sqrt(v) + eps, +inf where v == 0 (the momentum mask), kept until the next exact
        step ([Note: frozen denominators])."""
        if p not in self.denominators:
            denom = torch.sqrt(v).add_(eps)
            self.denominators[p] = denom.masked_fill_(v == 0, math.inf)
        return self.denominators[p]
