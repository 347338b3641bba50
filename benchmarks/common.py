"""What the benchmark scripts share: repository paths, result folders, the named kvhead settings.

Every script starts with ``sys.path.insert(0, <repo root>)`` and imports from here as
``benchmarks.common`` (run them as ``python benchmarks/<area>/<script>.py`` from any directory;
no PYTHONPATH needed).

The named settings are :mod:`kvhead.presets` with vLLM's page size and the shipped SmolLM2
profile; the record names of the results (``spec``, ``plus``, ``plus11``) stay accepted because
the recorded result files and the commands that made them use them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvhead.presets import PRESETS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
ACCURACY_RESULTS = RESULTS / "accuracy"
GPU_RESULTS = RESULTS / "gpu"
KVSTORE_RESULTS = RESULTS / "kvstore"
VLLM_RESULTS = RESULTS / "vllm"
MODEL = "smollm2-135m-instruct"
PROFILE = ROOT / "kvhead" / "profiles" / f"{MODEL}.json"  # with coverage curves for budgets
CORPUS = ROOT / "kvhead" / "data" / "corpus"
PAGE = 16  # kvhead pages; stock vLLM's CPU kernels need blocks of 32

ALIASES = {"spec": "paper", "plus": "balanced", "plus11": "accurate"}  # record name -> preset
CONFIG_NAMES = [*PRESETS, *ALIASES]


def preset_name(config: str) -> str:
    """The preset a settings name means (a preset name or one of its record names)."""
    name = ALIASES.get(config, config)
    if name not in PRESETS:
        raise ValueError(f"config must be one of {CONFIG_NAMES}, not {config!r}")
    return name


def eval_mode(config: str) -> str:
    """``kvhead eval``'s sparse mode that measured the named settings."""
    return PRESETS[preset_name(config)].modes[-1]


def kvhead_settings(config: str, host_arena_gib: float | None = None) -> dict[str, Any]:
    """The plugin settings of a named preset: its options, 16-token pages, the SmolLM2 profile and
    (if given) a host arena of ``host_arena_gib``. Unknown names are refused."""
    settings = PRESETS[preset_name(config)].options | {"page_size": PAGE, "profile": str(PROFILE)}
    if host_arena_gib is not None:
        settings["host_arena_gib"] = host_arena_gib
    return settings
