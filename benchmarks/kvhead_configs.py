"""The kvhead settings the vLLM benchmarks run, by name (imported by the scripts beside it).

``spec``: the issue's FlexiCache (K 64, R 16, the committed profile's 22 unstable heads).
``plus``: flexicache+ exactly as ``kvhead eval`` measured it (benchmarks/accuracy_compensate.sh,
benchmarks/ACCURACY.md "Bound-weighted page scores and summary tokens"): unstable heads and
layers 0-1 dense, sink + 4-page window, softmax group score, bound weight 0.5, head budgets from
the coverage profile ranked that way, summary tokens, K 70, R 8.
``plus11``: the same with 11 instead of 22 dense heads and K 129 (configuration C,
benchmarks/accuracy_unstable_heads.sh): the same resident pages at 8k, more of them in stable heads.
"""

from __future__ import annotations

from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PAGE = 16  # kvhead pages; stock's CPU kernels need blocks of 32
_SPEC = {"profile": str(Path(__file__).parents[1] / "kvhead" / "profiles" / "smollm2-135m-instruct.json"),
         "top_k": 64, "rerank_interval": 16, "page_size": PAGE}
_PLUS = _SPEC | {
    "profile": str(Path(__file__).parents[1] / "kvhead" / "profiles" / "smollm2-135m-instruct.json"), "top_k": 70, "rerank_interval": 8,
    "unstable_dense": True, "leading_layers": 2, "sink_pages": 1, "recent_pages": 4,
    "group_score": "softmax", "bound_weight": 0.5, "head_budgets": True, "compensate": True}
CONFIGS = {"spec": _SPEC, "plus": _PLUS, "plus11": _PLUS | {"unstable_heads": 11, "top_k": 129}}
MODES = {"spec": "flexicache", "plus": "flexicache+", "plus11": "flexicache+"}  # kvhead eval's name for each


def kvhead_settings(config: str, host_arena_gib: float) -> dict:
    """The named settings with a host arena of ``host_arena_gib``; unknown names are refused."""
    if config not in CONFIGS:
        raise ValueError(f"config must be one of {sorted(CONFIGS)}, not {config!r}")
    return CONFIGS[config] | {"host_arena_gib": host_arena_gib}
