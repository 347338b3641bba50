"""The selection options beyond the spec, and the heads and budgets they imply for a profile.

``kvhead eval``'s ``+`` modes and the vLLM plugin's settings are the same options, so one model
describes them and one function turns them, with a head profile, into the per-head page budgets a
:class:`kvhead.core.policy.SelectionPolicy` takes: the served system and the accuracy oracle cannot
drift apart.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, Field

from kvhead.core.budgets import PageCoverage, allocate_budgets
from kvhead.core.stability import HeadProfile

SPEC_TOP_K = 64  # the paper's pages per top-K set
SPEC_RERANK_INTERVAL = 16  # the paper's decode steps between stable-head reranks


class SelectionOptions(BaseModel):
    """Selection options of eval's modes and the vLLM plugin (see :mod:`kvhead.core.policy`);
    defaults are the spec's. Named sets of them are :mod:`kvhead.presets`."""

    top_k: int = Field(default=SPEC_TOP_K, gt=0, description="Pages per head's top-K set (K).")
    rerank_interval: int = Field(
        default=SPEC_RERANK_INTERVAL,
        gt=0,
        description="Decode steps between stable-head reranks (R).",
    )
    sink_pages: int = Field(default=0, ge=0, description="First pages every top-K set keeps.")
    recent_pages: int = Field(default=1, ge=1, description="Newest pages every top-K set keeps.")
    group_score: Literal["max", "softmax"] = Field(
        default="max", description="How a GQA group's query heads combine page scores."
    )
    leading_layers: int = Field(
        default=0,
        ge=0,
        description="First layers attending to every page: in flexicache+ they take the place of "
        "the profile's least unstable heads (same head budget); in quest+ they are simply dense.",
    )
    unstable_heads: int | None = Field(
        default=None,
        ge=0,
        description="flexicache+: how many heads keep every page: the leading layers' first, then "
        "the profile's most unstable (None: as many as the profile's unstable set). Fewer dense "
        "heads leave more of the same resident pages to the stable heads' top-K sets.",
    )
    unstable_dense: bool = Field(
        default=False, description="flexicache+: unstable heads attend to every (resident) page."
    )
    bound_weight: float = Field(
        default=1.0,
        ge=0.0,
        le=1.0,
        description="Share of the page box's spread in its score (1: the spec's upper bound).",
    )
    compensate: bool = Field(
        default=False, description="Skipped pages enter attention as one summary token each."
    )
    rerank_lag: bool = Field(
        default=False, description="flexicache+: stable heads' reranks take effect one step late."
    )
    head_budgets: bool = Field(
        default=False,
        description="Spread the sparse heads' pages (count x top_k) by the profile's coverage "
        "curves instead of top_k each (see kvhead.core.budgets).",
    )
    dense_heads: Literal["profile", "coverage"] = Field(
        default="profile",
        description="flexicache+: which heads keep every page and attend densely. 'profile': the "
        "profile's unstable set (RCO); 'coverage': the set, of any size, that the coverage curves "
        "(ranked at the eval's rerank interval) say loses least attention mass for the same "
        "resident pages as the profile's set at top_k (kvhead.core.budgets.allocate_residency).",
    )


def matching_coverage(profile: HeadProfile, opt: SelectionOptions) -> PageCoverage:
    """The profile's coverage curves, checked to be ranked exactly as the policy ranks pages."""
    cov = profile.coverage
    if cov is None:
        raise ValueError("head_budgets needs a profile with coverage (kvhead profile --coverage)")
    if not cov.matches(
        group_score=opt.group_score,
        sink_pages=opt.sink_pages,
        recent_pages=opt.recent_pages,
        bound_weight=opt.bound_weight,
    ):
        raise ValueError(
            f"the profile's coverage was ranked with group_score={cov.group_score}, sink_pages="
            f"{cov.sink_pages}, recent_pages={cov.recent_pages}, bound_weight={cov.bound_weight}; "
            "the options differ"
        )
    return cov


def is_spec(opt: SelectionOptions) -> bool:
    """Whether stable heads are ranked exactly as the spec ranks them (no option changes it)."""
    return (
        opt.sink_pages,
        opt.recent_pages,
        opt.group_score,
        opt.bound_weight,
        opt.head_budgets,
    ) == (0, 1, "max", 1.0, False)


def page_budgets(
    profile: HeadProfile,
    opt: SelectionOptions,
    sparse: torch.Tensor,
    top_k: int,
) -> torch.Tensor | None:
    """With ``head_budgets``, per-head page budgets ``[L, Hkv]``: the ``sparse`` heads share
    ``top_k`` pages each by the profile's coverage curves (others keep ``top_k``); else None."""
    if not opt.head_budgets:
        return None
    return allocate_budgets(matching_coverage(profile, opt), sparse, top_k)
