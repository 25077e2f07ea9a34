"""Byte-level tokenizer: each UTF-8 byte is one token; any text encodes, nothing is learned."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import torch

DOCUMENT_TOKEN = 0
"""Token that starts every document of a packed corpus (``data.pack_documents``): the NUL
byte, which text does not hold."""


def document_ids(tokens: torch.Tensor) -> torch.Tensor:
    """Each token's document in packed sequences [B, T]: how many documents have started up
    to and including it (a document's `DOCUMENT_TOKEN` belongs to it)."""
    return torch.cumsum(tokens == DOCUMENT_TOKEN, dim=1)


class ByteTokenizer:
    """Token ids are the bytes of the UTF-8 encoding (vocabulary of 256)."""

    vocab_size = 256

    def encode(self, text: str | bytes) -> npt.NDArray[np.uint8]:
        """Token ids of `text` (a str is UTF-8 encoded first), as a writable uint8 array."""
        data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
        # frombuffer views the immutable bytes; copy so torch.from_numpy gets a writable array.
        return np.frombuffer(data, dtype=np.uint8).copy()

    def decode(self, tokens: npt.ArrayLike) -> str:
        """Text of the token ids; byte sequences that are not valid UTF-8 become U+FFFD."""
        data = np.asarray(tokens).astype(np.uint8, copy=False).tobytes()
        return data.decode("utf-8", errors="replace")
