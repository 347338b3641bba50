"""One-launch page selection: one program per (sequence, KV head) row does both levels.

At batch 1 the selection is bound by latency, not bytes: 8 rows read 2 MB of super-page bounds
at 128k tokens (0.5 us at full bandwidth) but the multi-launch path pays a CUDA-graph node per
launch (1.4-2.1 us each on an H200) plus a dependent round trip through memory between them.
Here one program per row scores its super-pages (a loop over tiles), selects the top-M,
scores their pages through the block table, selects the top-K and writes them. The stages hand
over through global scratch rows that only this program touches, ordered by block barriers, so
no grid-wide synchronisation (and no counters to reset between calls) is needed. It uses few
SMs, so it is the layout for small grids only (``select_hier.auto_layout``).
"""

from __future__ import annotations

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
def _row_kernel(
    q_ptr, sqmin_ptr, sqmax_ptr, sscale_ptr, pqmin_ptr, pqmax_ptr, pscale_ptr, table_ptr,
    num_pages_ptr, sup_scores_ptr, sup_ptr, cand_ptr, ids_ptr,
    num_groups_max, num_super, num_cand, top_k, num_kv_heads, head_dim, group,
    stride_qb, stride_qh, stride_smb, stride_smh, stride_sms, stride_ssb, stride_ssh,
    stride_gr, stride_pmb, stride_pmh, stride_psb, stride_tb, stride_ur, stride_cr, stride_ir,
    GROUP: tl.constexpr, GP: tl.constexpr, MMA: tl.constexpr, FLAT: tl.constexpr,
    S_TILE: tl.constexpr, S_STEPS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_M: tl.constexpr,
    BITS_S: tl.constexpr, TILE_C: tl.constexpr, C_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BITS_C: tl.constexpr, STAGES: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    num_pages = tl.load(num_pages_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_row = q_ptr + b * stride_qb
    pos, neg, row_scale = _digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    if not FLAT:
        num_groups = (num_pages + group - 1) // group
        for step in tl.range(0, S_STEPS, num_stages=STAGES):
            offs_s = step * S_TILE + tl.arange(0, S_TILE)
            super_tile_scores(q_row, sqmin_ptr, sqmax_ptr, sscale_ptr, sup_scores_ptr, b, h, bh,
                              offs_s, num_groups, num_groups_max, stride_qh, stride_smb,
                              stride_smh, stride_sms, stride_ssb, stride_ssh, stride_gr, offs_d,
                              d_mask, pos, neg, row_scale, GROUP, GP, MMA, S_TILE)
        tl.debug_barrier()  # every thread's scores are in memory before the select reads them
        select_super(sup_scores_ptr, sup_ptr, bh, num_groups_max, num_super, stride_gr,
                     stride_ur, BLOCK_S, BLOCK_M, BITS_S)
        tl.debug_barrier()
    for step in tl.range(0, C_STEPS, num_stages=STAGES):
        offs_c = step * TILE_C + tl.arange(0, TILE_C)
        cand_tile_scores(q_row, pqmin_ptr, pqmax_ptr, pscale_ptr, table_ptr, sup_ptr, cand_ptr,
                         b, h, bh, offs_c, num_cand, num_pages, group, stride_qh, stride_pmb,
                         stride_pmh, stride_psb, stride_tb, stride_ur, stride_cr, offs_d,
                         d_mask, pos, neg, row_scale, GROUP, GP, MMA, FLAT, TILE_C)
    tl.debug_barrier()
    select_cands(cand_ptr, sup_ptr, ids_ptr, bh.to(tl.int64), num_cand, top_k, group,
                 stride_cr, stride_ur, stride_ir, FLAT, BLOCK_N, BLOCK_K, BITS_C)


def launch_row(
    query: torch.Tensor, sq: list[torch.Tensor], pq: list[torch.Tensor],
    block_table: torch.Tensor, num_pages: torch.Tensor, sup_scores: torch.Tensor,
    sup_ids: torch.Tensor, cand: torch.Tensor, ids: torch.Tensor, groups: int, num_super: int,
    num_cand: int, top_k: int, num_kv_heads: int, head_dim: int, group: int, flat: bool,
    scoring: Scoring, num_warps: int, *, GROUP: int, GP: int, MMA: bool, BLOCK_D: int,
) -> None:
    """Launch :func:`_row_kernel` over ``sup_ids.shape[0]`` rows (buffers from the caller)."""
    block_s = 1 if flat else triton.next_power_of_2(groups)
    block_n = triton.next_power_of_2(num_cand)
    tile = scoring.super_tile
    _row_kernel[(sup_ids.shape[0],)](
        query, sq[0], sq[1], sq[2], pq[0], pq[1], pq[2], block_table, num_pages, sup_scores,
        sup_ids, cand, ids, groups, num_super, num_cand, top_k, num_kv_heads, head_dim, group,
        query.stride(0), query.stride(1), sq[0].stride(0), sq[0].stride(1),
        sq[0].stride(2) if not flat else 0, sq[2].stride(0), sq[2].stride(1),
        sup_scores.stride(0), pq[0].stride(0), pq[0].stride(1), pq[2].stride(0),
        block_table.stride(0), sup_ids.stride(0), cand.stride(0), top_k,
        GROUP=GROUP, GP=GP, MMA=MMA, FLAT=flat, S_TILE=tile,
        S_STEPS=1 if flat else triton.cdiv(groups, tile), BLOCK_S=block_s,
        BLOCK_M=triton.next_power_of_2(num_super), BITS_S=radix_bits(block_s), TILE_C=tile,
        C_STEPS=triton.cdiv(num_cand, tile), BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(top_k), BITS_C=radix_bits(block_n), STAGES=scoring.stages,
        BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
