from __future__ import annotations

import numpy as np
import torch

from shardwise.data.tokenizer import ByteTokenizer


def test_round_trip_of_unicode_text():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x  # héllo, 世界 🙂\n"
    ids = tok.encode(text)
    assert ids.dtype == np.uint8 and ids.flags.writeable
    assert len(ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.decode(torch.from_numpy(ids)) == text


def test_bytes_encode_as_themselves_and_invalid_utf8_is_replaced():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256
    assert tok.encode(b"\x00\xffA").tolist() == [0, 255, 65]
    assert tok.decode(np.array([65, 0xFF, 66], dtype=np.uint8)) == "A\ufffdB"
