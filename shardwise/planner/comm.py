"""Communication bytes of one training step per rank, by axis and collective, in closed form.

[Note: step communication] In the units `CommStats` records (`distributed/cost.py`: wire bytes
one rank sends under the ring algorithms), with Ψ the trainable elements a rank's model part
holds (Ψ / (tp · pp); 2.5D keeps a copy per depth layer), P and R the bytes of a parameter
and of a reduced gradient, N the ZeRO shard group (``dp_shard``):

* gradients: stages 0 and 1 all-reduce them once per step (accumulation micro-batches stay
  local) over every rank holding the same model part (dp x sp: 2 (G-1)/G Ψ R); stages 2 and
  3 reduce-scatter them over the shard group ((N-1)/N Ψ R), then the ranks holding the same
  shard (``dp_replicate`` x sp) all-reduce the slice, at every micro-batch (no full gradient
  is kept between backwards; 1-bit Adam: once per step);
* parameters: stages 1 and 2 all-gather the updated shards once per step ((N-1)/N Ψ P);
  stage 3 gathers every unit for each micro-batch's forward and again for its backward
  (once, with ``zero.reshard_after_forward = false``);
* tensor parallelism: the layout modules' closed forms summed over the reference GPT's
  modules (`tp_wire_bytes`; ``shardwise bench tp`` checks them against recordings), per
  micro-batch;
* pipeline: each micro-batch's hidden states [b, T, h] sent forward by every stage but the
  last and their gradient backward by every stage but the first;
* sequence parallelism, per layer and micro-batch: ring attention passes K and V (sp - 1)
  times in forward and again in backward, plus dK and dV once around the ring; Ulysses
  all-to-alls q, k, v and the output in both directions.

The step's two fp32 scalars (the loss, the gradient norm) are left out.
"""

from __future__ import annotations

import math

import torch

from shardwise.distributed.cost import WireBytes, ring_wire_bytes, wire_sum, wire_table
from shardwise.distributed.dims import ParallelDims
from shardwise.models.gpt import GPTConfig
from shardwise.planner.activations import grid
from shardwise.run_plan import RunPlan
from shardwise.tensor_parallel import one_d, summa, three_d

LOSS_BYTES = 4
"""The loss scalar is fp32 in every precision."""


def step_wire_bytes(plan: RunPlan, gpt: GPTConfig | None) -> dict[str, dict[str, float]]:
    """``{axis: {op: wire bytes}}`` of one step on one rank (`gpt`: the model's shape when it
    is the reference GPT, for the tensor- and sequence-parallel terms; None leaves them out)."""
    dims, config = plan.dims, plan.config
    psi = plan.trainable_params * dims.tp_depth / dims.tp / dims.pp  # 2.5D: depth copies
    param = torch.finfo(plan.precision.param_dtype).bits // 8
    reduce = torch.finfo(plan.precision.reduce_dtype).bits // 8
    micro = plan.micro_batches
    sharding, shards = plan.sharding, dims.dp_shard
    entries = []  # (axis, op, ranks, payload bytes), as `ring_wire_bytes` takes them
    if sharding.grads:  # reduce-scatter over the shard group, the slice over its replicas
        reductions = micro if plan.optimizer.onebit_freeze is None else 1
        replicas = dims.dp_replicate * dims.sp
        entries += [
            ("dp", "reduce_scatter", shards, psi * reduce),
            ("dp_replicate", "all_reduce", replicas, psi * reduce / shards),
        ] * reductions
    else:  # all-reduce over every rank holding this model part
        entries.append(("dp", "all_reduce", dims.dp * dims.sp, psi * reduce))
    if sharding.optimizer:
        gathers = micro * (2 if sharding.reshard_after_forward else 1) if sharding.params else 1
        entries += [("dp", "all_gather", shards, psi * param / shards)] * gathers
    table: dict[str, dict[str, float]] = {}
    for axis, op, n, nbytes in entries:
        if n > 1:
            ops = table.setdefault(axis, {})
            ops[op] = ops.get(op, 0.0) + ring_wire_bytes(op, n, nbytes)
    batch, seq = config.train.micro_batch, config.data.seq_len
    if gpt is None:
        return table
    if dims.pp > 1:  # a middle stage sends both ways (interleaved: every chunk of the rank)
        sends = 2 * micro * len(plan.pipeline.stages_of(0))
        # this rank's share of the hidden states: its sequence part under sp, its tp block
        share = math.prod(dims.hidden_split(config.parallel.tp_sequence_parallel)) * dims.sp
        table["pp"] = {"send": float(sends * batch * seq * gpt.d_model * param / share)}
    if dims.tp > 1:
        costs = tp_wire_bytes(gpt, batch, dims, param)
        for phase in costs.values():
            for (axis, op), nbytes in phase.items():
                ops = table.setdefault(axis, {})
                ops[op] = ops.get(op, 0.0) + nbytes * micro
    if dims.sp > 1:
        axis_op, nbytes = _sequence_parallel_bytes(plan, gpt, param)
        table.setdefault("sp", {})[axis_op] = nbytes
    return table


def _sequence_parallel_bytes(plan: RunPlan, gpt: GPTConfig, elem: int) -> tuple[str, float]:
    sp = plan.dims.sp
    tokens = plan.config.train.micro_batch * plan.config.data.seq_len / sp
    layers = gpt.n_layers * plan.micro_batches
    block = 2 * tokens * gpt.d_model * elem  # this rank's k and v
    if plan.sequence_parallel == "ulysses":
        return "all_to_all", layers * 2 * 2 * block * (sp - 1) / sp
    return "send", layers * (2 * (sp - 1) + sp) * block


def tp_wire_bytes(gpt: GPTConfig, batch: int, dims: ParallelDims, elem: int = 4) -> WireBytes:
    """Wire bytes per rank of forward + loss + backward of one micro-batch of `batch`
    sequences: the layout module's closed forms summed over the model's modules."""
    tokens, h, vocab, e = batch * gpt.seq_len, gpt.d_model, gpt.vocab_size, elem
    # (d_in, d_out, input layout in 3D) of every linear, in model order; the head last.
    mlp_in = [(h, gpt.d_ff, "P")] * (2 if gpt.mlp == "swiglu" else 1)  # up (and gate)
    block = [(h, 3 * h, "P"), (h, h, "S"), *mlp_in, (gpt.d_ff, h, "S")]
    linears = block * gpt.n_layers + [(h, vocab, "P")]
    norms = 2 * gpt.n_layers + 1
    if dims.tp_mode == "1d":
        tp = dims.tp
        # column-parallel where 3D reads P (input side h), row-parallel for S (output h)
        return wire_sum(
            one_d.embedding_wire_bytes(tokens, h, tp, e),
            *(one_d.linear_wire_bytes(tokens, h, tp, e, row=lay == "S") for *_, lay in linears),
            one_d.cross_entropy_wire_bytes(tokens, tp),
        )
    q, d = grid(dims)
    if dims.tp_mode in summa.SUMMA_MODES:
        row_axes = [("tp_row", q)] + ([("tp_dep", d)] if d > 1 else [])
        return wire_sum(
            summa.embedding_wire_bytes(tokens, vocab, h, q, d, e),
            *(summa.linear_wire_bytes(tokens, d_in, d_out, q, d, e) for d_in, d_out, _ in linears),
            *[summa.layer_norm_wire_bytes(tokens, h, q, d, e)] * norms,
            _loss_costs(tokens / (d * q), ("tp_col", q), row_axes),
        )
    return wire_sum(
        three_d.embedding_wire_bytes(vocab, h, q, e),
        *(
            three_d.linear_wire_bytes(tokens, d_in, d_out, q, e, input_layout=layout)
            for d_in, d_out, layout in linears
        ),
        *[three_d.layer_norm_wire_bytes(tokens, h, q, e)] * norms,
        _loss_costs(tokens / q**2, ("tp_row", q), [("tp_dep", q), ("tp_col", q)]),
    )


def _loss_costs(rows: float, vocab: tuple[str, int], row_axes: list[tuple[str, int]]):
    """`vocab_parallel_cross_entropy` on `rows` local tokens: one_d's closed form over the
    vocabulary axis, then the mean's fp32 scalar all-reduced over each axis splitting the
    tokens."""
    axis, size = vocab
    scalars = [("forward", a, "all_reduce", n, LOSS_BYTES) for a, n in row_axes]
    return wire_sum(one_d.cross_entropy_wire_bytes(rows, size, axis), wire_table(*scalars))
