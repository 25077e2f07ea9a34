"""Heterogeneous memory (PatrickStar / Colossal-AI Gemini): parameters, gradients and Adam
states in fixed-size chunks placed on device, host and disk under budgets.

`chunk` (a chunk: tier, state table, packing), `manager` (budgets, eviction, prefetch),
`tracer` (memory of a warm-up step), `placement` (static / auto), `grads` (gradient chunks, the
chunk-wise AdamW), `sharding` (chunks sharded over data-parallel ranks) and `store`
(`ChunkStore`: the engine's parameter store for ``offload.policy``). The module hooks that
access and release chunks are ZeRO-3's too (zero/module_hooks.py).
"""
