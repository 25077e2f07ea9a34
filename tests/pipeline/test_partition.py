"""Splitting blocks into pipeline stages (pipeline/partition.py): contiguous, balanced."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from shardwise.errors import ConfigError
from shardwise.models.spec import ModelSpec, PipelineCalls
from shardwise.pipeline.costs import counted_flops, profile_parts
from shardwise.pipeline.partition import balanced_split
from shardwise.pipeline.schedules import build_schedule
from shardwise.pipeline.stage import stage_blocks

GPIPE_3, GPIPE_4 = build_schedule("gpipe", 3, 3, 1), build_schedule("gpipe", 4, 4, 1)
"""Schedules whose stages hold alike (every micro-batch): weights play no part."""


def brute_force_best(
    costs: list[int], stages: int, first: int = 0, last: int = 0, weights=None
) -> int:
    """The smallest largest-stage cost over every contiguous split (the first stage counting
    `first` more, the last `last`, each stage's total times its weight)."""
    weights = weights or [1] * stages
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), stages - 1):
        bounds = (0, *cuts, len(costs))
        totals = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        totals[0] += first
        totals[-1] += last
        largest = max(t * w for t, w in zip(totals, weights, strict=True))
        best = largest if best is None else min(best, largest)
    return best


@pytest.mark.parametrize(
    ("costs", "stages"),
    [
        ([1] * 8, 2),
        ([1] * 8, 4),
        ([1] * 7, 3),
        ([5, 1, 1, 1, 1, 5], 3),
        ([3, 9, 2, 2, 7, 1, 4], 4),
        ([0, 0, 4, 0], 2),
        ([2, 2], 2),
    ],
)
def test_split_is_contiguous_covering_and_optimal(costs, stages):
    split = balanced_split(costs, stages)
    assert len(split) == stages and all(len(r) > 0 for r in split)
    assert [i for r in split for i in r] == list(range(len(costs)))
    assert max(sum(costs[i] for i in r) for r in split) == brute_force_best(costs, stages)


@pytest.mark.parametrize(
    ("costs", "stages", "first", "last"),
    [
        ([1] * 8, 4, 0, 3),  # a large head: the last stage takes fewer blocks
        ([1] * 8, 2, 2, 2),
        ([3, 9, 2, 2, 7, 1, 4], 3, 5, 0),
        ([4, 4, 4, 4], 4, 1, 9),  # one block each, whatever the head costs
        ([2, 1, 2], 1, 3, 3),
    ],
)
def test_first_and_last_stage_costs_count(costs, stages, first, last):
    split = balanced_split(costs, stages, first, last)
    assert len(split) == stages and all(len(r) > 0 for r in split)
    assert [i for r in split for i in r] == list(range(len(costs)))
    totals = [sum(costs[i] for i in r) for r in split]
    totals[0] += first
    totals[-1] += last
    assert max(totals) == brute_force_best(costs, stages, first, last)


@pytest.mark.parametrize(
    ("costs", "weights", "first", "last"),
    [
        ([1] * 8, [2, 1], 0, 0),
        ([1] * 12, [4, 3, 2, 1], 1, 2),  # 1F1B's in-flight counts over 4 stages
        ([3, 9, 2, 2, 7, 1, 4], [3, 2, 1], 5, 0),
        ([5, 1, 1, 1, 1, 5], [1, 4, 1], 0, 3),
    ],
)
def test_weighted_stages_are_optimal(costs, weights, first, last):
    stages = len(weights)
    split = balanced_split(costs, stages, first, last, weights)
    assert [i for r in split for i in r] == list(range(len(costs)))
    totals = [sum(costs[i] for i in r) for r in split]
    totals[0] += first
    totals[-1] += last
    largest = max(t * w for t, w in zip(totals, weights, strict=True))
    assert largest == brute_force_best(costs, stages, first, last, weights)


def test_a_costly_head_leaves_the_last_stage_one_block():
    split = balanced_split([1] * 8, 4, last=3)
    assert split[-1] == range(7, 8) and balanced_split([1] * 8, 4)[-1] == range(6, 8)


def test_equal_layers_split_equally():
    assert balanced_split([1] * 8, 4) == [range(0, 2), range(2, 4), range(4, 6), range(6, 8)]


def test_more_stages_than_blocks_is_one_line():
    with pytest.raises(ConfigError, match="4 pipeline stages need at least 4 blocks") as info:
        balanced_split([1, 1, 1], 4)
    assert "\n" not in str(info.value)


# -- pipeline.partition = "flops" ([Note: partition by FLOPs] in pipeline/stage.py) ----------


class _Widths(nn.Module):
    """Blocks of unequal cost: block i is a d x d linear map applied `repeats[i]` times."""

    def __init__(self, repeats: list[int], d: int = 16, vocab: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(_Repeated(d, r) for r in repeats)
        self.head = nn.Linear(d, vocab, bias=False)


class _Repeated(nn.Module):
    def __init__(self, d: int, repeats: int) -> None:
        super().__init__()
        self.linear, self.repeats = nn.Linear(d, d, bias=False), repeats

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for _ in range(self.repeats):
            x = self.linear(x)
        return x


def _widths_spec(model: _Widths) -> ModelSpec:
    return ModelSpec(
        blocks="blocks",
        embedding="embed",
        head="head",
        pipeline=PipelineCalls(
            embed=lambda m, ids: m.embed(ids),
            finish=lambda m, x: m.head(x),
            first=("embed",),
            last=("head",),
            hidden_size=16,
        ),
    )


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_flops_are_counted_on_the_meta_device_as_the_closed_form(device):
    """A d x d matmul over T tokens: 2 T d^2 forward, twice that backward (input and weight
    gradients); the embedding's lookup counts nothing. A materialised model is neither run
    nor changed."""
    with torch.device(device):
        model = _Widths([1, 3, 2])
    costs, first, last = counted_flops(_widths_spec(model), model, list(model.blocks), 10)
    per_matmul = 6 * 10 * 16 * 16
    assert costs == [per_matmul, 3 * per_matmul, 2 * per_matmul]
    assert (first, last) == (0, 6 * 10 * 16 * 64)
    assert all(p.grad is None and p.device.type == device for p in model.parameters())


def test_flops_partition_balances_unequal_blocks_and_the_head():
    """In units of one matmul block: blocks [1, 1, 6, 1, 1, 1, 1] and a head of 3 (vocabulary
    3 d); equal blocks and that head over 4 stages."""
    model = _Widths([1, 1, 6, 1, 1, 1, 1], vocab=48)
    spec = _widths_spec(model)
    costs, _, head = counted_flops(spec, model, list(model.blocks), 10)

    def slowest(split: list[range]) -> float:
        totals = [sum(costs[i] for i in r) for r in split]
        totals[-1] += head
        return max(totals) / costs[0]

    assert slowest(stage_blocks(spec, model, GPIPE_3, "layers", (1, 10))) == 8
    assert slowest(stage_blocks(spec, model, GPIPE_3, "flops", (1, 10))) == 7  # the optimum
    model = _Widths([1] * 8, vocab=48)
    spec = _widths_spec(model)
    assert stage_blocks(spec, model, GPIPE_4, "layers", (1, 10))[-1] == range(6, 8)
    assert stage_blocks(spec, model, GPIPE_4, "flops", (1, 10))[-1] == range(7, 8)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_profile_measures_each_part_alone_and_counts_its_saved_activations(device):
    """A block of r chained d x d linears saves its r inputs, [B, T, d] each; the head saves
    its input, the embedding its token ids. Each part runs on fresh tensors: the model may be
    on the meta device, and a materialised one is neither run nor changed."""
    with torch.device(device):
        model = _Widths([1, 3, 2])
    profile = profile_parts(_widths_spec(model), model, list(model.blocks), (2, 10), torch.float32)
    activation = 2 * 10 * 16 * 4
    assert [b.saved_bytes for b in profile.blocks] == [activation, 3 * activation, 2 * activation]
    assert (profile.embedding.saved_bytes, profile.head.saved_bytes) == (2 * 10 * 8, activation)
    assert all(p.seconds > 0 for p in (*profile.blocks, profile.embedding, profile.head))
    assert all(p.grad is None and p.device.type == device for p in model.parameters())


def test_memory_partition_balances_the_measured_activations():
    """Activations in units of one block's: [1, 1, 6, 1, 1, 1, 1] and a head of 1; the
    heaviest block gets a stage of its own, as the optimum over 3 stages (6) asks."""
    model = _Widths([1, 1, 6, 1, 1, 1, 1], vocab=48)
    split = stage_blocks(_widths_spec(model), model, GPIPE_3, "memory", (1, 10))
    assert split == [range(0, 2), range(2, 3), range(3, 7)]


def test_memory_partition_weighs_each_stage_by_the_micro_batches_it_holds():
    """1F1B over 2 stages holds 2 micro-batches' activations on the first, 1 on the last:
    8 equal blocks split 3 | 5 (2 x 3 against 5 + the head's 1), not 4 | 4 (8 against 5)."""
    model = _Widths([1] * 8)
    spec = _widths_spec(model)
    one_f_one_b = build_schedule("1f1b", 2, 4, 1)
    assert one_f_one_b.in_flight_peak() == [2, 1]
    assert stage_blocks(spec, model, one_f_one_b, "memory", (1, 10)) == [range(0, 3), range(3, 8)]
    assert stage_blocks(spec, model, one_f_one_b, "layers", (1, 10)) == [range(0, 4), range(4, 8)]
