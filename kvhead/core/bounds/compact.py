"""Compact page bounds (int8, conservative) and two-level page selection: the torch reference.

Why: scoring every page from fp32 min/max bounds reads 1 KiB per page and KV head (at head dim
128), 1/8 of the page's KV bytes. A rerank every R steps then costs, relative to a sparse step
over K pages, about N / (8 R K) for N pages: 100% at 128k tokens with K = 64, R = 16. Two
changes cut those bytes by 30x or more there:

* **int8 bounds** with one fp32 scale per (page, KV head): 2 x D + 4 bytes instead of 8 x D.
  ``kmax`` is rounded *up* and ``kmin`` *down* onto the int8 grid, so the dequantised box still
  contains every key of the page and the Quest score stays an upper bound of ``q . k``;
* **super-pages**: the elementwise min/max over G consecutive logical pages of a sequence. The
  top-M super-pages by bound are chosen first, then only their M x G pages are scored, and the
  top-K of those is the selection. Bytes per head: N/G + M x G compact bounds instead of N.

A super-page's bound is at least every member page's bound, so a page outside the chosen
super-pages can beat one inside only by being in a super-page that scored lower: the selection
can differ from the flat top-K, and ``benchmarks/gpu/hier_select_quality.py`` measures by how much
on real attention data. With M >= all super-pages it equals the flat top-K over int8 bounds.

Super-page bounds belong to a batch row (a sequence), not to physical blocks: a group of
logical pages maps to scattered blocks, and prefix sharing could make one block the first page
of different groups. The newest page is forced as in :func:`kvhead.core.pages.select_top_k`, and so
is the newest super-page (it holds the newest page, and the recent context next to it), which is
also why the partial newest page/group may keep stale compact bounds until it closes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvhead.core.pages import PAD, PageBounds, select_top_k

# Defaults from benchmarks/results/gpu/hier_select.md (SmolLM2, 4k tokens, K = 16 and 32): with
# super-pages of 8 pages and 4 x K candidate pages (M = K / 2 super-pages) the selection covers
# the same attention mass as the flat fp32 top-K (0.730 vs 0.718, 0.839 vs 0.840); 2 x K loses
# 1.4-3.7 points, and G = 16 at 4 x K loses 2-2.4. Bytes per head: N/8 + 4K boxes.
DEFAULT_GROUP = 8
DEFAULT_CANDIDATES_PER_K = 4
# Pages per head up to which the flat int8 selection runs instead of two levels: there the
# first level saves few bytes and costs one more launch and a second radix select. Set from the
# H200 timings in benchmarks/results/gpu/gpu_kernels.md (two-level section).
FLAT_MAX_PAGES = 1024
# Pages of all rows (sequences x KV heads) up to which the flat selection runs however long the
# rows: a small batch leaves the GPU idle, and the flat one-launch kernel beat two levels there
# (H200, 32k tokens = 2048 pages, batch 1 = 8 rows: 11.6 / 13.0 / 14.3 us for K = 32 / 64 / 128
# against 13.6 / 14.3 / 15.5 us; at batch 8 flat took 28.7 us against 18.1;
# benchmarks/results/gpu/gpu_select_run2.json). Flat is also the better selection (every page).
FLAT_MAX_BOXES = 16384
QMAX = 127  # symmetric int8 grid; -128 is never used, so negation stays on the grid
_SCALE_PAD = 1.0 + 2.0**-20  # makes 127 * scale > max |bound| despite fp32 rounding


@dataclass
class CompactBounds:
    """int8 bounds ``qmin``/``qmax`` [..., D] and fp32 ``scale`` [...]: key box = q x scale.

    Leading dims are [num_blocks, Hkv] for page bounds, [B, Hkv, S] for super-page bounds.
    A box that holds no key (empty page) has scale 0 and scores 0; callers mask such pages out
    by their page count, as with fp32 bounds.
    """

    qmin: torch.Tensor
    qmax: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def quantize(cls, kmin: torch.Tensor, kmax: torch.Tensor) -> CompactBounds:
        """Round ``kmax`` up and ``kmin`` down onto a per-box int8 grid (exact, checked in fp64)."""
        if kmin.shape != kmax.shape:
            raise ValueError(f"kmin {tuple(kmin.shape)} and kmax {tuple(kmax.shape)} differ")
        lo, hi = kmin.double(), kmax.double()
        filled = torch.isfinite(lo).all(-1) & torch.isfinite(hi).all(-1)
        lo = torch.where(filled.unsqueeze(-1), lo, 0.0)
        hi = torch.where(filled.unsqueeze(-1), hi, 0.0)
        amax = torch.maximum(lo.abs(), hi.abs()).amax(-1)
        scale = (amax / QMAX * _SCALE_PAD).float()  # fp32 as stored; 127 * scale > amax still
        s = scale.double().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
        qmax = torch.ceil(hi / s)
        qmin = torch.floor(lo / s)
        # ceil/floor of a rounded quotient can land one step short: fix it with exact products.
        qmax = torch.where(qmax * s < hi, qmax + 1, qmax).clamp(-QMAX, QMAX)
        qmin = torch.where(qmin * s > lo, qmin - 1, qmin).clamp(-QMAX, QMAX)
        return cls(qmin=qmin.to(torch.int8), qmax=qmax.to(torch.int8), scale=scale)

    @classmethod
    def from_pages(cls, bounds: PageBounds) -> CompactBounds:
        return cls.quantize(bounds.kmin, bounds.kmax)

    def dequantize(self) -> PageBounds:
        """The fp32 box the int8 bounds stand for (contains the original box)."""
        s = self.scale.unsqueeze(-1)
        return PageBounds(kmin=self.qmin.float() * s, kmax=self.qmax.float() * s)

    def nbytes_per_box(self) -> int:
        return 2 * self.qmin.shape[-1] * self.qmin.element_size() + self.scale.element_size()


def num_super_pages(max_pages: int, group: int) -> int:
    return -(-max_pages // group)


def default_num_super(
    top_k: int, group: int = DEFAULT_GROUP, candidates_per_k: int = DEFAULT_CANDIDATES_PER_K
) -> int:
    """Super-pages to keep so that ``candidates_per_k x top_k`` pages get page scores."""
    return max(1, -(-candidates_per_k * top_k // group))


def plan_selection(
    max_pages: int,
    top_k: int,
    group: int = DEFAULT_GROUP,
    candidates_per_k: int = DEFAULT_CANDIDATES_PER_K,
    flat_max_pages: int = FLAT_MAX_PAGES,
    rows: int | None = None,
    flat_max_boxes: int = FLAT_MAX_BOXES,
) -> int | None:
    """Super-pages to keep for a two-level selection over ``max_pages`` pages, or None: flat.

    Flat when the pages per head are few, when the kept super-pages would hold every page
    anyway (the two-level result would then equal the flat one at more cost), or when
    ``rows`` (sequences x KV heads, if given) times the pages are at most ``flat_max_boxes``.
    """
    num_super = default_num_super(top_k, group, candidates_per_k)
    if max_pages <= flat_max_pages or num_super * group >= max_pages:
        return None
    if rows is not None and rows * max_pages <= flat_max_boxes:
        return None
    return num_super


def build_super_bounds(
    bounds: PageBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    group: int,
) -> CompactBounds:
    """Super-page bounds ``[B, Hkv, S]`` (S = ceil(max_pages / G)) from fp32 page bounds.

    Pages past ``num_pages[b]`` are left out of their group. A serving engine folds appended keys
    into the open group instead of rebuilding (min/max folds commute); this builds them in bulk.
    """
    return CompactBounds.quantize(*fold_super_boxes(bounds, block_table, num_pages, group))


def fold_super_boxes(
    bounds: PageBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    group: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact fp32 super-page boxes ``(kmin, kmax)`` ``[B, Hkv, S, D]`` (what gets quantised)."""
    if group <= 0:
        raise ValueError(f"super-page group must be positive, got {group}")
    batch, max_pages = block_table.shape
    groups = num_super_pages(max_pages, group)
    table = block_table.long().clamp_min(0)
    valid = torch.arange(max_pages, device=table.device) < num_pages.view(-1, 1)  # [B, N]
    pad = groups * group - max_pages

    def fold(values: torch.Tensor, fill: float, reduce: str) -> torch.Tensor:
        v = values[table].masked_fill(~valid[..., None, None], fill)  # [B, N, Hkv, D]
        v = torch.nn.functional.pad(v, (0, 0, 0, 0, 0, pad), value=fill)
        v = v.view(batch, groups, group, *v.shape[2:])
        v = v.amin(2) if reduce == "min" else v.amax(2)
        return v.permute(0, 2, 1, 3)  # [B, Hkv, S, D]

    return fold(bounds.kmin.float(), float("inf"), "min"), fold(
        bounds.kmax.float(), float("-inf"), "max"
    )


def _bound_scores(
    query: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """Quest bound ``[B, Hkv, ..., N]``, max over the GQA group, for int8 boxes [B, Hkv, N, D]."""
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = qmin.shape[1]
    q = query.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    raw = q.clamp_min(0) @ qmax.float().transpose(-1, -2) + q.clamp_max(0) @ qmin.float().transpose(
        -1, -2
    )
    return (raw * scale.unsqueeze(2)).amax(dim=2)


def score_compact_pages(
    query: torch.Tensor,
    pages: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
) -> torch.Tensor:
    """Like :func:`kvhead.core.pages.score_pages` on int8 page bounds: ``[B, Hkv, max_pages]``."""
    table = block_table.long().clamp_min(0)
    qmin = pages.qmin[table].permute(0, 2, 1, 3)  # [B, Hkv, N, D]
    qmax = pages.qmax[table].permute(0, 2, 1, 3)
    scale = pages.scale[table].permute(0, 2, 1)
    scores = _bound_scores(query, qmin, qmax, scale)
    valid = torch.arange(table.shape[1], device=table.device) < num_pages.view(-1, 1)
    return scores.masked_fill(~valid.unsqueeze(1), float("-inf"))


def flat_select(
    query: torch.Tensor,
    pages: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Top-K pages by int8 bound, every page scored (newest forced), like ``select_top_k``."""
    return select_top_k(score_compact_pages(query, pages, block_table, num_pages), top_k, num_pages)


def check_hier_args(
    query: torch.Tensor,
    pages: CompactBounds,
    supers: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
    num_super: int,
) -> None:
    """Clear errors for shapes and parameters that cannot work (shared with the kernel)."""
    batch, num_q_heads, head_dim = query.shape
    if top_k <= 0 or group <= 0 or num_super <= 0:
        raise ValueError(f"top_k, group, num_super must be positive: {top_k}, {group}, {num_super}")
    if num_super * group < top_k:
        raise ValueError(f"{num_super} super-pages of {group} pages cannot hold top_k={top_k}")
    num_kv_heads = pages.qmin.shape[1]
    if pages.qmin.shape[-1] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"page bounds {tuple(pages.qmin.shape)} do not fit query {tuple(query.shape)}"
        )
    groups = num_super_pages(block_table.shape[1], group)
    want = (batch, num_kv_heads, groups, head_dim)
    if tuple(supers.qmin.shape) != want or tuple(supers.scale.shape) != want[:3]:
        raise ValueError(
            f"super bounds {tuple(supers.qmin.shape)} should be {want} (group {group})"
        )
    if block_table.shape[0] != batch or num_pages.shape != (batch,):
        raise ValueError(
            f"block_table {tuple(block_table.shape)} / num_pages "
            f"{tuple(num_pages.shape)} do not match batch {batch}"
        )


def hier_select(
    query: torch.Tensor,
    pages: CompactBounds,
    supers: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
    num_super: int,
) -> torch.Tensor:
    """Two-level top-K: ``[B, Hkv, min(top_k, max_pages)]`` logical pages, ascending, -1 padded.

    Top-``num_super`` super-pages (newest forced) by their int8 bound, then the top-``top_k``
    pages (newest forced) among the pages of those super-pages.
    """
    check_hier_args(query, pages, supers, block_table, num_pages, top_k, group, num_super)
    sup_ids = select_super_pages(query, supers, num_pages, group, num_super)
    return select_in_super_pages(query, pages, sup_ids, block_table, num_pages, top_k, group)


def super_page_scores(
    query: torch.Tensor, supers: CompactBounds, num_pages: torch.Tensor, group: int
) -> torch.Tensor:
    """Bound scores ``[B, Hkv, S]`` of the super-pages; past the sequence -inf, newest +inf."""
    num_groups = (num_pages.long() + group - 1) // group
    scores = _bound_scores(query, supers.qmin, supers.qmax, supers.scale)
    valid = torch.arange(scores.shape[2], device=query.device) < num_groups.view(-1, 1)
    scores = scores.masked_fill(~valid.unsqueeze(1), float("-inf"))
    newest = (num_groups - 1).clamp_min(0).view(-1, 1, 1).expand(-1, scores.shape[1], 1)
    return scores.scatter(2, newest, float("inf"))


def select_super_pages(
    query: torch.Tensor, supers: CompactBounds, num_pages: torch.Tensor, group: int, num_super: int
) -> torch.Tensor:
    """First level: top-``num_super`` super-page ids ``[B, Hkv, M]``, ascending, -1 padded."""
    num_groups = (num_pages.long() + group - 1) // group
    return select_top_k(super_page_scores(query, supers, num_pages, group), num_super, num_groups)


def select_in_super_pages(
    query: torch.Tensor,
    pages: CompactBounds,
    sup_ids: torch.Tensor,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
) -> torch.Tensor:
    """Second level: top-``top_k`` pages among those of the super-pages ``sup_ids``."""
    max_pages = block_table.shape[1]
    cand = sup_ids.unsqueeze(-1) * group + torch.arange(group, device=query.device)
    cand = cand.flatten(2)  # [B, Hkv, M*G] ascending logical pages
    ok = (sup_ids.unsqueeze(-1) >= 0).expand(-1, -1, -1, group).flatten(2)
    ok = ok & (cand < num_pages.view(-1, 1, 1))
    table = block_table.long().clamp_min(0)
    blocks = table.gather(1, cand.clamp(0, max_pages - 1).flatten(1)).view(cand.shape)
    heads = _heads(blocks)
    scores = _bound_scores(
        query, pages.qmin[blocks, heads], pages.qmax[blocks, heads], pages.scale[blocks, heads]
    )
    scores = scores.masked_fill(~ok, float("-inf"))
    scores = scores.masked_fill(cand == (num_pages.view(-1, 1, 1) - 1), float("inf"))
    k = min(top_k, max_pages, scores.shape[2])
    values, pos = scores.topk(k, dim=2)
    ids = cand.gather(2, pos).masked_fill(values == float("-inf"), PAD)
    big = torch.iinfo(ids.dtype).max
    ids = torch.where(ids == PAD, big, ids).sort(dim=2).values
    # M x G >= min(top_k, max_pages) by the argument check, so the width is select_top_k's.
    return ids.masked_fill(ids == big, PAD)


def _heads(blocks: torch.Tensor) -> torch.Tensor:
    """KV-head index broadcast against ``blocks [B, Hkv, C]``."""
    return torch.arange(blocks.shape[1], device=blocks.device).view(1, -1, 1)
