"""Triton page selection over int8 bounds (:mod:`kvhead.core.bounds.compact`): two-level and flat.

Same functions as :func:`kvhead.core.bounds.compact.hier_select` and, for the flat variant,
:func:`kvhead.core.bounds.compact.flat_select`. Two-level:

1. score super-pages ``[B, Hkv, S]`` from their int8 boxes, split over tiles of super-pages so
   that batch 1 still spreads over the SMs; newest super-page forced;
2. top-M super-pages per (sequence, KV head) by a radix select. On small grids (few sequences)
   this runs inside launch 3: every candidate tile of a row repeats it, which is cheaper than a
   launch (H200, 128k tokens, batch 1: 18 us fused vs 19.5 us separate). On large grids the
   repeats cost more than the launch (batch 64: 162 vs 143 us), so it gets its own launch;
3. score the M x G candidate pages of the chosen super-pages through the block table; newest
   page forced;
4. top-K of the candidates, mapping candidate slot -> logical page on the way out. Candidates
   are laid out super-page by super-page in ascending order, so ascending slots are ascending
   page ids and the output needs no sort.

The flat variant (for few pages per head, where a first level saves little) is launches 3 and
4 with every page a candidate. Below about 64 sequences these kernels are bound by latency, not
bytes: each launch costs 2-4 us in a CUDA graph, and each radix pass a block-wide barrier.
Doing both levels in one launch was measured on an H200 in three forms: one program per row
and one cooperative launch with grid barriers (slower), and :mod:`kvhead.kernels.triton.select_one`
(last program per row merges local top-k's), which :func:`auto_layout` takes where it won
(``docs/gpu.md``). Two launches, each reduced by its last program per row, lost
too (commit 8570931; ``results/gpu_select_run3.json``).

Boxes are scored on CUDA cores (fp32) or on tensor cores (the query as int8 digits,
:mod:`kvhead.kernels.triton.box_score`); :func:`default_scoring` picks by the first pass's size.

Bytes read per (sequence, KV head): (N/G + M x G) x (2 D + 4) for two levels, N x (2 D + 4)
flat, instead of N x 8 D for the fp32 scoring. Ties at the M-th or K-th score go to lower ids
(torch's topk may choose others of equal score).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvhead.core.bounds.compact import FLAT_MAX_PAGES, CompactBounds, check_hier_args
from kvhead.kernels.triton.pdl import gdc_launch_dependents, gdc_wait, pdl_active
from kvhead.kernels.triton.select import (
    _select_kernel,
    radix_bits,
    select_cands,
)
from kvhead.kernels.triton.select_one import ONE_TILE, OneShape, default_shape, launch_one
from kvhead.kernels.triton.select_tiles import cand_tile_scores, group_digits, super_tile_scores

TILE = 32  # boxes per scoring chunk: 8 KiB of int8 bounds at head dim 128
LARGE_GRID = 4096  # candidate tiles from which a program takes two (see _chunks)
FUSE_MAX_PROGRAMS = 256  # above this many candidate tiles the first level gets its own launch
MMA_MIN_BOXES = 32768  # boxes in the first scoring pass from which tensor cores score them
ONE_MAX_ROWS = 64  # rows (sequences x KV heads) up to which one launch may serve (auto_layout)
ONE_MAX_SUPERS = 256  # super-pages per row up to which the two-level selection takes one launch


@dataclass(frozen=True)
class Scoring:
    """How the int8 kernels score boxes (see :mod:`kvhead.kernels.triton.box_score`).

    ``mma``: int8 tensor-core dots instead of fp32 CUDA-core arithmetic. ``super_tile``: boxes
    per super-page scoring step; ``super_steps``: steps per program (a loop, pipelined over
    ``stages`` loads), so that fewer, longer programs keep loads in flight.
    """

    mma: bool = False
    super_tile: int = TILE
    super_steps: int = 1
    stages: int = 1


DEFAULT_SCORING = Scoring()


@triton.jit
def select_super(
    sup_scores_ptr,
    sup_ptr,
    bh,
    num_groups_max,
    num_super,
    stride_gr,
    stride_ur,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BITS: tl.constexpr,
):
    """First level: the row's top-M super-pages, ascending, written to ``sup_ptr`` (the flat
    case of :func:`select_cands`: positions are super-page ids)."""
    select_cands(
        sup_scores_ptr,
        sup_scores_ptr,
        sup_ptr,
        bh,
        num_groups_max,
        num_super,
        1,
        stride_gr,
        0,
        stride_ur,
        True,
        BLOCK_S,
        BLOCK_M,
        BITS,
    )


@triton.jit
def _super_score_kernel(
    q_ptr,
    qmin_ptr,
    qmax_ptr,
    scale_ptr,
    num_pages_ptr,
    scores_ptr,
    num_groups_max,
    num_kv_heads,
    head_dim,
    group,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_sb,
    stride_sh,
    stride_sr,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    BLOCK_S: tl.constexpr,
    STEPS: tl.constexpr,
    STAGES: tl.constexpr,
    PDL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if PDL:  # let the next kernel of the chain launch now (it waits for this one's scores)
        gdc_launch_dependents()
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    num_groups = (tl.load(num_pages_ptr + b) + group - 1) // group
    q_row = q_ptr + b * stride_qb
    pos, neg, row_scale = group_digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    for step in tl.range(0, STEPS, num_stages=STAGES):
        offs_s = (tl.program_id(1) * STEPS + step) * BLOCK_S + tl.arange(0, BLOCK_S)
        super_tile_scores(
            q_row,
            qmin_ptr,
            qmax_ptr,
            scale_ptr,
            scores_ptr,
            b,
            h,
            bh,
            offs_s,
            num_groups,
            num_groups_max,
            stride_qh,
            stride_mb,
            stride_mh,
            stride_ms,
            stride_sb,
            stride_sh,
            stride_sr,
            offs_d,
            d_mask,
            pos,
            neg,
            row_scale,
            GROUP,
            GP,
            MMA,
            BLOCK_S,
        )


@triton.jit
def _cand_kernel(
    q_ptr,
    qmin_ptr,
    qmax_ptr,
    scale_ptr,
    table_ptr,
    num_pages_ptr,
    sup_scores_ptr,
    sup_ptr,
    cand_ptr,
    num_cand,
    num_groups_max,
    num_super,
    num_kv_heads,
    head_dim,
    group,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_sb,
    stride_tb,
    stride_gr,
    stride_ur,
    stride_cr,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    FLAT: tl.constexpr,
    FUSED: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BITS: tl.constexpr,
    TILE_C: tl.constexpr,
    CHUNKS: tl.constexpr,
    PDL: tl.constexpr,
    PDL_WAIT: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    num_pages = tl.load(num_pages_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_row = q_ptr + b * stride_qb
    if PDL_WAIT:  # a dependent launch: the super-page scores / ids come from the kernel before
        gdc_wait()
    if FUSED:
        # First level: every tile of the row computes the same set and writes the same ids;
        # the barrier makes this program's writes visible to all of its threads before they
        # read candidate -> super-page back.
        select_super(
            sup_scores_ptr,
            sup_ptr,
            bh,
            num_groups_max,
            num_super,
            stride_gr,
            stride_ur,
            BLOCK_S,
            BLOCK_M,
            BITS,
        )
        tl.debug_barrier()
    pos, neg, row_scale = group_digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    for chunk in tl.static_range(CHUNKS):
        offs_c = (tl.program_id(1) * CHUNKS + chunk) * TILE_C + tl.arange(0, TILE_C)
        cand_tile_scores(
            q_row,
            qmin_ptr,
            qmax_ptr,
            scale_ptr,
            table_ptr,
            sup_ptr,
            cand_ptr,
            b,
            h,
            bh,
            offs_c,
            num_cand,
            num_pages,
            group,
            stride_qh,
            stride_mb,
            stride_mh,
            stride_sb,
            stride_tb,
            stride_ur,
            stride_cr,
            offs_d,
            d_mask,
            pos,
            neg,
            row_scale,
            GROUP,
            GP,
            MMA,
            FLAT,
            TILE_C,
        )


@triton.jit
def _select_cand_kernel(
    cand_ptr,
    sup_ptr,
    ids_ptr,
    num_cand,
    top_k,
    group,
    stride_cr,
    stride_ur,
    stride_ir,
    FLAT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    PDL: tl.constexpr,
):
    if PDL:  # a dependent launch: the candidate scores come from the kernel before
        gdc_wait()
    select_cands(
        cand_ptr,
        sup_ptr,
        ids_ptr,
        tl.program_id(0).to(tl.int64),
        num_cand,
        top_k,
        group,
        stride_cr,
        stride_ur,
        stride_ir,
        FLAT,
        BLOCK_N,
        BLOCK_K,
        BITS,
    )


@dataclass(frozen=True)
class Plan:
    """Launch plan of one selection call (benchmarks sweep these; None: chosen by size).

    ``layout``: "fused" repeats the first level inside every candidate program (3 launches);
    "split" gives it its own launch (4). Flat selection has no first level: both are its 2
    launches. "one": a single launch whose last program per row merges
    (:mod:`kvhead.kernels.triton.select_one`, shaped by ``one``). ``scoring``: see :class:`Scoring`
    (multi-launch layouts). ``pdl``: whether the multi-launch kernels after the first are
    programmatic dependent launches where the device supports them
    (:mod:`kvhead.kernels.triton.pdl`; None: :func:`auto_pdl`).
    """

    layout: str | None = None
    scoring: Scoring | None = None
    one: OneShape | None = None
    pdl: bool | None = None

    def __post_init__(self) -> None:
        if self.layout not in (None, "fused", "split", "one"):
            raise ValueError(f"unknown layout {self.layout!r}")


def default_scoring(boxes: int) -> Scoring:
    """Scoring for a pass over ``boxes`` int8 boxes (rows x first-level boxes per row).

    Tensor cores, 64-box tiles, two tiles per program, once the pass is large enough to be
    throughput-bound. H200 sweep (``results/hier_select_sweep.json``): 128k tokens, batch 8
    (65536 super-page boxes), K = 64: 34.1 -> 27.1 us; batch 64: 140.7 -> 81.2 us; but 32k,
    batch 8 (16384): 17.9 -> 19.8 us at K = 32, and at batch 1 CUDA cores are as fast or
    faster (latency-bound: fewer, longer programs do not help).
    """
    return (
        Scoring(mma=True, super_tile=64, super_steps=2, stages=2)
        if boxes >= MMA_MIN_BOXES
        else DEFAULT_SCORING
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
    plan: Plan | None = None,
) -> torch.Tensor:
    """Two-level top-K pages ``[B, Hkv, min(top_k, max_pages)]``, ascending, -1 padded."""
    return hier_select_stages(
        query, pages, supers, block_table, num_pages, top_k, group, num_super, plan=plan
    )[0]


def flat_select(
    query: torch.Tensor,
    pages: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    plan: Plan | None = None,
) -> torch.Tensor:
    """Top-K pages by their int8 bound, every page scored: same output format as above."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    return _launch(query, pages, None, block_table, num_pages, top_k, 1, 0, plan)[0]


def hier_select_stages(
    query: torch.Tensor,
    pages: CompactBounds,
    supers: CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
    num_super: int,
    *,
    plan: Plan | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`hier_select` plus the chosen super-pages ``[B, Hkv, M]`` (for checks: a near-tie
    at the M-th super-page may pick another of equal score, and the pages follow from it)."""
    check_hier_args(query, pages, supers, block_table, num_pages, top_k, group, num_super)
    return _launch(query, pages, supers, block_table, num_pages, top_k, group, num_super, plan)


def _chunks(rows: int, tiles: int) -> int:
    """Candidate tiles per program. One keeps the grid wide (latency: spread over the SMs); two
    halve a very large grid. Measured on an H200 at 128k, K = 64 (first level in its own
    launch): batch 8 (512 tiles) 34.7 / 35.6 / 39.8 / 52.7 us for 1 / 2 / 4 / 8 tiles per
    program, batch 64 (4096 tiles) 145 / 143 / 148 / 174 us."""
    return 2 if rows * tiles >= LARGE_GRID else 1


def auto_layout(rows: int, cand_tiles: int, *, flat: bool, first_boxes: int, top_k: int) -> str:
    """Layout by size, as measured on an H200 (``benchmarks/results/gpu/gpu_select_run*.json``).

    One launch only where it won: flat rows longer than FLAT_MAX_PAGES (taken flat because the
    batch is small) with K below the one-launch tile, so that each tile's local top-K prunes
    (32k tokens, batch 1: 11.6 / 13.0 us for K = 32 / 64 against 14.4 / 14.5; at K = 128, 14.3
    either way); two levels over at most ONE_MAX_SUPERS super-pages per row (32k, batch 8:
    15.5 / 20.3 / 25.6 us against 18.1 / 22.0 / 27.1). At 128k (1024 super-pages) the
    one-launch merge lost (batch 1, K = 64: 17.9-30.9 against 17.0 us), and at 8k flat the two
    launches won (8.0 against 10.3-12.5 us at batch 1). Otherwise multi-launch: the first level
    inside the candidate programs while the grid is small, in its own launch beyond (the
    repeats would cost more than a launch).
    """
    if rows <= ONE_MAX_ROWS:
        if flat and first_boxes > FLAT_MAX_PAGES and top_k < ONE_TILE:
            return "one"
        if not flat and first_boxes <= ONE_MAX_SUPERS:
            return "one"
    return "fused" if rows * cand_tiles <= FUSE_MAX_PROGRAMS else "split"


def auto_pdl(rows: int, layout: str, *, flat: bool, max_pages: int) -> bool:
    """Whether the multi-launch chain uses programmatic dependent launches, as measured on an
    H200 (``benchmarks/results/gpu/gpu_select_run4.json``, with / without, us): they help where
    the dependent kernels are short single-program-per-row selects, flat over at most
    FLAT_MAX_PAGES pages (8k tokens, batch 8: 12.3 / 13.0 at K = 32) and the split layout at
    up to ONE_MAX_ROWS rows (128k, batch 8, K = 64 / 128: 24.9 / 26.7, 28.4 / 30.0); they
    cost time with the first level fused into the candidate kernel (32k, batch 8: 22.6 / 18.4
    at K = 32; 128k, batch 1, K = 128: 24.2 / 18.7), on long flat rows (32k, batch 1:
    16.1 / 14.7) and at 512 rows (32k, batch 64, K = 64: 50.1 / 47.0)."""
    if rows > ONE_MAX_ROWS:
        return False
    return max_pages <= FLAT_MAX_PAGES if flat else layout == "split"


def _launch(
    query: torch.Tensor,
    pages: CompactBounds,
    supers: CompactBounds | None,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
    num_super: int,
    plan: Plan | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = pages.qmin.shape[1]
    max_pages = block_table.shape[1]
    flat = supers is None
    groups = max_pages if flat else supers.qmin.shape[2]
    m = 1 if flat else min(num_super, groups)
    k = min(top_k, max_pages)
    rows = batch * num_kv_heads
    plan = plan or Plan()
    sc = plan.scoring or default_scoring(rows * groups)
    dev = query.device
    ids = torch.empty(batch, num_kv_heads, k, dtype=torch.int64, device=dev)
    sup_ids = torch.empty(rows, m, dtype=torch.int64, device=dev)
    if rows == 0 or max_pages == 0:
        return ids, sup_ids.view(batch, num_kv_heads, m)
    query = query if query.stride(2) == 1 else query.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    num_pages = num_pages.contiguous()
    pq = [t.contiguous() for t in (pages.qmin, pages.qmax, pages.scale)]
    sq = pq if flat else [t.contiguous() for t in (supers.qmin, supers.qmax, supers.scale)]
    block_d = triton.next_power_of_2(head_dim)
    gqa = num_q_heads // num_kv_heads
    gp = max(4, triton.next_power_of_2(gqa))  # 4 digit parts x gp rows >= 16: a dot's M
    mma = sc.mma and block_d >= 32  # int8 dots take K in steps of 32
    num_cand = max_pages if flat else m * group
    cand = torch.empty(rows, num_cand, dtype=torch.float32, device=dev)
    sup_scores = cand if flat else torch.empty(rows, groups, dtype=torch.float32, device=dev)
    tiles = triton.cdiv(num_cand, TILE)
    common = {"GROUP": gqa, "GP": gp, "MMA": mma, "BLOCK_D": block_d}
    layout = plan.layout or auto_layout(rows, tiles, flat=flat, first_boxes=groups, top_k=k)
    if layout == "one":
        launch_one(
            query,
            sq,
            pq,
            block_table,
            num_pages,
            ids,
            sup_ids,
            cand,
            num_first=groups,
            top_first=k if flat else m,
            top_k=k,
            group=group,
            flat=flat,
            shape=plan.one or default_shape(num_cand),
            GROUP=gqa,
            GP=gp,
            BLOCK_D=block_d,
        )
        return ids, sup_ids.view(batch, num_kv_heads, m)
    block_s = 1 if flat else triton.next_power_of_2(groups)
    block_n = triton.next_power_of_2(num_cand)
    pdl = (
        auto_pdl(rows, layout, flat=flat, max_pages=max_pages) if plan.pdl is None else plan.pdl
    ) and pdl_active(dev)
    if not flat:
        grid_s = triton.cdiv(groups, sc.super_tile * sc.super_steps)
        _super_score_kernel[(rows, grid_s)](
            query,
            sq[0],
            sq[1],
            sq[2],
            num_pages,
            sup_scores,
            groups,
            num_kv_heads,
            head_dim,
            group,
            query.stride(0),
            query.stride(1),
            sq[0].stride(0),
            sq[0].stride(1),
            sq[0].stride(2),
            sq[2].stride(0),
            sq[2].stride(1),
            sup_scores.stride(0),
            BLOCK_S=sc.super_tile,
            STEPS=sc.super_steps,
            STAGES=sc.stages,
            PDL=pdl,
            num_warps=4,
            **common,
        )
    chunks = _chunks(rows, tiles)
    fused = not flat and layout == "fused"
    if not flat and not fused:
        _select_kernel[(rows,)](
            sup_scores,
            sup_ids,
            groups,
            m,
            sup_scores.stride(0),
            sup_ids.stride(0),
            BLOCK_N=block_s,
            BLOCK_K=triton.next_power_of_2(m),
            BITS=radix_bits(block_s),
            PDL=pdl,
            num_warps=max(4, min(16, block_s // 512)),
            launch_pdl=pdl,
        )
    _cand_kernel[(rows, triton.cdiv(tiles, chunks))](
        query,
        pq[0],
        pq[1],
        pq[2],
        block_table,
        num_pages,
        sup_scores,
        sup_ids,
        cand,
        num_cand,
        groups,
        m,
        num_kv_heads,
        head_dim,
        group,
        query.stride(0),
        query.stride(1),
        pq[0].stride(0),
        pq[0].stride(1),
        pq[2].stride(0),
        block_table.stride(0),
        sup_scores.stride(0),
        sup_ids.stride(0),
        cand.stride(0),
        FLAT=flat,
        FUSED=fused,
        BLOCK_S=block_s,
        BLOCK_M=triton.next_power_of_2(m),
        BITS=radix_bits(block_s),
        TILE_C=TILE,
        CHUNKS=chunks,
        PDL=pdl,
        PDL_WAIT=pdl and not flat,
        num_warps=8 if fused and block_s >= 1024 else 4,
        launch_pdl=pdl and not flat,
        **common,
    )
    _select_cand_kernel[(rows,)](
        cand,
        sup_ids,
        ids,
        num_cand,
        k,
        group,
        cand.stride(0),
        sup_ids.stride(0),
        k,
        FLAT=flat,
        BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(k),
        BITS=radix_bits(block_n),
        PDL=pdl,
        num_warps=max(4, min(16, block_n // 512)),
        launch_pdl=pdl,
    )
    return ids, sup_ids.view(batch, num_kv_heads, m)
