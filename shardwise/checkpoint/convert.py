"""`shardwise convert`: a checkpoint of any layout to one safetensors file, or to a Hugging
Face model directory, streamed one full tensor at a time; and ``model.init_from``: a run
started from such weights (`initial_weights`).

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
from pathlib import Path

import torch
from torch import nn

from shardwise.checkpoint.io import find_checkpoint, read_json, shard_files
from shardwise.checkpoint.shards import MASTER, MODEL, OPTIM, ShardReader, raw_bytes
from shardwise.errors import CheckpointError, ConfigError
from shardwise.zero.optimizer import ParamInit

TARGETS = ("safetensors", "hf")

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


def write_safetensors(path: Path, reader: ShardReader, tensors: dict[str, tuple[str, str]]) -> int:
    """Write `tensors` (exported name -> checkpoint key) into one safetensors file at
    `path`, one tensor in memory at a time. Returns the largest tensor's bytes."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = largest = 0
    for exported, key in sorted(tensors.items()):
        shape, dtype = reader.shape_and_dtype(*key)
        nbytes = shape.numel() * dtype.itemsize
        header[exported] = {
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
        for _, key in sorted(tensors.items()):
            file.write(raw_bytes(reader.full(*key).contiguous()))
    reader.verify()
    tmp.replace(path)
    return largest


def convert(source: Path, dest: Path, to: str, config_file: Path | None) -> Path:
    """Export the checkpoint at `source` as `to` into `dest` (a file for safetensors, a
    directory for hf); returns what was written."""
    if to not in TARGETS:
        raise CheckpointError(f"--to {to!r}: expected one of {', '.join(TARGETS)}")
    ckpt = find_checkpoint(source)
    world = read_json(ckpt / "manifest.json")["world_size"]
    with ShardReader(*shard_files(ckpt, world)) as reader:
        tensors = model_tensors(reader)
        if to == "safetensors":
            dest.parent.mkdir(parents=True, exist_ok=True)
            write_safetensors(dest, reader, tensors)
            return dest
        hf_config = _hf_config(ckpt, config_file)
        dest.mkdir(parents=True, exist_ok=True)
        write_safetensors(dest / "model.safetensors", reader, tensors)
    (dest / "config.json").write_text(json.dumps(hf_config, indent=2))
    return dest


def read_full_tensors(source: Path) -> dict[tuple[str, str], torch.Tensor]:
    """Every full tensor of the checkpoint at `source`, by ``(kind, name)``, all in memory
    (for small models and tests; `convert` streams)."""
    ckpt = find_checkpoint(source)
    world = read_json(ckpt / "manifest.json")["world_size"]
    with ShardReader(*shard_files(ckpt, world)) as reader:
        tensors = {key: reader.full(*key).clone() for key in reader.keys()}
        reader.verify()
    return tensors


def _hf_config(ckpt: Path, config_file: Path | None) -> dict:
    """The run's Hugging Face config.json contents (``model.name='hf'`` runs only)."""
    from shardwise.config import Config
    from shardwise.models.hf import hf_config_dict

    if config_file is None:
        config_file = next(
            (d / "config.toml" for d in ckpt.parents[:2] if (d / "config.toml").is_file()), None
        )
    if config_file is None:
        raise CheckpointError(f"no config.toml of the run found above {str(ckpt)!r}; pass --config")
    model = Config.from_file(config_file, []).model
    if model.name != "hf":
        raise CheckpointError(
            f"--to hf exports Hugging Face models (model.name='hf'); this run trained "
            f"model.name={model.name!r}: use --to safetensors"
        )
    return {**hf_config_dict(model.hf_config), "torch_dtype": "float32"}


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


def initial_weights(model: nn.Module, source: Path) -> ParamInit | None:
    """Load `source`'s weights into `model`'s materialised tensors now; for parameters still
    on the meta device return the `param_init` that reads each when the store builds it (so
    a sharded model never holds the whole). Every tensor of the model must be in the file,
    and nothing else."""
    path = source / "model.safetensors" if source.is_dir() else source
    if not path.is_file():
        raise ConfigError(f"model.init_from={str(source)!r}: no safetensors file there")
    header, data_start = read_safetensors_index(path)
    dtypes = {code: dtype for dtype, code in _DTYPES.items()}
    by_name = {}
    for name, tensor in [*model.named_parameters(remove_duplicate=False), *_buffers(model)]:
        by_name.setdefault(id(tensor), []).append(name)
    missing = [names[0] for names in by_name.values() if not set(names) & set(header)]
    extra = sorted(set(header) - {n for names in by_name.values() for n in names})
    if missing or extra:
        raise ConfigError(
            f"model.init_from={str(source)!r} does not fit the model: missing {missing[:3]}, "
            f"unexpected {extra[:3]}"
        )

    def fill(name: str, tensor: torch.Tensor) -> None:
        entry = header[name]
        begin, end = entry["data_offsets"]
        data = bytearray(end - begin)
        with open(path, "rb") as file:
            file.seek(data_start + begin)
            file.readinto(data)
        if list(tensor.shape) != entry["shape"]:
            raise ConfigError(
                f"model.init_from: {name!r} has shape {entry['shape']}, the model's "
                f"{list(tensor.shape)}"
            )
        if data:  # frombuffer refuses an empty buffer
            tensor.copy_(torch.frombuffer(data, dtype=dtypes[entry["dtype"]]).view(tensor.shape))

    aliases = {
        name: next(n for n in names if n in header) for names in by_name.values() for name in names
    }
    with torch.no_grad():
        for name, tensor in [*model.named_parameters(), *_buffers(model)]:
            if not tensor.is_meta:
                fill(aliases[name], tensor)
    if not any(p.is_meta for p in model.parameters()):
        return None
    return lambda name, tensor: fill(aliases[name], tensor)


def _buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The persistent buffers (those a state dict holds)."""
    persistent = set(model.state_dict())
    return [(name, b) for name, b in model.named_buffers() if name in persistent]
