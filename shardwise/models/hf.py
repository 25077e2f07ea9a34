"""Hugging Face causal LMs (GPT-2, LLaMA): built from a config, with their specs and 1D plans.

The models are ``transformers``' own classes with their forward code untouched: the plans
below name their modules and split them from outside (`shardwise.tensor_parallel`), like the
reference GPT's. transformers is an optional extra (``pip install 'shardwise[hf]'``): it is
imported inside the functions, never by importing this module.

[Note: hf attention cores] Sequence parallelism and block-sparse attention replace a model's
attention *core*, the parameter-free module mapping (q, k, v) to the output (`ModelSpec.
attention`). HF's attention modules have none: they call an attention function picked by
name (``config._attn_implementation``). `build_hf` gives each attention module a `core`
(the reference GPT's `AttentionCore`) and builds the model with `ATTN_IMPLEMENTATION`, a
function registered with transformers' `AttentionInterface`: while the module's core is the
plain one it runs HF's own sdpa attention (masks and all, the numbers of ``"sdpa"``, whose
mask builder it registers too); once replaced, or given packed sequences' documents (the
``documents`` keyword of the model's forward, which HF passes down to its attention
function), it calls the core on q, k, v (key/value heads repeated to the query heads) and
the documents, and ignores HF's mask: the cores are causal (and keep to documents) over the
whole sequence, whose positions HF sees only in part under sequence parallelism. A model
built elsewhere has no cores, and its spec declares no documents.

[Note: hf loss] The plans gather the head's output (``lm_head`` column-parallel with
``gather_output``): every tp rank holds the full logits, so the model's own forward computes
its loss from ``labels=`` and ``output.logits`` is whole. The plans therefore bring no loss
(``Plan.loss`` is None) and the ordinary cross-entropy applies. This costs a [tokens, vocab]
all-gather per step that the reference GPT's vocab-parallel loss avoids.
"""

from __future__ import annotations

import fnmatch
import json
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shardwise.config import ModelConfig
from shardwise.distributed.dims import ParallelDims, fitting_tp_degrees
from shardwise.errors import ConfigError
from shardwise.models.gpt import AttentionCore
from shardwise.models.spec import ModelSpec, PipelineCalls, SpecBuilder
from shardwise.tensor_parallel.conv1d import ColwiseParallelConv1D, RowwiseParallelConv1D
from shardwise.tensor_parallel.one_d import (
    ColwiseParallel,
    LocalSizes,
    RowwiseParallel,
    VocabParallel,
)
from shardwise.tensor_parallel.plan import Plan

HF_PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-tiny": {
        "model_type": "gpt2",
        "n_layer": 2,
        "n_embd": 64,
        "n_head": 4,
        "vocab_size": 256,
        "n_positions": 64,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        # The byte tokenizer has no special tokens; GPT-2's 50256 is outside its vocabulary.
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "llama-tiny": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 256,
        "max_position_embeddings": 64,
        "tie_word_embeddings": False,
    },
}
"""Built-in tiny configs (``model.hf_config``), as config.json would hold them."""

ATTN_IMPLEMENTATION = "shardwise"
"""The attention function the models are built with, registered by `build_hf` ([Note: hf
attention cores]); set explicitly, not left to HF's choice."""

ATTENTION_MODULES = {"gpt2": "transformer.h.*.attn", "llama": "model.layers.*.self_attn"}
"""``model_type`` -> the pattern of its attention modules, each given a `core`."""

HF_MISSING = "model.name='hf' needs transformers: pip install 'shardwise[hf]'"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(HF_MISSING) from None
    return transformers


def hf_config_dict(hf_config: str | None) -> dict[str, Any]:
    """The config.json contents named by ``model.hf_config``: a preset or a file/directory."""
    if hf_config is None:
        raise ConfigError(
            f"model.name='hf' needs model.hf_config: one of {', '.join(HF_PRESETS)} or the "
            "path of a config.json"
        )
    if hf_config in HF_PRESETS:
        return dict(HF_PRESETS[hf_config])
    path = Path(hf_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(
            f"model.hf_config={hf_config!r} is neither a built-in config "
            f"({', '.join(HF_PRESETS)}) nor a config.json or a directory holding one"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"model.hf_config={hf_config!r}: cannot read {path}: {err}") from None
    if not isinstance(data, dict) or "model_type" not in data:
        raise ConfigError(f"model.hf_config={hf_config!r}: {path} has no 'model_type'")
    return data


def build_hf(
    model_cfg: ModelConfig,
    seq_len: int,
    *,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> nn.Module:
    """The Hugging Face causal LM of ``model_cfg.hf_config``, initialised from `seed`.

    Built on the CPU by transformers' own init under ``torch.manual_seed(seed)`` (the caller's
    RNG state is restored after), then moved to `device`. HF initialises per module, not per
    parameter name, so the model cannot be filled shard by shard: with `device` "meta" it is
    built on the CPU all the same. The HF config decides the vocabulary (``model.vocab_size``
    is not read); it must cover the tokenizer's ids. The KV cache is off (training); the
    attention is `ATTN_IMPLEMENTATION` with a `core` per attention module for the model types
    of `ATTENTION_MODULES` ([Note: hf attention cores]), HF's sdpa otherwise.
    """
    transformers = _transformers()
    fields = hf_config_dict(model_cfg.hf_config)
    model_type = fields.pop("model_type")
    fields["use_cache"] = False
    fields.setdefault("loss_type", "ForCausalLM")  # its labels= loss; unset, HF warns
    where = f"model.hf_config={model_cfg.hf_config!r}"
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"{where}: {_first_line(err)}") from None
    limit = max_positions(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(
            f"data.seq_len={seq_len} exceeds the {limit} positions of {where}; "
            f"use data.seq_len <= {limit}"
        )
    pattern = ATTENTION_MODULES.get(model_type)
    if pattern is not None:
        _register_attention(transformers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                config, attn_implementation=ATTN_IMPLEMENTATION if pattern else "sdpa"
            )
        except ValueError as err:
            raise ConfigError(f"{where}: {_first_line(err)}") from None
    dropout = getattr(config, "attn_pdrop", getattr(config, "attention_dropout", 0.0))
    for name, module in model.named_modules():
        if pattern is not None and fnmatch.fnmatchcase(name, pattern):
            module.core = AttentionCore(dropout)  # the dropout SDPA applies (the checks read it)
    if torch.device(device).type != "meta":
        model.to(device)
    return model


def _register_attention(transformers: Any) -> None:
    """`ATTN_IMPLEMENTATION` in transformers' registries ([Note: hf attention cores])."""
    from transformers.masking_utils import sdpa_mask

    transformers.AttentionInterface.register(ATTN_IMPLEMENTATION, _core_attention)
    transformers.AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)


def _core_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """HF's attention function for `ATTN_IMPLEMENTATION`: q, k, v [B, heads, T, head_dim] ->
    ([B, T, heads, head_dim], no weights) ([Note: hf attention cores])."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    documents = kwargs.pop("documents", None)  # [B, T]: packed sequences' documents
    core = getattr(module, "core", None)  # none: a model built elsewhere, then given ours
    if core is None or (type(core) is AttentionCore and documents is None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    return core(query, key, value, documents).transpose(1, 2).contiguous(), None


def max_positions(config: Any) -> int | None:
    """Longest input an HF config allows (its position table's size), None if unbounded."""
    return getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


# ---------------------------------------------------------------------------------------------
# Specs and 1D tensor-parallel plans
# ---------------------------------------------------------------------------------------------


def check_hf_fits(sizes: dict[str, int], dims: ParallelDims, sequence_parallel: bool) -> None:
    """Refuse a layout the HF plans do not build, or sizes (HF config fields) that do not
    split over tp: one line naming the field, its value and the tp degrees that fit."""
    if dims.tp_mode != "1d":
        raise ConfigError(
            f"Hugging Face models split with parallel.tp_mode='1d' only, not "
            f"{dims.tp_mode!r}; set tp_mode='1d'"
        )
    if sequence_parallel:
        raise ConfigError(
            "parallel.tp_sequence_parallel is not supported for Hugging Face models (their "
            "forward builds masks for the whole sequence); set it to false"
        )
    broken = [(name, value) for name, value in sizes.items() if value % dims.tp]
    if not broken:
        return
    name, value = broken[0]
    fit = fitting_tp_degrees(dims, lambda d: all(size % d.tp == 0 for size in sizes.values()))
    raise ConfigError(
        f"the Hugging Face config's {name}={value} does not split over parallel.tp={dims.tp} "
        f"(tp_mode='1d' needs a multiple of {dims.tp}); tp degrees that fit: {fit}"
    )


def gpt2_tp_plan(
    config: Any, dims: ParallelDims, micro_batch: int, sequence_parallel: bool
) -> Plan:
    """GPT-2 in Megatron's layout ([Note: hf loss]): c_attn (q|k|v) and c_fc column-split,
    both c_proj row-split, the tied wte/lm_head split by vocabulary; each attention module's
    sizes set to its local heads (its forward splits c_attn's output by ``split_size``)."""
    if getattr(config, "add_cross_attention", False):
        raise ConfigError("GPT-2 with add_cross_attention is not split by the 1D plan")
    sizes = {
        "n_head": config.n_head,
        "n_inner": config.n_inner or 4 * config.n_embd,
        "vocab_size": config.vocab_size,
    }
    check_hf_fits(sizes, dims, sequence_parallel)
    layers = {
        "transformer.wte": VocabParallel(),
        "transformer.h.*.attn": LocalSizes(("split_size", "embed_dim", "num_heads")),
        "transformer.h.*.attn.c_attn": ColwiseParallelConv1D(fused=3),
        "transformer.h.*.attn.c_proj": RowwiseParallelConv1D(),
        "transformer.h.*.mlp.c_fc": ColwiseParallelConv1D(),
        "transformer.h.*.mlp.c_proj": RowwiseParallelConv1D(),
        "lm_head": ColwiseParallel(gather_output=True),
    }
    return Plan(mode="1d", layers=layers)


def llama_tp_plan(
    config: Any, dims: ParallelDims, micro_batch: int, sequence_parallel: bool
) -> Plan:
    """LLaMA in Megatron's layout ([Note: hf loss]): q/k/v and gate/up column-split, o/down
    row-split, embedding and head by vocabulary. Query and key/value heads split alike, so
    the attention's ``num_key_value_groups`` (heads per kv head) is the same on every rank
    and its forward reshapes with ``-1`` heads: no attribute changes."""
    sizes = {
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
    }
    check_hf_fits(sizes, dims, sequence_parallel)
    layers = {
        "model.embed_tokens": VocabParallel(),
        "model.layers.*.self_attn.q_proj": ColwiseParallel(),
        "model.layers.*.self_attn.k_proj": ColwiseParallel(),
        "model.layers.*.self_attn.v_proj": ColwiseParallel(),
        "model.layers.*.self_attn.o_proj": RowwiseParallel(),
        "model.layers.*.mlp.gate_proj": ColwiseParallel(),
        "model.layers.*.mlp.up_proj": ColwiseParallel(),
        "model.layers.*.mlp.down_proj": RowwiseParallel(),
        "lm_head": ColwiseParallel(gather_output=True),
    }
    return Plan(mode="1d", layers=layers)


def gpt2_spec(model: nn.Module) -> ModelSpec:
    """``GPT2LMHeadModel``'s structure and plans. Its attention cores ([Note: hf attention
    cores]) only where it scales scores as SDPA does (by 1/sqrt(head_dim)), which the cores
    replacing them do."""
    config = model.config
    sdpa_scale = config.scale_attn_weights and not config.scale_attn_by_inverse_layer_idx
    return ModelSpec(
        blocks="transformer.h",
        embedding="transformer.wte",
        head="lm_head",
        attention=f"{ATTENTION_MODULES['gpt2']}.core" if sdpa_scale else None,
        heads=config.n_head,
        positions="position_ids",
        positions_rows=True,
        documents="documents" if _has_cores(model) else None,
        max_seq_len=max_positions(model.config),
        tp_plan=partial(gpt2_tp_plan, model.config),
        pipeline=PipelineCalls(
            embed=_gpt2_embed,
            finish=lambda m, x: m.lm_head(m.transformer.ln_f(x)),
            first=("transformer.wte", "transformer.wpe", "transformer.drop"),
            last=("transformer.ln_f", "lm_head"),
            hidden_size=model.config.n_embd,
        ),
    )


def _has_cores(model: nn.Module) -> bool:
    """Whether `build_hf` built `model`: its attention modules have cores, which its
    attention function hands the documents of packed sequences ([Note: hf attention
    cores])."""
    return model.config._attn_implementation == ATTN_IMPLEMENTATION


def _gpt2_embed(
    model: nn.Module, ids: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """What ``GPT2Model.forward`` does before its blocks, without a cache or masks (the blocks
    then attend causally, as the whole model does without an attention mask); `position_ids`
    [1, T]: the tokens' positions (this rank's under sequence parallelism), else 0..T-1."""
    t = model.transformer
    if position_ids is None:
        position_ids = torch.arange(ids.shape[1], device=ids.device)
    return t.drop(t.wte(ids) + t.wpe(position_ids))


def llama_spec(model: nn.Module) -> ModelSpec:
    """``LlamaForCausalLM``'s structure and plans."""
    return ModelSpec(
        blocks="model.layers",
        embedding="model.embed_tokens",
        head="lm_head",
        attention=f"{ATTENTION_MODULES['llama']}.core",
        heads=model.config.num_attention_heads,
        positions="position_ids",
        positions_rows=True,
        documents="documents" if _has_cores(model) else None,
        max_seq_len=max_positions(model.config),
        tp_plan=partial(llama_tp_plan, model.config),
        pipeline=PipelineCalls(
            embed=lambda m, ids, position_ids=None: m.model.embed_tokens(ids),
            finish=lambda m, x: m.lm_head(m.model.norm(x)),
            first=("model.embed_tokens",),
            last=("model.norm", "lm_head"),
            hidden_size=model.config.hidden_size,
            run_block=_llama_block,
        ),
    )


def _llama_block(
    model: nn.Module, layer: nn.Module, x: torch.Tensor, position_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """A decoder layer as ``LlamaModel.forward`` runs it: with the rotary tables of
    `position_ids` [1, T] (this rank's under sequence parallelism), else of 0..T-1 (the
    parameter-free ``rotary_emb`` stays on every stage)."""
    if position_ids is None:
        position_ids = torch.arange(x.shape[1], device=x.device).unsqueeze(0)
    return layer(x, position_embeddings=model.model.rotary_emb(x, position_ids))


HF_SPECS: dict[str, SpecBuilder] = {
    "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel": gpt2_spec,
    "transformers.models.llama.modeling_llama.LlamaForCausalLM": llama_spec,
}
"""Declared specs of the HF classes shardwise knows, by qualified class name: nothing imports
transformers until such a model exists."""
