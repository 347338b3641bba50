"""Named FlexiCache settings: what a user picks instead of a dozen options.

=============  =================================================================================
``paper``      the paper's FlexiCache: K 64 pages, rerank every 16 steps, the profile's unstable
               heads (25%) keep every page. Measured: PPL +10% and 2 of 5 passkeys at 8k on
               SmolLM2 (docs/accuracy.md): the reference point, not a serving choice.
``balanced``   flexicache+: 22 dense heads (leading 2 layers first), stable heads ranked by a
               softmax group score of half-spread bounds with one sink and four recent pages,
               per-head budgets from the profile's coverage curves averaging 70 pages, summary
               tokens for skipped pages, R 8. 34.9% of KV pages resident at 8k; agreement 0.993
               on held-out text, 0.981 on the license text at 8k.
``accurate``   ``balanced`` with 11 dense heads and budgets averaging 129 pages: the same resident
               pages (34.7% at 8k) moved to stable heads. Agreement 0.991-0.995 at 8k, PPL within
               0.2%, every passkey. The default: the preset that meets the accuracy target.
=============  =================================================================================

A preset is a set of :class:`~kvhead.core.options.SelectionOptions` values; every option a user
also gives overrides it (``kvhead eval --preset accurate --top-k 100``, or the plugin's
``{"kvhead": {"preset": "accurate", "top_k": 100}}``). Head profiles are found by model
fingerprint (the shipped SmolLM2 profile carries the coverage curves the budgets need).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from kvhead.core.options import SelectionOptions


class Preset(BaseModel):
    """A named, measured choice of options, and the eval modes that compare it with dense."""

    name: str
    summary: str
    modes: list[str] = Field(description="kvhead eval's sparse modes for this preset.")
    options: dict[str, Any] = Field(description="SelectionOptions values the preset sets.")

    def selection_options(self, **overrides: Any) -> SelectionOptions:
        """The preset's options with ``overrides`` (None values mean: keep the preset's)."""
        given = {k: v for k, v in overrides.items() if v is not None}
        return SelectionOptions.model_validate(self.options | given)


_FLEXICACHE_PLUS = {
    "top_k": 70,
    "rerank_interval": 8,
    "unstable_dense": True,
    "leading_layers": 2,
    "sink_pages": 1,
    "recent_pages": 4,
    "group_score": "softmax",
    "bound_weight": 0.5,
    "head_budgets": True,
    "compensate": True,
}
PRESETS: dict[str, Preset] = {
    "paper": Preset(
        name="paper",
        summary="the paper's FlexiCache (K 64, R 16, 25% dense heads)",
        modes=["quest", "flexicache"],
        options={"top_k": 64, "rerank_interval": 16},
    ),
    "balanced": Preset(
        name="balanced",
        modes=["flexicache+"],
        options=_FLEXICACHE_PLUS,
        summary="flexicache+ with 22 dense heads and K 70 (34.9% resident at 8k)",
    ),
    "accurate": Preset(
        name="accurate",
        modes=["flexicache+"],
        options=_FLEXICACHE_PLUS | {"unstable_heads": 11, "top_k": 129},
        summary="flexicache+ with 11 dense heads and K 129 (34.7% resident at 8k)",
    ),
}
DEFAULT_PRESET = "accurate"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; an unknown name is a clear error listing the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
