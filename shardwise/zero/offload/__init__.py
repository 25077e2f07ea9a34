"""Offload tiers of the heterogeneous memory manager: where chunks live when not on the device."""

from shardwise.zero.offload.disk import (
    ChecksumError,
    DiskFullError,
    DiskTier,
    IOFuture,
    measure_raw_throughput,
)

__all__ = [
    "ChecksumError",
    "DiskFullError",
    "DiskTier",
    "IOFuture",
    "measure_raw_throughput",
]
