"""Benchmarks run by ``shardwise bench NAME``: one module per benchmark, each with
``run(quick: bool) -> shardwise.bench.BenchResult`` (see `shardwise.bench`)."""
