"""benchmarks.zero_memory: its formulas, one process's cases, and its JSON line.

The multi-rank jobs take ~30 s and are not run here (tests/zero/ checks the 4-rank formulas);
with one process every stage holds all of its state, so every case must measure 16Ψ.
"""

from __future__ import annotations

import math

import pytest
import torch

from benchmarks import zero_memory as zm
from shardwise.bench import BenchResult, result_record

# The ZeRO paper's closed forms (bytes per parameter on N ranks).
PAPER = {
    ("mixed", 0): lambda n: 16,
    ("mixed", 1): lambda n: 4 + 12 / n,
    ("mixed", 2): lambda n: 2 + 14 / n,
    ("mixed", 3): lambda n: 16 / n,
    ("fp32", 0): lambda n: 16,
    ("fp32", 1): lambda n: 8 + 8 / n,
    ("fp32", 2): lambda n: 4 + 12 / n,
    ("fp32", 3): lambda n: 16 / n,
}


@pytest.mark.parametrize("precision, stage", list(PAPER))
def test_category_table_sums_to_the_papers_formulas(precision, stage):
    for nproc in (1, 2, 4, 64):
        total = sum(zm.formula_per_param(precision, stage, nproc).values())
        assert total == pytest.approx(PAPER[precision, stage](nproc))


def test_formula_text_is_the_papers():
    texts = {(p, s): zm.formula_text(p, s) for p, s in PAPER}
    assert texts["mixed", 1] == "4Ψ + 12Ψ/N" and texts["mixed", 2] == "2Ψ + 14Ψ/N"
    assert texts["fp32", 1] == "8Ψ + 8Ψ/N" and texts["fp32", 2] == "4Ψ + 12Ψ/N"
    assert texts["mixed", 0] == texts["fp32", 0] == "16Ψ"
    assert texts["mixed", 3] == texts["fp32", 3] == "16Ψ/N"


@pytest.mark.parametrize("precision", list(zm.PRECISIONS))
def test_one_process_holds_16_bytes_per_param_at_every_stage(precision):
    settings = zm.Settings(n_layers=1, d_model=32, n_heads=2, seq_len=8)
    for stage in zm.STAGES:
        cross_check = stage == 3  # the object scan costs more than the case itself
        case = zm.measure_case(settings, precision, stage, 0, 1, torch.device("cpu"), cross_check)
        report, psi = case["report"], case["psi"]
        want = zm.formula_per_param(precision, stage, 1)
        for category, per_param in want.items():
            # Adam's step counters (4 bytes per parameter tensor) are the only extra.
            assert report[category] / psi == pytest.approx(per_param, rel=0.01, abs=1e-9)
        if cross_check:  # the engine keeps nothing the report leaves out (+ a few scalars)
            assert case["live_tensor_bytes"] == pytest.approx(sum(report.values()), rel=0.01)


def fake_records(excess: float) -> dict[int, dict]:
    """Worker records whose rank 0 of `mixed_stage2_n4` holds `excess` more than the formula."""
    psi = 1000
    records = {}
    for nproc in zm.NPROCS:
        cases = {}
        for precision in zm.PRECISIONS:
            for stage in zm.STAGES:
                per_param = zm.formula_per_param(precision, stage, nproc)
                ranks = []
                for rank in range(nproc):
                    report = {c: int(v * psi) for c, v in per_param.items()}
                    if (precision, stage, nproc, rank) == ("mixed", 2, 4, 0):
                        report["grads"] += int(excess * sum(per_param.values()) * psi)
                    ranks.append({"psi": psi, "report": report, "live_tensor_bytes": 0})
                cases[zm.case_key(precision, stage, nproc)] = ranks
        records[nproc] = {"cases": cases, "model": "gpt-fake", "device": "cpu"}
    return records


def test_json_line_has_a_ratio_per_case_and_ours_is_the_worst():
    result = zm.summarise(zm.QUICK, fake_records(excess=0.1))
    record = result_record("zero-memory", result)
    keys = {f"{p}_stage{s}_n{n}" for p in ("mixed", "fp32") for s in range(4) for n in (2, 4)}
    assert set(record["ratio"]) == set(record["peers"]) == keys
    assert record["ratio"]["mixed_stage2_n4"] == pytest.approx(1.1)
    assert all(
        v == pytest.approx(1.0) for k, v in record["ratio"].items() if k != "mixed_stage2_n4"
    )
    assert record["ours"] == pytest.approx(1.1)
    assert record["peers"]["mixed_stage2_n4"] == pytest.approx((2 + 14 / 4) * 1000)
    config = record["config"]
    assert config["worst_case"] == "mixed_stage2_n4" and not config["all_within_tolerance"]
    case = config["cases"]["mixed_stage2_n4"]
    assert case["formula"] == "2Ψ + 14Ψ/N"
    assert case["bytes_per_param"]["grads"] == pytest.approx(0.5 + 0.55)
    assert math.isclose(case["measured_bytes_spread_over_ranks"], 550)


def test_explicit_ratios_must_name_the_peers():
    with pytest.raises(ValueError, match="ratio keys"):
        BenchResult(metric="m", ours=1.0, peers={"a": 2.0}, ratio={"b": 1.0})
    with pytest.raises(ValueError, match="positive finite"):
        BenchResult(metric="m", ours=1.0, peers={"a": 2.0}, ratio={"a": float("nan")})
