"""Training data: a text source, the byte tokenizer, and a resumable data-parallel sampler.

``build_data(cfg.data, global_batch, dp_rank, dp_size, seed)`` is the one entry point the
trainer needs; the pieces are exported for tests and for custom loops.
"""

from __future__ import annotations

from shardwise.config import DataConfig
from shardwise.data.corpus import embedded_corpus
from shardwise.data.loaders import load_text
from shardwise.data.sampler import BatchIterator, DistributedBatchSampler, TokenDataset
from shardwise.data.tokenizer import DOCUMENT_TOKEN, ByteTokenizer, document_ids

__all__ = [
    "BatchIterator",
    "ByteTokenizer",
    "DistributedBatchSampler",
    "TokenDataset",
    "build_data",
    "document_ids",
    "embedded_corpus",
    "load_text",
]


def build_data(
    data_cfg: DataConfig, global_batch: int, dp_rank: int, dp_size: int, seed: int
) -> BatchIterator:
    """This rank's batch iterator: `global_batch` sequences per step split over `dp_size`.

    Every rank reads and tokenizes the whole corpus (at most `data_cfg.max_bytes`, a few
    MB) and keeps only its own slice of each batch, so no rank waits on another.
    """
    start = bytes([DOCUMENT_TOKEN]) if data_cfg.pack_documents else b""
    if data_cfg.source == "embedded":
        text = embedded_corpus(data_cfg.max_bytes, start)
    else:
        text = load_text(
            data_cfg.path, data_cfg.format, data_cfg.jsonl_field, data_cfg.max_bytes, start
        )
    dataset = TokenDataset(ByteTokenizer().encode(text), data_cfg.seq_len)
    sampler = DistributedBatchSampler(len(dataset), global_batch, dp_rank, dp_size, seed)
    return BatchIterator(dataset, sampler)
