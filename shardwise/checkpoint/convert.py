"""`shardwise convert`: a checkpoint of any layout to a one-process checkpoint (``single``,
`consolidate`), to one safetensors file, or to a Hugging Face model directory, streamed one
full tensor at a time; and ``model.init_from``: a run started from such weights
(`initial_weights`). (``--to layout:CONFIG`` loads and saves on CONFIG's ranks: cli.py.)

The model's parameters are exported from the master weights (fp32 where training kept fp32
masters of bf16/fp16 parameters), under their names in the unsplit model; buffers and frozen
parameters as saved. A weight tied to another (GPT's head) is exported once, under its first
name, as safetensors requires. The safetensors file is written by hand: its header (names,
dtypes, shapes, offsets) comes from the fragments' metadata, then each tensor's bytes are
assembled and appended, so the peak memory is about one full tensor
([Note: layout-free checkpoints], shards.py).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn

from shardwise.checkpoint.io import consolidate, find_checkpoint, read_json, shard_files
from shardwise.checkpoint.shards import (
    MASTER,
    MODEL,
    OPTIM,
    ShardReader,
    fit_problems,
    model_tensor_names,
    raw_bytes,
)
from shardwise.config import ModelConfig
from shardwise.errors import CheckpointError, ConfigError
from shardwise.models.gpt import gpt_config_from
from shardwise.zero.chunks.chunk import ParamInit

TARGETS = ("single", "safetensors", "hf")
"""What `convert` writes; ``layout:CONFIG`` is the CLI's (the layout's ranks save it)."""

_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def model_tensors(reader: ShardReader) -> dict[str, tuple[str, str]]:
    """Exported name -> (kind, name) in the checkpoint: parameters from their fp32 masters
    (the host optimizer's, where it kept them), the rest of the model's state as saved."""
    keys = set(reader.keys())
    chosen = {}
    for kind, name in keys:
        if kind == MODEL:
            chosen[name] = (kind, name)
        elif kind == MASTER:
            kept = (OPTIM + "master", name)
            chosen[name] = kept if kept in keys else (kind, name)
    return chosen


Export = tuple[torch.Size, torch.dtype, Callable[[], torch.Tensor]]
"""One exported tensor: its shape, dtype, and how to make it (assembled when written)."""


def as_saved(reader: ShardReader, tensors: dict[str, tuple[str, str]]) -> dict[str, Export]:
    """`tensors` (exported name -> checkpoint key) exported as the checkpoint holds them."""
    return {
        name: (*reader.shape_and_dtype(*key), partial(reader.full, *key))
        for name, key in tensors.items()
    }


def write_safetensors(path: Path, reader: ShardReader, exports: dict[str, Export]) -> int:
    """Write `exports` into one safetensors file at `path`, one tensor in memory at a time.
    Returns the largest tensor's bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = largest = 0
    for name, (shape, dtype, _) in sorted(exports.items()):
        nbytes = shape.numel() * dtype.itemsize
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
        largest = max(largest, nbytes)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as file:
        file.write(struct.pack("<Q", len(encoded)))
        file.write(encoded)
        for _, (_, _, make) in sorted(exports.items()):
            file.write(raw_bytes(make().contiguous()))
    reader.verify()
    tmp.replace(path)
    return largest


def convert(source: Path, dest: Path, to: str, config_file: Path | None) -> Path:
    """Export the checkpoint at `source` as `to` into `dest` (a file for safetensors, a
    directory for hf, a run directory for single); returns what was written."""
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r}: expected one of {', '.join(TARGETS)}, layout:CONFIG")
    ckpt = find_checkpoint(source)
    if to == "single":
        written = consolidate(ckpt, dest / "checkpoints")
        config = _run_config_file(ckpt, config_file, required=False)
        if config is not None:  # ``shardwise train --resume DST`` finds it
            (dest / "config.toml").write_text(config.read_text())
        return written
    world = read_json(ckpt / "manifest.json")["world_size"]
    with ShardReader(*shard_files(ckpt, world)) as reader:
        tensors = model_tensors(reader)
        if to == "safetensors":
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(dest, reader, as_saved(reader, tensors))
            return dest
        model = _run_model_config(ckpt, config_file)
        if model.name == "hf":
            from shardwise.models.hf import hf_config_dict

            exports = as_saved(reader, tensors)
            hf_config = {**hf_config_dict(model.hf_config), "torch_dtype": "float32"}
        else:
            exports, hf_config = gpt2_exports(reader, tensors, model)
        dest.mkdir(parents=True, exist_ok=True)
        write_safetensors(dest / "model.safetensors", reader, exports)
    (dest / "config.json").write_text(json.dumps(hf_config, indent=2))
    return dest


def gpt2_exports(
    reader: ShardReader, tensors: dict[str, tuple[str, str]], model: ModelConfig
) -> tuple[dict[str, Export], dict]:
    """The native GPT as a Hugging Face GPT-2: the same computation when positions are
    learned and the MLP is GELU (pre-norm blocks, LayerNorm eps 1e-5, q|k|v order, scale
    1/sqrt(head_dim)). Linear weights become Conv1D's (transposed); GPT-2's biases, which the
    GPT has none of, are zeros."""
    if model.name != "gpt" or model.positions != "learned" or model.mlp != "gelu":
        raise CheckpointError(
            "--to hf exports Hugging Face models (model.name='hf') and the native GPT as "
            "GPT-2, which needs model.positions='learned' and model.mlp='gelu' (this run: "
            f"name={model.name!r}, positions={model.positions!r}, mlp={model.mlp!r}); use "
            "--to safetensors"
        )
    exports: dict[str, Export] = {}

    def shape(ours: str) -> torch.Size:
        return reader.shape_and_dtype(*tensors[ours])[0]

    def same(ours: str, theirs: str) -> None:
        exports[theirs] = as_saved(reader, {theirs: tensors[ours]})[theirs]

    def conv1d(ours: str, theirs: str) -> None:
        key = tensors[ours]
        (rows, cols), dtype = reader.shape_and_dtype(*key)
        transposed = torch.Size([cols, rows])
        exports[theirs + ".weight"] = (transposed, dtype, lambda: reader.full(*key).t())
        zeros = partial(torch.zeros, rows, dtype=dtype)
        exports[theirs + ".bias"] = (torch.Size([rows]), dtype, zeros)

    same("embed.weight", "transformer.wte.weight")
    same("pos_embed.weight", "transformer.wpe.weight")
    layers = 1 + max(int(name.split(".")[1]) for name in tensors if name.startswith("blocks."))
    for i in range(layers):
        ours, theirs = f"blocks.{i}.", f"transformer.h.{i}."
        for norm, ln in (("norm1", "ln_1"), ("norm2", "ln_2")):
            same(ours + f"{norm}.weight", theirs + f"{ln}.weight")
            same(ours + f"{norm}.bias", theirs + f"{ln}.bias")
        conv1d(ours + "attn.qkv.weight", theirs + "attn.c_attn")
        conv1d(ours + "attn.proj.weight", theirs + "attn.c_proj")
        conv1d(ours + "mlp.up.weight", theirs + "mlp.c_fc")
        conv1d(ours + "mlp.down.weight", theirs + "mlp.c_proj")
    same("norm_f.weight", "transformer.ln_f.weight")
    same("norm_f.bias", "transformer.ln_f.bias")
    tied = "head.weight" not in tensors  # a tied head is exported once, as the embedding
    if not tied:
        same("head.weight", "lm_head.weight")
    vocab, d_model = shape("embed.weight")
    positions = shape("pos_embed.weight")[0]
    config = {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": vocab,
        "n_positions": positions,
        "n_embd": d_model,
        "n_layer": layers,
        "n_head": gpt_config_from(model, positions).n_heads,
        "n_inner": shape("blocks.0.mlp.up.weight")[0],
        "activation_function": "gelu",
        "layer_norm_epsilon": 1e-5,
        "resid_pdrop": model.dropout,
        "embd_pdrop": model.dropout,
        "attn_pdrop": model.dropout,
        "tie_word_embeddings": tied,
        "torch_dtype": "float32",
    }
    return exports, config


def read_full_tensors(source: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Every full tensor of the checkpoint at `source`, by ``(kind, name)``, all in memory
    (for small models and tests; `convert` streams)."""
    ckpt = find_checkpoint(source)
    world = read_json(ckpt / "manifest.json")["world_size"]
    with ShardReader(*shard_files(ckpt, world)) as reader:
        tensors = {key: reader.full(*key).clone() for key in reader.keys()}
        reader.verify()
    return tensors


def _run_config_file(ckpt: Path, config_file: Path | None, required: bool) -> Path | None:
    """The run's config.toml: `config_file` if given, else found above the checkpoint."""
    if config_file is None:
        config_file = next(
            (d / "config.toml" for d in ckpt.parents[:2] if (d / "config.toml").is_file()), None
        )
    if config_file is None and required:
        raise CheckpointError(f"no config.toml of the run found above {str(ckpt)!r}; pass --config")
    return config_file


def _run_model_config(ckpt: Path, config_file: Path | None) -> ModelConfig:
    """The model section of the run's config.toml (found above the checkpoint, or given)."""
    from shardwise.config import Config

    return Config.from_file(_run_config_file(ckpt, config_file, required=True), []).model


def read_safetensors_index(path: Path) -> tuple[dict[str, dict], int]:
    """The header of a safetensors file (name -> dtype, shape, offsets) and where its data
    starts."""
    try:
        with open(path, "rb") as file:
            (length,) = struct.unpack("<Q", file.read(8))
            header = json.loads(file.read(length))
    except (OSError, ValueError, struct.error) as exc:
        raise ConfigError(
            f"model.init_from: {str(path)!r} is not a safetensors file: {exc}"
        ) from None
    header.pop("__metadata__", None)
    return header, 8 + length


def init_from_index(source: Path, model: nn.Module) -> tuple[Path, dict[str, dict], int]:
    """The safetensors file ``model.init_from`` names, its header and where its data starts,
    after checking that it holds every tensor of `model` (built on the meta device will do)
    and nothing else: before launch, and again on each rank."""
    path = source / "model.safetensors" if source.is_dir() else source
    if not path.is_file():
        raise ConfigError(f"model.init_from={str(source)!r}: no safetensors file there")
    header, data_start = read_safetensors_index(path)
    problems = fit_problems({name: entry["shape"] for name, entry in header.items()}, model)
    if problems:
        raise ConfigError(
            f"model.init_from={str(source)!r} does not fit the model: it holds "
            f"{'; '.join(problems[:3])}"
        )
    return path, header, data_start


def initial_weights(model: nn.Module, source: Path) -> ParamInit | None:
    """Load `source`'s weights into `model`'s materialised tensors now; for parameters still
    on the meta device return the `param_init` that reads each when the store builds it (so
    a sharded model never holds the whole). Every tensor of the model must be in the file,
    and nothing else."""
    path, header, data_start = init_from_index(source, model)
    dtypes = {code: dtype for dtype, code in _DTYPES.items()}

    def fill(name: str, tensor: torch.Tensor) -> None:
        entry = header[name]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with open(path, "rb") as file:
            file.seek(data_start + begin)
            file.readinto(data)
        if data:  # frombuffer refuses an empty buffer
            tensor.copy_(torch.frombuffer(data, dtype=dtypes[entry["dtype"]]).view(tensor.shape))

    groups = model_tensor_names(model)
    aliases = {name: next(n for n in names if n in header) for names, _ in groups for name in names}
    with torch.no_grad():
        for names, tensor in groups:
            if not tensor.is_meta:
                fill(aliases[names[0]], tensor)
    if not any(p.is_meta for p in model.parameters()):
        return None
    return lambda name, tensor: fill(aliases[name], tensor)
