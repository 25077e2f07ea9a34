from __future__ import annotations

import json

import pytest
import torch

from shardwise.config import DataConfig
from shardwise.data import build_data, document_ids
from shardwise.errors import DataError


def test_embedded_source_gives_rank_batches():
    cfg = DataConfig(seq_len=16, max_bytes=20_000)
    single = build_data(cfg, global_batch=8, dp_rank=0, dp_size=1, seed=5)
    rank1 = build_data(cfg, global_batch=8, dp_rank=1, dp_size=2, seed=5)
    inputs, targets = single.next_batch()
    assert inputs.shape == (8, 16) and inputs.dtype == torch.int64
    assert single.steps_per_epoch == (20_000 - 1) // 16 // 8
    assert torch.equal(rank1.next_batch()[1], targets[4:])


def test_file_source_reads_jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": "x" * 40}) + "\n" for _ in range(4)))
    cfg = DataConfig(source="file", path=str(path), seq_len=8)
    it = build_data(cfg, global_batch=4, dp_rank=0, dp_size=1, seed=0)
    assert it.steps_per_epoch == (4 * 41 - 1) // 8 // 4


def test_file_source_without_path():
    with pytest.raises(DataError, match="data.path is not set"):
        build_data(DataConfig(source="file"), global_batch=4, dp_rank=0, dp_size=1, seed=0)


def test_too_small_file_names_the_sizes(tmp_path):
    path = tmp_path / "small.txt"
    path.write_bytes(b"a" * (12 * 128 + 1))
    cfg = DataConfig(source="file", path=str(path), seq_len=128)
    with pytest.raises(DataError, match="corpus has 12 sequences of 128 tokens; .* needs 64"):
        build_data(cfg, global_batch=64, dp_rank=0, dp_size=1, seed=0)


def test_packed_documents_start_with_the_document_token(tmp_path):
    """``pack_documents``: each JSON line starts with token 0; `document_ids` counts them."""
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("abc", "de", "fghij")))
    cfg = DataConfig(source="file", path=str(path), seq_len=14, pack_documents=True)
    inputs, targets = build_data(cfg, global_batch=1, dp_rank=0, dp_size=1, seed=0).next_batch()
    assert bytes(inputs[0].tolist()) == b"\0abc\n\0de\n\0fghi"
    assert document_ids(inputs).tolist() == [[1] * 5 + [2] * 4 + [3] * 5]
    embedded = DataConfig(seq_len=16, max_bytes=20_000, pack_documents=True)
    text = bytes(build_data(embedded, 1, 0, 1, 0).dataset.tokens.tolist())
    assert text.startswith(b"\0# file: ") and text.count(b"\0# file: ") == text.count(b"\0")


def test_a_document_holding_the_document_token_is_refused(tmp_path):
    path = tmp_path / "nul.txt"
    path.write_bytes(b"a\0b" * 100)
    cfg = DataConfig(source="file", path=str(path), seq_len=8, pack_documents=True)
    with pytest.raises(DataError, match="holds byte 0, which starts every document"):
        build_data(cfg, global_batch=1, dp_rank=0, dp_size=1, seed=0)
