"""Two-level page selection in one cooperative launch, for small grids (batch 1).

At batch 1 the multi-launch path is bound by latency: three CUDA-graph nodes (1.4-2.1 us each
on an H200) and a dependent round trip through memory between them, against a budget of about
12 us (1.6 sparse steps). A single program per row cannot replace them: it walks its tiles one
dependent load chain after another (measured 20-70 us, ``benchmarks/hier_select_sweep.py``).

Here one launch keeps the grid wide and replaces the launch boundaries by two barriers among
each row's programs (a row's phases depend on that row only; one counter for the whole grid
serialised 128 arrivals on one address). Phase 1: every program scores its super-page tiles. Barrier. Phase 2: each of a
row's first ``C_TILES`` programs selects the row's top-M super-pages (all compute the same set,
as the fused layout does) and scores one tile of their candidate pages. Barrier. Phase 3: the
row's first program selects the top-K. The grid is launched cooperatively (all programs
resident at once, or the launch fails instead of deadlocking) and is kept at most one program
per SM. The barrier counters are zeroed per call (a memset node in a graph): a counter shared
between calls would race as soon as two streams ran the kernel.

Triton's interpreter runs programs one after another, so a grid barrier cannot complete there;
this layout is refused under the interpreter.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from kvhead.kernels.select import radix_bits
from kvhead.kernels.select_hier import (
    Scoring,
    _digits,
    cand_tile_scores,
    select_cands,
    select_super,
    super_tile_scores,
)


@triton.jit
def _grid_sync(bar_ptr, num_programs):
    """``num_programs`` programs (here: one row's) meet here. ``bar_ptr[0]`` counts arrivals,
    ``bar_ptr[1]`` is the generation: the last arrival resets the count and advances it, which releases the rest.
    Stores before the barrier are visible after it (release / acquire at GPU scope)."""
    tl.debug_barrier()
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    arrived = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
    if arrived == num_programs - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem="release")
    else:
        seen = gen
        while seen == gen:  # plain L2 reads while waiting; one acquire once released
            seen = tl.load(bar_ptr + 1, volatile=True)
        tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _coop_kernel(
    q_ptr, sqmin_ptr, sqmax_ptr, sscale_ptr, pqmin_ptr, pqmax_ptr, pscale_ptr, table_ptr,
    num_pages_ptr, sup_scores_ptr, sup_ptr, cand_ptr, ids_ptr, bar_ptr,
    num_groups_max, num_super, num_cand, top_k, num_kv_heads, head_dim, group,
    stride_qb, stride_qh, stride_smb, stride_smh, stride_sms, stride_ssb, stride_ssh,
    stride_gr, stride_pmb, stride_pmh, stride_psb, stride_tb, stride_ur, stride_cr, stride_ir,
    GROUP: tl.constexpr, GP: tl.constexpr, MMA: tl.constexpr, S_TILE: tl.constexpr,
    S_STEPS: tl.constexpr, T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    BITS_S: tl.constexpr, TILE_C: tl.constexpr, C_TILES: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BITS_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    num_pages = tl.load(num_pages_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_row = q_ptr + b * stride_qb
    pos, neg, row_scale = _digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    num_groups = (num_pages + group - 1) // group
    for step in tl.static_range(S_STEPS):
        offs_s = (step * T + t) * S_TILE + tl.arange(0, S_TILE)
        super_tile_scores(q_row, sqmin_ptr, sqmax_ptr, sscale_ptr, sup_scores_ptr, b, h, bh,
                          offs_s, num_groups, num_groups_max, stride_qh, stride_smb, stride_smh,
                          stride_sms, stride_ssb, stride_ssh, stride_gr, offs_d, d_mask, pos,
                          neg, row_scale, GROUP, GP, MMA, S_TILE)
    row_bar = bar_ptr + 2 * bh  # a row's phases depend on that row's programs only
    _grid_sync(row_bar, T)
    if t < C_TILES:
        select_super(sup_scores_ptr, sup_ptr, bh, num_groups_max, num_super, stride_gr,
                     stride_ur, BLOCK_S, BLOCK_M, BITS_S)
        tl.debug_barrier()
        offs_c = t * TILE_C + tl.arange(0, TILE_C)
        cand_tile_scores(q_row, pqmin_ptr, pqmax_ptr, pscale_ptr, table_ptr, sup_ptr, cand_ptr,
                         b, h, bh, offs_c, num_cand, num_pages, group, stride_qh, stride_pmb,
                         stride_pmh, stride_psb, stride_tb, stride_ur, stride_cr, offs_d,
                         d_mask, pos, neg, row_scale, GROUP, GP, MMA, False, TILE_C)
    _grid_sync(row_bar, T)
    if t == 0:
        select_cands(cand_ptr, sup_ptr, ids_ptr, bh.to(tl.int64), num_cand, top_k, group,
                     stride_cr, stride_ur, stride_ir, False, BLOCK_N, BLOCK_K, BITS_C)


def coop_shape(rows: int, groups: int, num_cand: int, tile: int) -> tuple[int, int, int]:
    """``(programs per row, super tiles per program, candidate tiles)`` of the layout."""
    s_tiles = triton.cdiv(groups, tile)
    c_tiles = triton.cdiv(num_cand, tile)
    per_row = max(c_tiles, triton.cdiv(s_tiles, 2))
    return per_row, triton.cdiv(s_tiles, per_row), c_tiles


def coop_fits(query: torch.Tensor, rows: int, groups: int, num_cand: int, tile: int) -> bool:
    """Whether the cooperative layout can run: compiled CUDA, at most one program per SM."""
    if not query.is_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    per_row = coop_shape(rows, groups, num_cand, tile)[0]
    sms = torch.cuda.get_device_properties(query.device).multi_processor_count
    return rows * per_row <= sms


def launch_coop(
    query: torch.Tensor, sq: list[torch.Tensor], pq: list[torch.Tensor],
    block_table: torch.Tensor, num_pages: torch.Tensor, sup_scores: torch.Tensor,
    sup_ids: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor, groups: int, num_super: int,
    num_cand: int, top_k: int, num_kv_heads: int, head_dim: int, group: int,
    scoring: Scoring, *, GROUP: int, GP: int, MMA: bool, BLOCK_D: int,
) -> None:
    """Launch :func:`_coop_kernel` (callers check :func:`coop_fits` first)."""
    rows = sup_ids.shape[0]
    tile = scoring.super_tile
    per_row, s_steps, c_tiles = coop_shape(rows, groups, num_cand, tile)
    barrier = torch.zeros(rows, 2, dtype=torch.int32, device=query.device)
    block_s = triton.next_power_of_2(groups)
    block_n = triton.next_power_of_2(num_cand)
    _coop_kernel[(rows, per_row)](
        query, sq[0], sq[1], sq[2], pq[0], pq[1], pq[2], block_table, num_pages, sup_scores,
        sup_ids, cand, ids, barrier, groups, num_super, num_cand, top_k, num_kv_heads,
        head_dim, group,
        query.stride(0), query.stride(1), sq[0].stride(0), sq[0].stride(1), sq[0].stride(2),
        sq[2].stride(0), sq[2].stride(1), sup_scores.stride(0), pq[0].stride(0),
        pq[0].stride(1), pq[2].stride(0), block_table.stride(0), sup_ids.stride(0),
        cand.stride(0), top_k,
        GROUP=GROUP, GP=GP, MMA=MMA, S_TILE=tile, S_STEPS=s_steps, T=per_row, BLOCK_S=block_s,
        BLOCK_M=triton.next_power_of_2(num_super), BITS_S=radix_bits(block_s), TILE_C=tile,
        C_TILES=c_tiles, BLOCK_N=block_n, BLOCK_K=triton.next_power_of_2(top_k),
        BITS_C=radix_bits(block_n), BLOCK_D=BLOCK_D, num_warps=8 if block_s >= 1024 else 4,
        launch_cooperative_grid=True,
    )
