from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shardwise.data.sampler import BatchIterator, DistributedBatchSampler, TokenDataset
from shardwise.errors import CheckpointError, ConfigError, DataError

SEQ_LEN = 4
NUM_SAMPLES = 50
GLOBAL_BATCH = 8  # 6 steps per epoch, 2 samples dropped


def _dataset(num_samples: int = NUM_SAMPLES) -> TokenDataset:
    tokens = (np.arange(num_samples * SEQ_LEN + 1) % 251).astype(np.uint8)
    return TokenDataset(tokens, SEQ_LEN)


def _iterator(dp_rank: int = 0, dp_size: int = 1, seed: int = 0) -> BatchIterator:
    sampler = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, dp_rank, dp_size, seed)
    return BatchIterator(_dataset(), sampler)


def _indices(sampler: DistributedBatchSampler, steps: int) -> list[list[int]]:
    return [sampler.next_indices().tolist() for _ in range(steps)]


def test_windows_are_non_overlapping_and_targets_are_shifted_inputs():
    tokens = np.arange(23, dtype=np.uint8)
    dataset = TokenDataset(tokens, seq_len=5)
    assert len(dataset) == 4  # (23 - 1) // 5
    inputs, targets = dataset[2]
    assert inputs.dtype == torch.int64 and inputs.tolist() == [10, 11, 12, 13, 14]
    assert targets.tolist() == [11, 12, 13, 14, 15]
    last_inputs, last_targets = dataset[3]
    assert last_targets.tolist()[-1] == 20


def test_batches_have_rank_shape_and_shifted_targets():
    inputs, targets = _iterator(dp_rank=1, dp_size=4).next_batch()
    assert inputs.shape == targets.shape == (GLOBAL_BATCH // 4, SEQ_LEN)
    assert inputs.dtype == targets.dtype == torch.int64
    assert torch.equal(inputs[:, 1:], targets[:, :-1])


@pytest.mark.parametrize("dp_size", [2, 4, 8])
def test_union_of_ranks_is_the_single_process_batch(dp_size):
    single = _iterator()
    ranks = [_iterator(r, dp_size) for r in range(dp_size)]
    for _ in range(14):  # crosses two epoch boundaries
        expected = single.next_batch()
        parts = [it.next_batch() for it in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), expected[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), expected[1])


def test_different_seeds_give_different_orders():
    a = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, 0, 1, seed=0)
    b = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, 0, 1, seed=1)
    again = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, 0, 1, seed=0)
    first = _indices(a, 3)
    assert first != _indices(b, 3)
    assert first == _indices(again, 3)


def test_epochs_advance_drop_the_remainder_and_reshuffle():
    it = _iterator()
    assert it.steps_per_epoch == 6 and it.epoch == 0
    sampler = it.sampler
    epoch0 = [i for step in _indices(sampler, 6) for i in step]
    assert it.epoch == 1
    epoch1 = [i for step in _indices(sampler, 6) for i in step]
    assert it.epoch == 2
    for seen in (epoch0, epoch1):
        assert len(seen) == len(set(seen)) == 48
        assert set(seen) <= set(range(NUM_SAMPLES))
    assert epoch0 != epoch1


def test_resume_mid_run_gives_the_same_batches():
    reference = _iterator(seed=7)
    for _ in range(4):
        reference.next_batch()
    state = json.loads(json.dumps(reference.state_dict()))  # plain ints: any checkpoint format
    assert {"epoch", "step_in_epoch", "seed"} <= state.keys()
    resumed = _iterator(seed=7)
    resumed.load_state_dict(state)
    for _ in range(10):
        expected, got = reference.next_batch(), resumed.next_batch()
        assert torch.equal(expected[0], got[0]) and torch.equal(expected[1], got[1])


def test_resume_with_a_different_dp_degree_keeps_the_global_order():
    reference = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, 0, 1, seed=3)
    _indices(reference, 5)
    state = reference.state_dict()
    ranks = [DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, r, 2, seed=3) for r in (0, 1)]
    for sampler in ranks:
        sampler.load_state_dict(state)
    for _ in range(4):
        expected = reference.next_indices().tolist()
        assert ranks[0].next_indices().tolist() + ranks[1].next_indices().tolist() == expected


def test_resume_with_different_settings_is_refused():
    state = DistributedBatchSampler(NUM_SAMPLES, GLOBAL_BATCH, 0, 1, seed=0).state_dict()
    other = DistributedBatchSampler(NUM_SAMPLES, 16, 0, 1, seed=0)
    with pytest.raises(CheckpointError, match="global_batch=8 but this run has global_batch=16"):
        other.load_state_dict(state)


def test_global_batch_must_divide_over_ranks():
    with pytest.raises(ConfigError, match="global_batch=10 is not divisible by .* degree 4"):
        DistributedBatchSampler(NUM_SAMPLES, 10, 0, 4, seed=0)
    with pytest.raises(ConfigError, match="dp_rank"):
        DistributedBatchSampler(NUM_SAMPLES, 8, 2, 2, seed=0)


def test_corpus_smaller_than_one_global_batch():
    dataset = TokenDataset(np.zeros(12 * 128 + 1, dtype=np.uint8), seq_len=128)
    sampler = DistributedBatchSampler(len(dataset), 64, 0, 1, seed=0)
    with pytest.raises(DataError) as info:
        BatchIterator(dataset, sampler)
    assert str(info.value) == (
        "corpus has 12 sequences of 128 tokens; one global batch needs 64: lower "
        "train.global_batch/micro_batch or data.seq_len, or add data"
    )
