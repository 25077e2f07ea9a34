"""Hugging Face GPT-2 and LLaMA (tiny configs, forward untouched) trained through the engine.

The reference is plain single-process HF training: the model's own loss (``labels=``), torch
AdamW as the caller gives it, the same batches. The engine gets the same AdamW factory, used
as given ([Note: a given optimizer] in run_plan.py), and dict batches, on two ranks: every
ZeRO stage, tensor parallelism (the models' 1D plans) and parameter chunks.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from shardwise.config import Config, ModelConfig
from shardwise.data.tokenizer import DOCUMENT_TOKEN, document_ids
from shardwise.distributed import comm
from shardwise.engine import initialize
from shardwise.errors import ConfigError
from shardwise.run_plan import resolve
from tests.parity import assert_parity

pytest.importorskip("transformers", reason="the HF models need transformers (the test extra)")

from shardwise.models.hf import build_hf  # noqa: E402

SEQ, STEPS, ROWS, LR = 16, 5, 4, 1e-2
MODELS = ("gpt2-tiny", "llama-tiny")


def hf_config(preset: str, *overrides: str) -> Config:
    base = ["model.name=hf", f"model.hf_config={preset}", f"data.seq_len={SEQ}"]
    base += ["train.micro_batch=2", "precision.dtype=fp32"]
    return Config.from_file(None, [*base, *overrides])


def batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(0, 256, (ROWS, SEQ), generator=generator) for _ in range(STEPS)]


def adamw(groups) -> torch.optim.Optimizer:
    return torch.optim.AdamW(groups, lr=LR)


def comparable(state: dict) -> dict:
    """Parameters as compared: GPT-2's fused attention bias without its key third. The loss
    does not depend on the key bias (softmax is invariant to a constant added to every key's
    score for a query), so its gradient is rounding noise, which Adam turns into lr-sized
    steps of random sign: no layout can match another's there."""
    out = {}
    for name, tensor in state.items():
        if name.endswith("attn.c_attn.bias"):
            q, _, v = tensor.chunk(3)
            tensor = torch.cat([q, v])
        out[name] = tensor
    return out


def plain_hf(preset: str) -> torch.nn.Module:
    """The model as HF builds it: its own sdpa attention, not the function shardwise
    registers ([Note: hf attention cores])."""
    model = build_hf(ModelConfig(name="hf", hf_config=preset), SEQ, seed=0)
    model.set_attn_implementation("sdpa")
    return model


def reference_run(preset: str) -> tuple[list[float], dict]:
    model = plain_hf(preset)
    optimizer = adamw(model.parameters())
    losses = []
    for ids in batches():
        optimizer.zero_grad()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, comparable({k: v.detach().clone() for k, v in model.named_parameters()})


def engine_run(cfg: Config) -> dict:
    """On every rank: this data-parallel rank's rows as dict batches."""
    model = build_hf(cfg.model, SEQ, seed=0)
    engine = initialize(model, adamw, cfg)
    dp, rank = engine.dp.size, comm.group_rank(engine.dp.dp) if engine.dp.size > 1 else 0
    rows = ROWS // dp
    losses = []
    for ids in batches():
        mine = ids[rank * rows : (rank + 1) * rows]
        losses.append(engine.train_step({"input_ids": mine, "labels": mine}))
    names = {name for name, _ in model.named_parameters()}
    state = comparable({k: v.float() for k, v in engine.full_state_dict().items() if k in names})
    total = sum(p.numel() for p in build_hf(cfg.model, SEQ).parameters())
    return {
        "losses": losses,
        "state": state,
        "param_fraction": engine.memory_report()["params"] / (4 * total),
        "world": dist.get_world_size(),
    }


@pytest.fixture(scope="module")
def references():
    return {preset: reference_run(preset) for preset in MODELS}


@pytest.mark.parametrize("preset", MODELS)
def test_every_zero_stage_matches_plain_hf_training(pool2, references, preset):
    """At stage 3 the units are the decoder layers: a rank holds about half the parameters."""
    for stage in (0, 1, 2, 3):
        for got in pool2.run(engine_run, hf_config(preset, f"zero.stage={stage}")):
            assert_parity((got["losses"], got["state"]), references[preset], rtol=1e-5)
            if stage == 3:
                assert 0.45 < got["param_fraction"] < 0.6, got["param_fraction"]
            else:
                assert got["param_fraction"] >= 1.0


@pytest.mark.parametrize("preset", MODELS)
def test_tensor_parallel_with_the_models_own_loss(pool2, references, preset):
    """tp=2 (1D): the model computes its loss on full logits (the head gathers them)."""
    want_losses, _ = references[preset]
    for got in pool2.run(engine_run, hf_config(preset, "parallel.tp=2")):
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(want_losses), rtol=1e-5, atol=0
        )


@pytest.mark.parametrize("preset", MODELS)
def test_parameter_chunks_match_plain_hf_training(pool2, references, preset):
    """offload.policy=auto on two ranks: chunks traced with the model's own sample input
    (at most its position table), sharded over the ranks."""
    cfg = hf_config(
        preset,
        "offload.policy=auto",
        "offload.device_budget_mb=1",
        "offload.chunk_search_range_mb=0",
    )
    for got in pool2.run(engine_run, cfg):
        assert_parity((got["losses"], got["state"]), references[preset], rtol=1e-5)


def test_tp_degree_that_does_not_divide_the_heads_is_one_line_before_launch():
    with pytest.raises(ConfigError, match="does not split over parallel.tp=3") as info:
        resolve(hf_config("gpt2-tiny", "parallel.tp=3"), 3)
    assert "\n" not in str(info.value)


def test_one_process_traces_within_the_position_table_and_checkpoints_its_layers(references):
    """The chunk tracer's sample input is capped at GPT-2's 64 positions although
    data.seq_len is 128 (the default), and activation checkpointing finds its layers."""
    cfg = Config.from_file(
        None,
        ["train.micro_batch=4", "precision.dtype=fp32", "train.activation_checkpointing=full"]
        + ["offload.policy=auto", "offload.device_budget_mb=2"],
    )
    assert cfg.data.seq_len > 64
    engine = initialize(build_hf(ModelConfig(name="hf", hf_config="gpt2-tiny"), SEQ), adamw, cfg)
    losses = [engine.train_step({"input_ids": ids, "labels": ids}) for ids in batches()]
    torch.testing.assert_close(
        torch.tensor(losses), torch.tensor(references["gpt2-tiny"][0]), rtol=1e-5, atol=0
    )


def shifted_reference(preset: str) -> list[float]:
    """Plain HF training on (inputs, targets) batches: the mean cross-entropy of the logits."""
    model = plain_hf(preset)
    optimizer = adamw(model.parameters())
    losses = []
    for tokens in shifted_batches():
        optimizer.zero_grad()
        logits = model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def shifted_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(4)
    return [torch.randint(0, 256, (ROWS, SEQ + 1), generator=generator) for _ in range(STEPS)]


def shifted_run(cfg: Config, batches: list[torch.Tensor] | None = None) -> list[float]:
    """On every rank: each of `batches` (`shifted_batches` by default) whole, as (inputs,
    targets); under sequence parallelism each rank computes its part of every sequence."""
    engine = initialize(build_hf(cfg.model, SEQ, seed=0), adamw, cfg)
    batches = shifted_batches() if batches is None else batches
    return [engine.train_step((t[:, :-1], t[:, 1:])) for t in batches]


def packed_batches() -> list[torch.Tensor]:
    """`shifted_batches` with two documents per row, started by token 0 at 0 and 9."""
    batches = shifted_batches()
    for tokens in batches:
        tokens[:, [0, SEQ // 2 + 1]] = DOCUMENT_TOKEN
    return batches


@pytest.mark.parametrize("kind", ["ring", "ulysses"])
@pytest.mark.parametrize("preset", MODELS)
def test_sequence_parallel_replaces_the_attention_core(pool2, preset, kind):
    """parallel.sp=2: each attention module's core (which HF's attention function calls,
    [Note: hf attention cores]) becomes ring or Ulysses attention; positions reach the model
    as ``position_ids`` [1, T]. LLaMA's key/value heads are repeated to its query heads."""
    want = shifted_reference(preset)
    cfg = hf_config(preset, "parallel.sp=2", f"attention.sequence_parallel={kind}")
    for got in pool2.run(shifted_run, cfg):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)


def dict_batch_under_sequence_parallelism(cfg: Config) -> str:
    engine = initialize(build_hf(cfg.model, SEQ, seed=0), adamw, cfg)
    ids = shifted_batches()[0][:, :SEQ]
    with pytest.raises(ConfigError) as error:
        engine.train_step({"input_ids": ids, "labels": ids})
    return str(error.value)


def test_a_dict_batch_under_sequence_parallelism_is_one_line(pool2):
    cfg = hf_config("gpt2-tiny", "parallel.sp=2")
    for message in pool2.run(dict_batch_under_sequence_parallelism, cfg):
        assert message.startswith("parallel.sp > 1 takes (inputs, targets) batches")


def test_block_sparse_attention_replaces_the_core():
    """attention.kind=sparse: the cores become block-sparse attention. With every block
    kept it trains as dense HF does; a window of one block (each query block sees only
    itself) trains otherwise."""
    want = shifted_reference("llama-tiny")
    sparse = ["attention.kind=sparse", "attention.block=4"]
    every_block = shifted_run(hf_config("llama-tiny", *sparse, "attention.layout=dense"))
    torch.testing.assert_close(torch.tensor(every_block), torch.tensor(want), rtol=1e-5, atol=0)
    window = ["attention.layout=sliding_window", "attention.window=1"]
    diagonal = shifted_run(hf_config("llama-tiny", *sparse, *window))
    assert abs(diagonal[-1] - want[-1]) > 1e-3


def test_packed_documents_attend_within_their_own_document():
    """``documents=`` reaches the attention function ([Note: hf attention cores]): in a row
    packing two documents, LLaMA's logits for the second (rotary positions, so relative) are
    those it has alone; without the documents they are not."""
    model = build_hf(ModelConfig(name="hf", hf_config="llama-tiny"), SEQ, seed=0)
    packed = torch.randint(1, 256, (1, 16), generator=torch.Generator().manual_seed(5))
    packed[:, [0, 7]] = DOCUMENT_TOKEN  # documents of 7 and 9 tokens
    with torch.no_grad():
        alone = model(input_ids=packed[:, 7:]).logits
        kept = model(input_ids=packed, documents=document_ids(packed)).logits[:, 7:]
        mixed = model(input_ids=packed).logits[:, 7:]
    torch.testing.assert_close(kept, alone, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed, alone, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("preset", MODELS)
def test_packed_documents_under_sequence_parallelism(pool2, preset):
    """data.pack_documents with ring attention at sp=2 trains as the one-process run with
    the same documents, which trains otherwise than without them."""
    packed = hf_config(preset, "data.pack_documents=true")
    want = shifted_run(packed, packed_batches())
    assert abs(want[-1] - shifted_run(hf_config(preset), packed_batches())[-1]) > 1e-4
    for got in pool2.run(shifted_run, packed.replace(parallel={"sp": 2}), packed_batches()):
        torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=1e-5, atol=0)
