"""Local text sources: a .txt or .jsonl file, or a directory of them, read as UTF-8 bytes.

Documents (a text file, or the text field of one JSON line) are joined with a newline. Bytes
are kept as they are on disk, so the byte tokenizer sees exactly the file's contents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from shardwise.errors import DataError

DataFormat = Literal["auto", "text", "jsonl"]

_SUFFIXES = (".txt", ".jsonl")
"""File name endings picked up from a directory."""


def load_text(
    path: str | None,
    format: DataFormat = "auto",
    jsonl_field: str = "text",
    max_bytes: int = 8_000_000,
    start: bytes = b"",
) -> bytes:
    """The text at `path` (a file or a directory of .txt/.jsonl files), at most `max_bytes`,
    each document (a text file, a JSON line) preceded by `start`, which no document may hold.

    `format` "auto" reads files ending in .jsonl as JSON lines and everything else as text.
    A directory's files are read in order of their relative POSIX path; reading stops as
    soon as `max_bytes` are in hand.
    """
    if path is None:
        raise DataError(
            "data.path is not set; data.source='file' needs a .txt/.jsonl file or a directory"
        )
    root = Path(path)
    if not root.exists():
        raise DataError(f"data.path={path!r} does not exist")
    files = _data_files(root) if root.is_dir() else [root]
    parts: list[bytes] = []
    remaining = max_bytes
    for file in files:
        if remaining <= 0:
            break
        kind = _format_of(file) if format == "auto" else format
        documents = (
            _read_jsonl(file, jsonl_field, remaining)
            if kind == "jsonl"
            else _read_text(file, remaining)
        )
        for doc in documents:
            if start and start in doc:
                raise DataError(
                    f"data file {str(file)!r} holds byte {start[0]}, which starts every "
                    "document under data.pack_documents=true; remove it or leave packing off"
                )
            chunk = start + (doc if doc.endswith(b"\n") else doc + b"\n")
            parts.append(chunk)
            remaining -= len(chunk)
    text = b"".join(parts)[:max_bytes]
    if not text:
        what = "holds only empty .txt/.jsonl files" if root.is_dir() else "is empty"
        raise DataError(f"data.path={path!r} {what}")
    return text


def _data_files(root: Path) -> list[Path]:
    files = sorted(
        (p for p in root.rglob("*") if p.is_file() and p.name.endswith(_SUFFIXES)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise DataError(f"data.path={str(root)!r} is a directory with no .txt or .jsonl files")
    return files


def _format_of(file: Path) -> Literal["text", "jsonl"]:
    return "jsonl" if file.suffix == ".jsonl" else "text"


def _read_text(file: Path, max_bytes: int) -> list[bytes]:
    try:
        with open(file, "rb") as handle:
            data = handle.read(max_bytes)
    except OSError as err:
        raise DataError(f"data file {str(file)!r} cannot be read: {err.strerror}") from None
    return [data] if data else []


def _read_jsonl(file: Path, field: str, max_bytes: int) -> list[bytes]:
    """The `field` of each non-blank line, until `max_bytes` are read."""
    documents: list[bytes] = []
    total = 0
    try:
        handle = open(file, "rb")
    except OSError as err:
        raise DataError(f"data file {str(file)!r} cannot be read: {err.strerror}") from None
    with handle:
        for line_no, line in enumerate(handle, start=1):
            if total >= max_bytes:
                break
            if not line.strip():
                continue
            doc = _field_of_line(line, field, f"data file {str(file)!r} line {line_no}")
            if doc:
                documents.append(doc)
                total += len(doc) + 1
    return documents


def _field_of_line(line: bytes, field: str, where: str) -> bytes:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where} is not valid JSON: {err.msg} (column {err.colno})") from None
    except UnicodeDecodeError:
        raise DataError(f"{where} is not valid UTF-8") from None
    if not isinstance(record, dict):
        raise DataError(f"{where} is a JSON {type(record).__name__}, not an object")
    if field not in record:
        fields = ", ".join(record) or "(none)"
        raise DataError(
            f"{where} has no field {field!r}; fields: {fields}; set data.jsonl_field to one"
        )
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} is a {type(value).__name__}, not a string")
    return value.encode("utf-8")
