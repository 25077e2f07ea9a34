"""Closed-form communication costs, in the units `shardwise.distributed.comm.CommStats` records.

A layer's cost is a `WireBytes` table: the bytes one rank sends per phase and (axis, op),
under the ring algorithms of comm's [Note: byte accounting]. Layouts state their costs with
`wire_table`, models add them up with `wire_sum`, and tests compare them with a recording
(`CommStats.wire_by_axis_op`).
"""

from __future__ import annotations

WireBytes = dict[str, dict[tuple[str, str], float]]
"""A layer's communication cost in closed form: ``{"forward" | "backward": {(axis, op): wire
bytes this rank sends}}``, keyed as `CommStats.wire_by_axis_op` reports a recording."""


def ring_wire_bytes(op: str, n: int, nbytes: float) -> float:
    """Wire bytes one rank sends for `op` on `n` ranks when it hands in `nbytes` (the
    payload_bytes of [Note: byte accounting]: a shard for all_gather, the full tensor for
    reduce_scatter and all_reduce). CommStats records exactly this."""
    if op == "all_reduce":
        return 2 * (n - 1) * nbytes / n
    if op in ("reduce_scatter", "all_to_all"):
        return (n - 1) * nbytes / n
    if op == "all_gather":
        return float((n - 1) * nbytes)
    raise ValueError(f"no ring cost for {op!r}")


def wire_table(*entries: tuple[str, str, str, int, float]) -> WireBytes:
    """A `WireBytes` from ``(phase, axis, op, n, payload_bytes)`` entries (`ring_wire_bytes`),
    repeated keys summed; a one-rank group sends nothing and gets no entry."""
    table: WireBytes = {"forward": {}, "backward": {}}
    for phase, axis, op, n, nbytes in entries:
        if n > 1:
            costs = table[phase]
            costs[(axis, op)] = costs.get((axis, op), 0.0) + ring_wire_bytes(op, n, nbytes)
    return table


def wire_sum(*tables: WireBytes) -> WireBytes:
    """Several layers' costs added up, key by key."""
    total: WireBytes = {"forward": {}, "backward": {}}
    for table in tables:
        for phase, costs in table.items():
            for key, nbytes in costs.items():
                total[phase][key] = total[phase].get(key, 0.0) + nbytes
    return total
