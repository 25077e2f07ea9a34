"""The reference GPT decoder: plain PyTorch, no distributed code.

Parallelism is applied from outside by module name, so the attribute names here are a
contract: ``embed``, ``pos_embed``, ``drop``, ``blocks.{i}.{norm1,attn.qkv,attn.core,attn.proj,
norm2,mlp.{gate,up,down}}``, ``norm_f``, ``head`` (its `ModelSpec` is `gpt_spec`, beside the
plans in gpt_plans.py). Forward passes never hard-code the head count or
hidden sizes of a projection's output; they infer them from the tensors, so a column-sharded
``qkv`` or ``mlp.up`` (Megatron, Shoeybi et al. 2019, sec. 3) runs the same code.

Construction is meta-safe: `build_gpt` builds on the meta device, allocates with ``to_empty``
and fills the weights with `init_weights`, which draws from a CPU generator so the result does
not depend on the device.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shardwise.config import ModelConfig
from shardwise.errors import ConfigError

PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (4, 128, 4),
    "mini": (8, 512, 8),  # ~25M parameters; the benchmark model
    "small": (12, 768, 12),
    "medium": (24, 1024, 16),
    "large": (24, 1536, 16),
    "xl": (24, 2048, 16),  # ~1.3B parameters
}
"""Size presets: name -> (n_layers, d_model, n_heads)."""

POSITIONS = ("rope", "learned")
MLPS = ("gelu", "swiglu")
ROPE_BASE = 10_000.0
"""RoPE frequency base theta (Su et al. 2021, eq. 15)."""


@dataclass(frozen=True)
class GPTConfig:
    """Shape and regularisation of a `GPT`; checked on construction."""

    vocab_size: int = 256
    """Vocabulary size in tokens."""
    seq_len: int = 128
    """Longest sequence in tokens (size of the learned position table)."""
    n_layers: int = 4
    """Transformer blocks."""
    d_model: int = 128
    """Hidden size in elements."""
    n_heads: int = 4
    """Attention heads; divides d_model."""
    d_ff: int = 512
    """MLP hidden size in elements."""
    positions: str = "rope"
    """Position encoding: "rope" (rotary) or "learned" (a table of seq_len vectors)."""
    mlp: str = "gelu"
    """MLP flavour: "gelu" (up, down) or "swiglu" (gate, up, down)."""
    tie_embeddings: bool = True
    """The output head shares its weight Parameter with the token embedding."""
    dropout: float = 0.0
    """Dropout probability on embeddings, attention weights and residual branches."""
    init_std: float = 0.02
    """Standard deviation of the normal weight init (residual outputs are scaled down)."""

    def __post_init__(self) -> None:
        _check(self)

    @property
    def head_dim(self) -> int:
        """Elements per attention head."""
        return self.d_model // self.n_heads


def _check(cfg: GPTConfig) -> None:
    if cfg.positions not in POSITIONS:
        raise ConfigError(f"model.positions={cfg.positions!r} is unknown; use one of {POSITIONS}")
    if cfg.mlp not in MLPS:
        raise ConfigError(f"model.mlp={cfg.mlp!r} is unknown; use one of {MLPS}")
    rope = cfg.positions == "rope"
    # Heads that split d_model evenly (and, for RoPE, into even head_dims, since RoPE rotates
    # pairs of elements).
    fits = [h for h in range(1, cfg.d_model + 1) if cfg.d_model % h == 0]
    fits_rope = [h for h in fits if (cfg.d_model // h) % 2 == 0]
    if cfg.d_model % cfg.n_heads:
        valid = ", ".join(map(str, fits_rope if rope and fits_rope else fits))
        raise ConfigError(
            f"model.n_heads={cfg.n_heads} does not divide d_model={cfg.d_model}; use one of {valid}"
        )
    if rope and cfg.head_dim % 2:
        hint = f"n_heads in {', '.join(map(str, fits_rope))} or " if fits_rope else ""
        raise ConfigError(
            f"model.d_model={cfg.d_model} / n_heads={cfg.n_heads} gives an odd head_dim="
            f"{cfg.head_dim}, but rope rotates pairs; use {hint}positions='learned'"
        )


def default_d_ff(d_model: int, mlp: str) -> int:
    """MLP hidden size in elements: 4*d (GELU) or 8/3*d rounded up to 64 (SwiGLU).

    SwiGLU has three matrices instead of two, so 8/3*d keeps the parameter count of a 4*d
    GELU MLP (Shazeer 2020, sec. 2); the multiple of 64 keeps matmul tiles full.
    """
    if mlp == "swiglu":
        return 64 * math.ceil(round(8 * d_model / 3) / 64)
    return 4 * d_model


def gpt_config_from(model_cfg: ModelConfig, seq_len: int) -> GPTConfig:
    """The `GPTConfig` of a validated model section: the preset, then explicit overrides."""
    if model_cfg.preset not in PRESETS:
        raise ConfigError(
            f"model.preset={model_cfg.preset!r} is unknown; use one of {', '.join(PRESETS)}"
        )
    n_layers, d_model, n_heads = PRESETS[model_cfg.preset]
    n_layers = model_cfg.n_layers or n_layers
    d_model = model_cfg.d_model or d_model
    n_heads = model_cfg.n_heads or n_heads
    return GPTConfig(
        vocab_size=model_cfg.vocab_size,
        seq_len=seq_len,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        d_ff=model_cfg.d_ff or default_d_ff(d_model, model_cfg.mlp),
        positions=model_cfg.positions,
        mlp=model_cfg.mlp,
        tie_embeddings=model_cfg.tie_embeddings,
        dropout=model_cfg.dropout,
        init_std=model_cfg.init_std,
    )


def rope_tables(
    positions: torch.Tensor, head_dim: int, *, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles at `positions` [T], each [T, head_dim // 2], in `dtype`.

    Angles are computed in fp32 and only then cast: positions above 256 are not exact in
    bf16, and an angle error grows with the position.
    """
    device = positions.device
    freqs = ROPE_BASE ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim
    )
    angles = torch.outer(positions.to(torch.float32), freqs)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i + head_dim/2}) of x [B, H, T, head_dim] by the position angle.

    The half-split pairing (GPT-NeoX) is equivalent to the interleaved one of the paper up to
    a fixed permutation of the head dimension, and needs no strided views.
    """
    first, second = x.chunk(2, dim=-1)
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)


class AttentionCore(nn.Module):
    """Causal scaled-dot-product attention of q, k, v [B, H, T, head_dim]: the parameter-free
    core that sequence parallelism (ring, Ulysses) or block-sparse attention replace. With
    `documents` ([B, T], each token's document: packed sequences) a token sees the earlier
    tokens of its own document only."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.dropout = dropout

    def forward(self, q: Tensor, k: Tensor, v: Tensor, documents: Tensor | None = None) -> Tensor:
        dropout = self.dropout if self.training else 0.0
        if documents is None:
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True)
        mask = (documents[:, :, None] == documents[:, None, :]).tril_()  # same document, causal
        return F.scaled_dot_product_attention(q, k, v, mask[:, None], dropout_p=dropout)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention with one fused q/k/v projection."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        self.rope = cfg.positions == "rope"
        self.dropout = cfg.dropout
        self.core = AttentionCore(cfg.dropout)
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]; `positions` [T] of the tokens in the whole
        sequence (default 0..T-1; a sequence-parallel rank holds other parts); `documents`
        [B, whole sequence]: each token's document, by position (see `AttentionCore`)."""
        qkv = self.qkv(x)
        # The qkv output is [q | k | v]; the head count comes from its width and the shape
        # from the output, not x, so that a tensor-parallel shard holding [q_local | k_local |
        # v_local] (of a sequence gathered from shards under sequence parallelism) runs
        # unchanged.
        batch, seq, _ = qkv.shape
        q, k, v = (
            part.view(batch, seq, -1, self.head_dim).transpose(1, 2)
            for part in qkv.chunk(3, dim=-1)
        )
        if self.rope:
            if positions is None:
                positions = torch.arange(seq, device=q.device)
            cos, sin = rope_tables(positions, self.head_dim, dtype=q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = self.core(q, k, v, documents).transpose(1, 2).reshape(batch, seq, -1)
        return F.dropout(self.proj(out), self.dropout, self.training)


class MLP(nn.Module):
    """Position-wise feed-forward: GELU (up, down) or SwiGLU (gate, up, down)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.swiglu = cfg.mlp == "swiglu"
        self.dropout = cfg.dropout
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model]."""
        if self.swiglu:
            hidden = F.silu(self.gate(x)) * self.up(x)
        else:
            hidden = F.gelu(self.up(x))
        return F.dropout(self.down(hidden), self.dropout, self.training)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then + mlp(norm2(x))."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.d_model)
        self.mlp = MLP(cfg)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, T, d_model] -> [B, T, d_model] (`positions`, `documents`: see
        CausalSelfAttention)."""
        x = x + self.attn(self.norm1(x), positions, documents)
        return x + self.mlp(self.norm2(x))


class GPT(nn.Module):
    """Decoder-only transformer: token ids [B, T] -> next-token logits [B, T, vocab_size].

    Built on the current default device; weights are torch's defaults until `init_weights`.
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.positions == "learned":
            self.pos_embed = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()

    @torch.no_grad()
    def init_parameter(self, name: str, tensor: torch.Tensor, seed: int) -> None:
        """Fill the parameter called `name` in place, deterministically in (`seed`, `name`).

        Linear and Embedding weights ~ N(0, init_std); residual outputs (``attn.proj``,
        ``mlp.down``) ~ N(0, init_std / sqrt(2 * n_layers)) so the residual stream's variance does
        not grow with depth (GPT-2, Radford et al. 2019, sec. 2.3); LayerNorm weight 1, bias 0.
        Each parameter draws from its own CPU generator seeded by `seed` and its name, so any
        subset can be filled alone (ZeRO-3 fills one shard unit at a time) on any device.
        """
        if ".norm" in f".{name}":
            tensor.fill_(1.0 if name.endswith("weight") else 0.0)
        elif name.endswith("weight"):
            residual = name.endswith(("attn.proj.weight", "mlp.down.weight"))
            std = (
                self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
                if residual
                else self.cfg.init_std
            )
            # mt19937 keeps 32 bits of a seed: mix seed and name into them.
            mixed = zlib.crc32(f"{seed}:{name}".encode())
            generator = torch.Generator(device="cpu").manual_seed(mixed)
            values = torch.empty(tensor.shape, dtype=torch.float32)
            tensor.copy_(values.normal_(0.0, std, generator=generator))
        else:
            tensor.zero_()

    def tie_weights(self) -> None:
        """Make ``head.weight`` the very Parameter of ``embed.weight`` (if tie_embeddings).

        Call again after ``to_empty``: it allocates one new Parameter per module, which unties.
        """
        if self.cfg.tie_embeddings:
            self.head.weight = self.embed.weight

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        documents: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """idx [B, T] (int64 token ids, T <= seq_len) -> logits [B, T, vocab_size].
        `positions` [T]: each token's place in the whole sequence (default 0..T-1; under
        sequence parallelism a rank holds a part of the sequence). `documents` [B, whole
        sequence]: each token's document by position, for packed sequences (attention stays
        inside documents; ``data.pack_documents``)."""
        x = self.embed_tokens(idx, positions)
        for block in self.blocks:
            x = block(x, positions, documents)
        return self.finish(x)

    def embed_tokens(
        self, idx: torch.Tensor, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """idx [B, T] -> hidden states [B, T, d_model]: what the blocks take (the first
        pipeline stage runs this)."""
        seq = idx.shape[1]
        if seq > self.cfg.seq_len:
            raise ValueError(f"sequence of {seq} tokens exceeds seq_len={self.cfg.seq_len}")
        x = self.embed(idx)
        if self.cfg.positions == "learned":
            where = torch.arange(seq, device=idx.device) if positions is None else positions
            x = x + self.pos_embed(where)
        return self.drop(x)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, T, d_model] -> logits [B, T, vocab_size] (the last stage's)."""
        return self.head(self.norm_f(x))


def build_gpt(
    model_cfg: ModelConfig,
    seq_len: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> GPT:
    """A GPT built on the meta device, allocated on `device` and initialised from `seed`
    (left on the meta device, uninitialised, when `device` is "meta").

    Nothing is allocated before ``to_empty``, so the weights are allocated once, directly on
    `device`; the CPU only ever holds the init values of one parameter at a time.
    """
    cfg = gpt_config_from(model_cfg, seq_len)
    with torch.device("meta"):
        model = GPT(cfg)
    if torch.device(device).type == "meta":
        return model  # filled later, e.g. shard by shard: see `GPT.init_parameter`
    model.to_empty(device=device)
    model.tie_weights()
    init_weights(model, seed)
    return model


def init_weights(model: GPT, seed: int) -> None:
    """Fill every parameter of `model` (`GPT.init_parameter`); a tied weight is filled once,
    under its first name (``embed.weight``)."""
    for name, param in model.named_parameters():
        model.init_parameter(name, param, seed)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements, counting a shared (tied) Parameter once."""
    # parameters() de-duplicates by object identity, so the tied head adds nothing.
    return sum(param.numel() for param in model.parameters())
