"""Head-adaptive page budgets: the same number of resident pages, spread by need.

One ``top_k`` for every stable head wastes pages: a head whose attention sits on a handful of
pages covers nearly all its mass with far fewer than K, while a broad head (early layers) keeps
barely half its mass with K. The offline profile therefore records, per (layer, kv head), the
share of true attention mass that the selection's own ranking covers with k pages
(:class:`PageCoverage`, measured by :func:`kvhead.eval.profiler.measure_coverage` on
calibration text),
and :func:`allocate_budgets` hands out the pool ``heads x top_k`` in steps of a few pages, each
step to the head whose covered mass grows most (AdaKV's argument: the output error of a sparse
head is bounded by the mass it misses, so the sum of missed mass is what to minimise).
Curves ranked every R steps (``rerank_interval``) also see how far a head's top pages drift
between reranks, so :func:`allocate_residency` can choose which heads keep every page with the
same measure that sizes the others' budgets.
"""

from __future__ import annotations

import heapq

import torch
from pydantic import BaseModel, Field, model_validator


class PageCoverage(BaseModel):
    """Attention mass covered by each head's top-k pages, k on a grid, from calibration decoding."""

    corpus: str = Field(default="licenses", description="Corpus the calibration windows came from.")
    context: int = Field(gt=0, description="Calibration sequence length in tokens.")
    offsets: list[int] = Field(description="Corpus token offsets of the calibration windows.")
    steps: int = Field(gt=0, description="Dense decode steps measured per window.")
    group_score: str = Field(description="GQA page score that ranked the pages (see score_pages).")
    sink_pages: int = Field(ge=0, description="First pages always ranked first.")
    recent_pages: int = Field(ge=1, description="Newest pages always ranked first.")
    bound_weight: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of the box spread in the page score."
    )
    rerank_interval: int = Field(
        default=1, gt=0, description="Steps a ranking was kept for (1: every step ranked afresh)."
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

    def matches(
        self, *, group_score: str, sink_pages: int, recent_pages: int, bound_weight: float = 1.0
    ) -> bool:
        """Whether the curves were ranked the way a policy with these options ranks pages."""
        mine = (self.group_score, self.sink_pages, self.recent_pages, self.bound_weight)
        return mine == (group_score, sink_pages, recent_pages, bound_weight)


def allocate_budgets(
    coverage: PageCoverage,
    eligible: torch.Tensor,
    top_k: int,
    *,
    minimum: int | None = None,
    pool: int | None = None,
) -> torch.Tensor:
    """Per-head budgets ``[L, Hkv]`` (long): eligible heads share ``eligible.sum() * top_k`` pages.

    Budgets move in steps of the grid's first point (every grid point must be a multiple of it);
    each head starts at ``minimum`` (default: one step, at least sink + recent pages) and the
    rest goes, step by step, to the head whose covered mass gains most from the next step. Heads
    that are not eligible (unstable or dense heads: every page resident anyway) keep ``top_k``.
    Budgets never exceed the grid's last point, so the pool may be left partly unspent; the total
    never exceeds the pool (``pool`` pages when given, else ``eligible.sum() * top_k``).
    """
    mass = coverage.tensor()
    grid = coverage.pages
    step = grid[0]
    if any(k % step for k in grid) or grid != list(range(step, grid[-1] + 1, step)):
        raise ValueError(f"coverage grid must be every multiple of {step} up to {grid[-1]}")
    if tuple(eligible.shape) != tuple(mass.shape[:2]):
        raise ValueError(
            f"eligible mask {tuple(eligible.shape)} does not match coverage {tuple(mass.shape[:2])}"
        )
    start = -(-_floor(coverage, minimum) // step)  # grid index + 1 of each head's first budget
    heads = [tuple(h) for h in eligible.nonzero().tolist()]
    pool = (len(heads) * top_k if pool is None else pool) - len(heads) * start * step
    if pool < 0:
        raise ValueError(
            f"the pool is below {len(heads)} heads x the minimum budget {start * step}"
        )
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


def missed_mass(
    coverage: PageCoverage, sparse: torch.Tensor, budgets: torch.Tensor
) -> torch.Tensor:
    """``[L, Hkv]`` share of attention mass each sparse head's budget misses (0 for dense heads)."""
    index = (budgets.clamp(coverage.pages[0], coverage.pages[-1]) // coverage.pages[0] - 1).long()
    covered = coverage.tensor().gather(2, index.unsqueeze(-1)).squeeze(-1)
    return torch.where(sparse, 1.0 - covered, torch.zeros_like(covered))


def allocate_residency(
    coverage: PageCoverage,
    pool: int,
    *,
    minimum: int | None = None,
    dense_pages: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense heads and sparse budgets that spend ``pool`` resident pages for the least missed mass.

    A dense head keeps every page, ``dense_pages`` of them (default: all ``coverage.pages[-1]``
    of the calibration context; pass fewer to charge a dense head what it holds at the start of
    decoding, where dense heads are cheapest and a pool of them is easiest to overspend) and misses
    nothing; a sparse head keeps its budget and misses what its (stale, at the coverage's rerank
    interval) curve says. Spreading pages by marginal gain alone (:func:`allocate_budgets`)
    never crosses a convex stretch of a curve, which is what a head whose top pages drift
    between reranks has: little covered until most pages are kept. So for each count D of dense
    heads, the D-th is the sparse head missing most under the budgets left for D - 1 (greedy),
    the rest is spread by marginal gain, and the D with the least summed missed mass wins. A head
    whose budget reaches every page is dense too: it attends to everything at any context and
    needs no scores. The RCO profile approximates the same choice without seeing the budget.

    Returns ``(dense [L, Hkv] bool, budgets [L, Hkv] long)``; dense heads' budgets are the grid's
    last point.
    """
    everything = coverage.pages[-1]
    cost = everything if dense_pages is None else dense_pages
    floor = -(-_floor(coverage, minimum) // coverage.pages[0]) * coverage.pages[0]
    shape = coverage.tensor().shape[:2]
    dense = torch.zeros(shape, dtype=torch.bool)
    best: tuple[float, torch.Tensor, torch.Tensor] | None = None
    while True:
        sparse = ~dense
        left = pool - int(dense.sum()) * cost
        if left < int(sparse.sum()) * floor:
            break
        budgets = allocate_budgets(coverage, sparse, everything, minimum=minimum, pool=left)
        budgets[dense] = everything
        missed = missed_mass(coverage, sparse, budgets)
        if best is None or float(missed.sum()) < best[0] - 1e-9:
            best = (float(missed.sum()), dense.clone(), budgets)
        if float(missed.max()) <= 0.0:  # nothing left to gain by making a head dense
            break
        dense.view(-1)[int(missed.flatten().argmax())] = True
    if best is None:
        raise ValueError(
            f"a pool of {pool} pages cannot give every head the minimum budget {floor}"
        )
    _, dense, budgets = best
    return dense | (budgets >= everything), budgets


def _floor(coverage: PageCoverage, minimum: int | None) -> int:
    """The smallest budget a sparse head may get: its forced pages, at least one grid step."""
    return (
        minimum
        if minimum is not None
        else max(coverage.pages[0], coverage.sink_pages + coverage.recent_pages)
    )
