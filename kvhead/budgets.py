"""Head-adaptive page budgets: the same number of resident pages, spread by need.

One ``top_k`` for every stable head wastes pages: a head whose attention sits on a handful of
pages covers nearly all its mass with far fewer than K, while a broad head (early layers) keeps
barely half its mass with K. The offline profile therefore records, per (layer, kv head), the
share of true attention mass that the selection's own ranking covers with k pages
(:class:`PageCoverage`, measured by :func:`kvhead.profiler.measure_coverage` on calibration text),
and :func:`allocate_budgets` hands out the pool ``heads x top_k`` in steps of a few pages, each
step to the head whose covered mass grows most (AdaKV's argument: the output error of a sparse
head is bounded by the mass it misses, so the sum of missed mass is what to minimise).
"""

from __future__ import annotations

import heapq

import torch
from pydantic import BaseModel, Field, model_validator


class PageCoverage(BaseModel):
    """Attention mass covered by each head's top-k pages, k on a grid, from calibration decoding."""

    context: int = Field(gt=0, description="Calibration sequence length in tokens.")
    offsets: list[int] = Field(description="Corpus token offsets of the calibration windows.")
    steps: int = Field(gt=0, description="Dense decode steps measured per window.")
    group_score: str = Field(description="GQA page score that ranked the pages (see score_pages).")
    sink_pages: int = Field(ge=0, description="First pages always ranked first.")
    recent_pages: int = Field(ge=1, description="Newest pages always ranked first.")
    bound_weight: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of the box spread in the page score."
    )
    pages: list[int] = Field(description="The grid of k, ascending.")
    mass: list[list[list[float]]] = Field(
        description="[layer][kv head][grid index]: mean share of the group's true attention mass "
        "in the k best-ranked pages (1.0 once k covers every page)."
    )

    @model_validator(mode="after")
    def _check_grid(self) -> PageCoverage:
        if not self.pages or self.pages != sorted(set(self.pages)) or self.pages[0] <= 0:
            raise ValueError("coverage grid must be distinct positive page counts, ascending")
        if any(len(row) != len(self.pages) for layer in self.mass for row in layer):
            raise ValueError("every coverage row must have one value per grid point")
        return self

    def tensor(self) -> torch.Tensor:
        """``[layers, kv heads, grid]`` covered mass."""
        return torch.tensor(self.mass, dtype=torch.float64)

    def matches(self, *, group_score: str, sink_pages: int, recent_pages: int, bound_weight: float = 1.0) -> bool:
        """Whether the curves were ranked the way a policy with these options ranks pages."""
        mine = (self.group_score, self.sink_pages, self.recent_pages, self.bound_weight)
        return mine == (group_score, sink_pages, recent_pages, bound_weight)


def allocate_budgets(
    coverage: PageCoverage, eligible: torch.Tensor, top_k: int, *, minimum: int | None = None,
) -> torch.Tensor:
    """Per-head budgets ``[L, Hkv]`` (long): eligible heads share ``eligible.sum() * top_k`` pages.

    Budgets move in steps of the grid's first point (every grid point must be a multiple of it);
    each head starts at ``minimum`` (default: one step, at least sink + recent pages) and the
    rest goes, step by step, to the head whose covered mass gains most from the next step. Heads
    that are not eligible (unstable or dense heads: every page resident anyway) keep ``top_k``.
    Budgets never exceed the grid's last point, so the pool may be left partly unspent; the total
    never exceeds ``eligible.sum() * top_k``.
    """
    mass = coverage.tensor()
    grid = coverage.pages
    step = grid[0]
    if any(k % step for k in grid) or grid != list(range(step, grid[-1] + 1, step)):
        raise ValueError(f"coverage grid must be every multiple of {step} up to {grid[-1]}")
    if tuple(eligible.shape) != tuple(mass.shape[:2]):
        raise ValueError(f"eligible mask {tuple(eligible.shape)} does not match coverage {tuple(mass.shape[:2])}")
    floor = minimum if minimum is not None else max(step, coverage.sink_pages + coverage.recent_pages)
    start = -(-floor // step)  # grid index + 1 of each head's first budget
    heads = [tuple(h) for h in eligible.nonzero().tolist()]
    pool = len(heads) * top_k - len(heads) * start * step
    if pool < 0:
        raise ValueError(f"top_k {top_k} is below the minimum budget {start * step}")
    units = {h: start for h in heads}
    def key(h: tuple[int, int]) -> tuple[float, int, tuple[int, int]]:
        """Largest gain first; on a tie (rounded: curves are means) the head holding fewer pages."""
        gain = float(mass[h[0], h[1], units[h]] - mass[h[0], h[1], units[h] - 1])
        return -round(gain, 9), units[h], h

    heap = [key(h) for h in heads if units[h] < len(grid)]
    heapq.heapify(heap)
    while pool >= step and heap:
        h = heapq.heappop(heap)[2]
        units[h] += 1
        pool -= step
        if units[h] < len(grid):
            heapq.heappush(heap, key(h))
    budgets = torch.full(eligible.shape, top_k, dtype=torch.long)
    for (layer, head), n in units.items():
        budgets[layer, head] = n * step
    return budgets
