"""An emulated slow link: collectives that also wait for their bytes to go out at a set rate.

[Note: emulated link] ``distributed.emulate_gbps`` makes this process's link slow: it sends
its collectives' wire bytes (comm's [Note: byte accounting]) one after another at that rate,
and a collective is complete only once its bytes have gone out: a synchronous op returns then,
an asynchronous one's `TrackedWork.wait` waits until then (so compute issued in between
overlaps with the transfer, as on a real link). Every rank of a collective sends, so every
rank waits alike; a recv waits on its sender. It changes when ops complete, never their
results, so bandwidth-bound behaviour can be measured on one machine. Process state, like
comm's hang diagnostic: one link per process, set by the engine from its config.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass


@dataclass
class Link:
    """A serial link of `gbps` Gbit/s (None: infinitely fast, nothing emulated)."""

    gbps: float | None = None
    free_at: float = 0.0
    """When the bytes already sent have gone out (time.perf_counter)."""

    def reserve(self, wire_bytes: float, now: float) -> float | None:
        """Queue `wire_bytes` issued at `now`; when they have gone out (None: no emulation)."""
        if self.gbps is None:
            return None
        self.free_at = max(now, self.free_at) + wire_bytes * 8 / (self.gbps * 1e9)
        return self.free_at


_link = Link()
_lock = threading.Lock()  # collectives may be issued from autograd engine threads


def emulate_link(gbps: float | None) -> None:
    """Send this process's collectives at `gbps` Gbit/s from now on; None turns it off."""
    with _lock:
        _link.gbps, _link.free_at = gbps, 0.0


def sent_at(wire_bytes: float) -> float | None:
    """Queue a collective's `wire_bytes` on this process's link now: when they will have gone
    out (None when no link is emulated)."""
    if _link.gbps is None:
        return None
    with _lock:
        return _link.reserve(wire_bytes, time.perf_counter())


def wait_until_sent(deadline: float | None) -> None:
    """Block until `deadline` (a `sent_at` result; None: return at once)."""
    if deadline is not None:
        time.sleep(max(0.0, deadline - time.perf_counter()))
