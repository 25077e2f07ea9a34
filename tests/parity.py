"""The single-process reference every parallel configuration is checked against.

The reference is ordinary PyTorch (no shardwise engine, reducer, ZeRO or precision code): the
same model, seed, data and AdamW; gradients of micro-batches summed, clipped with
torch.nn.utils.clip_grad_norm_, then one optimizer step. `engine_run` runs on every rank of
a test pool, each rank training on its rows of the same global batches.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from shardwise.attention import apply_document_masks, apply_sparse_attention, sparse_attention
from shardwise.config import Config
from shardwise.data.tokenizer import DOCUMENT_TOKEN
from shardwise.engine import initialize
from shardwise.models import spec_of
from shardwise.models.gpt import build_gpt
from shardwise.models.hf import build_hf
from shardwise.optim import lr_multiplier, param_groups

STEPS = 5
BF16_RTOL = 2e-2
"""bf16 rounds parameters to 8 mantissa bits after every step (fp32 master weights keep the
update exact), so 5-step losses drift from fp32 by about 2^-8 relative; 2e-2 bounds it."""
PARAM_RTOL = 5e-5
"""fp32 parameters after 5 Adam steps, tensor-wise: the loss bound (1e-5) plus room for a
different summation order. Measured: up to 1.2e-5 for hierarchical ZeRO-2 (reduce-scatter, then
all-reduce across replicas) on an AVX2 AMD EPYC; ~1e-7 for most layouts."""
SEQ = 16
TINY = {"n_layers": 2, "d_model": 32, "n_heads": 4}

NO_CORE_MODEL = Path(__file__).parent / "models" / "gpt_neox_tiny.json"
"""A Hugging Face config (``model.hf_config``) of GPT-NeoX, whose spec is discovered: it has
no attention core and no positions keyword."""


def make_config(**train) -> Config:
    return Config().replace(
        model=TINY,
        data={"seq_len": SEQ},
        zero={"stage": train.pop("zero_stage", 0)},
        precision={
            "dtype": train.pop("dtype", "fp32"),
            "reduce_dtype": train.pop("reduce_dtype", "fp32"),
        },
        optim={"lr": 1e-2, "warmup_steps": 2, "grad_clip": train.pop("grad_clip", 0.05)},
        train={"steps": STEPS, **train},
    )


DOCUMENT_STARTS = [0, 3, 4, 9, 14]
"""Where each row of `global_batches` starts a document under ``data.pack_documents``."""


def global_batches(cfg: Config, steps: int = STEPS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` global batches of random tokens; packed documents start at `DOCUMENT_STARTS`
    under ``data.pack_documents`` (other tokens are never 0 then)."""
    gen = torch.Generator().manual_seed(7)
    batch = cfg.train.global_batch
    rows = [torch.randint(0, 256, (batch, SEQ + 1), generator=gen) for _ in range(steps)]
    if cfg.data.pack_documents:
        for row in rows:
            row[row == DOCUMENT_TOKEN] = 1
            row[:, DOCUMENT_STARTS] = DOCUMENT_TOKEN
    return [(r[:, :-1], r[:, 1:]) for r in rows]


def build_model(cfg: Config, freeze: bool = False) -> torch.nn.Module:
    """The config's GPT, or its Hugging Face model (``model.name = "hf"``)."""
    if cfg.model.name == "hf":
        return build_hf(cfg.model, SEQ, device="cpu", seed=cfg.train.seed)
    model = build_gpt(cfg.model, SEQ, device="cpu", seed=cfg.train.seed)
    if freeze:
        model.blocks[0].mlp.up.weight.requires_grad_(False)
    return model


def reference_run(cfg: Config, freeze: bool = False) -> tuple[list[float], dict]:
    """Single process, plain torch: micro-batches accumulate, then clip and step. With
    ``attention.kind = 'sparse'`` the model's attention cores are the block-sparse op's; with
    ``data.pack_documents`` the model takes each token's document (dense masks). With
    ``offload.delayed_update`` = k AdamW steps a copy of the model, written into the model
    after each step before k, and from step k on after the next step's backward (each step
    computes with the weights from before the previous step's update)."""
    model = build_model(cfg, freeze)
    if cfg.attention.kind == "sparse":
        attention = sparse_attention(cfg.attention, SEQ)
        apply_sparse_attention(model, spec_of(model), attention)
    if cfg.data.pack_documents:
        apply_document_masks(model, spec_of(model))
    delayed_from = cfg.offload.delayed_update
    delayed = delayed_from > 0
    stepped = copy.deepcopy(model) if delayed else model
    opt_cfg = cfg.optim
    opt = torch.optim.AdamW(
        param_groups(stepped, opt_cfg.weight_decay),
        lr=opt_cfg.lr,
        betas=opt_cfg.betas,
        eps=opt_cfg.eps,
        fused=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier(opt_cfg, cfg.train.steps))
    accum = cfg.train.global_batch // cfg.train.micro_batch
    losses = []
    for step, (inputs, targets) in enumerate(global_batches(cfg), start=1):
        opt.zero_grad()
        model.zero_grad()  # its own when delayed
        total = 0.0
        for x, y in zip(inputs.chunk(accum), targets.chunk(accum), strict=True):
            out = model(x)
            logits = out.logits if cfg.model.name == "hf" else out
            loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            (loss / accum).backward()
            total += loss.item()
        if delayed:
            for mine, theirs in zip(stepped.parameters(), model.parameters(), strict=True):
                mine.grad = theirs.grad.clone() if theirs.grad is not None else None
            if step >= delayed_from:
                model.load_state_dict(stepped.state_dict())  # the previous step's update
        params = [p for p in stepped.parameters() if p.requires_grad]
        torch.nn.utils.clip_grad_norm_(params, opt_cfg.grad_clip)
        opt.step()
        sched.step()
        if delayed and step < delayed_from:
            model.load_state_dict(stepped.state_dict())  # this step's, in place
        losses.append(total / accum)
    return losses, {k: v.detach().clone() for k, v in stepped.state_dict().items()}


def train_rows(engine, cfg: Config) -> tuple[list[float], dict]:
    """Train `engine` on this rank's rows of `global_batches`; losses and the final weights."""
    rank, world = dist.get_rank(), dist.get_world_size()
    losses = []
    for inputs, targets in global_batches(cfg):
        rows = inputs.shape[0] // world
        part = slice(rank * rows, (rank + 1) * rows)
        losses.append(engine.train_step((inputs[part], targets[part])))
    return losses, {k: v.float() for k, v in engine.full_state_dict().items()}


def engine_run(cfg: Config, freeze: bool = False) -> tuple[list[float], dict]:
    """Runs on every rank of the pool: each rank trains on its slice of the global batch."""
    return train_rows(initialize(build_model(cfg, freeze), None, cfg), cfg)


def train_then_resume(
    out_dir: str, stage: int, dtype: str = "bf16", steps: int = 4, every: int = 2, **sections
) -> tuple[list[float], list[float]]:
    """Through the trainer: `steps` steps with a checkpoint every `every`, then again from
    the first. `sections` are further config sections (a parallel layout, offload
    settings)."""
    from pathlib import Path

    from shardwise.run_plan import resolve
    from shardwise.trainer import train

    fixed = {"train": {"steps": steps}, "checkpoint": {"every": every}}
    cfg = make_config(micro_batch=1, global_batch=2, zero_stage=stage, dtype=dtype).replace(
        data={"max_bytes": 20_000},
        log={"progress": False},
        **{**sections, **{k: {**v, **sections.get(k, {})} for k, v in fixed.items()}},
    )
    out = Path(out_dir)
    plan = resolve(cfg, dist.get_world_size())
    full = train(plan, out).losses
    resumed = train(plan, out, resume=out / "checkpoints" / f"step_{every:08d}").losses
    return full, resumed


def assert_parity(got: tuple, want: tuple, rtol: float, param_rtol: float = PARAM_RTOL) -> None:
    """Losses element-wise within `rtol`; parameters tensor-wise:
    ||got - want|| <= max(rtol, param_rtol) * ||want||.

    Element-wise relative error is ill-posed for parameters: Adam turns a 1-ulp difference in
    a near-zero gradient (summation order of a norm or an all-reduce) into a full-size update
    difference on that element, while the tensor as a whole agrees to ~1e-7.
    """
    got_losses, got_state = got
    want_losses, want_state = want
    torch.testing.assert_close(
        torch.tensor(got_losses), torch.tensor(want_losses), rtol=rtol, atol=0
    )
    param_rtol = max(rtol, param_rtol)
    for name, tensor in want_state.items():
        error = torch.linalg.vector_norm(got_state[name] - tensor) / torch.linalg.vector_norm(
            tensor
        )
        assert error <= param_rtol, f"{name}: relative error {error:.2e} > {param_rtol:.0e}"
