"""kvhead: head-aware KV caching (FlexiCache), Helix KV parallelism, MLKV and KV-head compression.

The core package is engine-agnostic torch code. Engines (the Hugging Face reference runner, the
vLLM plugin) call into it with vLLM's paged layout: a KV pool ``[num_blocks, page_size,
num_kv_heads, head_dim]`` plus a per-sequence block table.
"""

__version__ = "0.1.0"
