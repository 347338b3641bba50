"""Triton page scoring from min/max bounds and per-head top-K selection.

Same function as ``select_top_k(score_pages(query, bounds, block_table, num_pages), top_k,
num_pages)``. Two launches, by design:

* the scoring kernel is a bandwidth job (it reads every page's bounds: 1 KiB per page and head
  in fp32), so it is split over (sequence, KV head, page tile) to use every SM even at batch 1;
* the selection kernel holds one (sequence, KV head) row of scores in registers and finds the
  K-th largest score by a radix search on its order-preserving integer key (2 bits per pass:
  16 passes over registers instead of 32 for a bisection), then writes the selected page
  ids in ascending order with a prefix sum, so no sort is needed.

Between them sit only the scores (4 bytes per page and head, 1/256 of the bounds just read).
Ties at the K-th score are resolved towards lower page ids; torch's topk may pick other ids of
equal score, so compare selected score sets, not ids.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvhead.kernels.triton.pdl import gdc_launch_dependents, gdc_wait

SCORE_TILE = 32  # pages per scoring program: 32 KiB of fp32 bounds per KV head at head_dim 128


@triton.jit
def _score_kernel(
    q_ptr,
    kmin_ptr,
    kmax_ptr,
    table_ptr,
    num_pages_ptr,
    scores_ptr,
    max_pages,
    num_kv_heads,
    head_dim,
    stride_qb,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_tb,
    stride_sr,
    GROUP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    offs_p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    num_pages = tl.load(num_pages_ptr + b)
    valid = offs_p < num_pages
    block = tl.load(table_ptr + b * stride_tb + offs_p, mask=valid, other=0)
    block = tl.maximum(block, 0).to(tl.int64)
    meta = (block * stride_mb + h * stride_mh)[:, None] + offs_d[None, :]
    meta_mask = valid[:, None] & d_mask[None, :]
    kmax = tl.load(kmax_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
    kmin = tl.load(kmin_ptr + meta, mask=meta_mask, other=0.0).to(tl.float32)
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    for g in tl.static_range(GROUP):
        q = tl.load(
            q_ptr + b * stride_qb + (h * GROUP + g) * stride_qh + offs_d, mask=d_mask, other=0.0
        ).to(tl.float32)
        bound = tl.sum(tl.maximum(q, 0.0)[None, :] * kmax + tl.minimum(q, 0.0)[None, :] * kmin, 1)
        best = tl.maximum(best, bound)
    best = tl.where(valid, best, float("-inf"))
    # The newest page is still being written: its bounds cover only part of it, so it is forced
    # (an empty sequence has none).
    best = tl.where(offs_p == num_pages - 1, float("inf"), best)
    tl.store(scores_ptr + bh * stride_sr + offs_p, best, mask=offs_p < max_pages)


def radix_bits(block_n: int) -> int:
    """Key bits settled per pass of :func:`_top_k_positions` for a row of ``block_n`` lanes.

    Each pass counts ``2**bits`` thresholds at once, a ``[block_n, 2**bits]`` comparison held in
    registers, and ends in one block-wide reduction. Measured on an H200 (top-32 of 1024 lanes,
    graph replay, 8 / 512 rows): 1 bit (a plain bisection, 32 passes) 10.5 / 15.3 us, 2 bits
    8.0 / 14.6 us, 4 bits 8.5 / 26.9 us (the wider comparison costs more than the saved passes).
    """
    return 2 if block_n <= 4096 else 1


@triton.jit
def _top_k_positions(score, top_k, BITS: tl.constexpr):
    """Which lanes of a row of scores are in its top-``top_k`` (-inf lanes never are).

    Returns ``(chosen, slot, wanted)``: the lane mask, each chosen lane's rank in ascending lane
    order (its output slot) and how many lanes were chosen. Shared by the flat and the two-level
    selection kernels.
    """
    valid = score > float("-inf")
    # Order-preserving unsigned key: flip the magnitude bits of negative floats (signed order
    # then equals float order), then the sign bit (unsigned order equals signed order).
    bits = score.to(tl.int32, bitcast=True)
    key = (bits ^ ((bits >> 31) & 0x7FFFFFFF) ^ -2147483648).to(tl.uint32, bitcast=True)
    wanted = tl.minimum(tl.sum(valid.to(tl.int32), 0), top_k)
    # Radix search for the wanted-th largest key, BITS bits per pass: the invariant is that at
    # least `wanted` keys are >= lo and fewer than `wanted` are >= lo + 2**(shift + BITS).
    # The search stops early once exactly `wanted` keys are >= lo: lo then separates the
    # top-K from the rest whatever the lower bits (typically after 8-11 of 16 passes).
    digits = tl.arange(0, 1 << BITS).to(tl.uint32)
    lo = tl.zeros([1], tl.uint32)
    shift = tl.zeros([], tl.int32) + (32 - BITS)
    count = wanted + 1
    while (shift >= 0) & (count != wanted):
        steps = lo + (digits << shift.to(tl.uint32))
        hits = valid[:, None] & (key[:, None] >= steps[None, :])
        counts = tl.sum(hits.to(tl.int32), 0)
        enough = counts >= wanted
        lo = lo + (tl.max(tl.where(enough, digits, 0), 0) << shift.to(tl.uint32))
        count = tl.min(tl.where(enough, counts, 2147483647), 0)
        shift -= BITS
    above = valid & (key > lo)
    tied = valid & (key == lo)
    tie_rank = tl.cumsum(tied.to(tl.int32), 0) - 1
    chosen = above | (tied & (tie_rank < wanted - tl.sum(above.to(tl.int32), 0)))
    slot = tl.cumsum(chosen.to(tl.int32), 0) - 1
    return chosen, slot, wanted


@triton.jit
def select_cands(
    cand_ptr,
    sup_ptr,
    ids_ptr,
    row,
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
):
    """Top-K candidate slots (radix select), written as logical pages. Candidates are laid
    out super-page by super-page in ascending order, so ascending slots are ascending pages."""
    offs = tl.arange(0, BLOCK_N)
    score = tl.load(cand_ptr + row * stride_cr + offs, mask=offs < num_cand, other=float("-inf"))
    chosen, slot, wanted = _top_k_positions(score, top_k, BITS)
    if FLAT:
        page = offs.to(tl.int64)
    else:
        page = tl.load(sup_ptr + row * stride_ur + offs // group, mask=chosen, other=0) * group
        page += offs % group
    tl.store(ids_ptr + row * stride_ir + slot, page, mask=chosen)
    _pad_ids(ids_ptr + row * stride_ir, wanted, top_k, BLOCK_K)


@triton.jit
def _pad_ids(ids_row_ptr, wanted, top_k, BLOCK_K: tl.constexpr):
    """Fill output slots ``wanted .. top_k-1`` of one row with -1."""
    offs_k = tl.arange(0, BLOCK_K)
    tl.store(
        ids_row_ptr + offs_k,
        tl.full([BLOCK_K], -1, tl.int64),
        mask=(offs_k >= wanted) & (offs_k < top_k),
    )


@triton.jit
def _select_kernel(
    scores_ptr,
    ids_ptr,
    max_pages,
    top_k,
    stride_sr,
    stride_ir,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BITS: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if (
        PDL
    ):  # a dependent launch (kvhead.kernels.triton.pdl): the scores come from the kernel before
        gdc_wait()
        gdc_launch_dependents()
    # the flat case of select_cands: positions are the pages (no super-page table is read)
    select_cands(
        scores_ptr,
        scores_ptr,
        ids_ptr,
        tl.program_id(0).to(tl.int64),
        max_pages,
        top_k,
        1,
        stride_sr,
        0,
        stride_ir,
        True,
        BLOCK_N,
        BLOCK_K,
        BITS,
    )


def score_and_select(
    query: torch.Tensor,
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Top-``top_k`` logical pages ``[B, Hkv, min(top_k, max_pages)]``, ascending, -1 padded."""
    if top_k <= 0:
        raise ValueError(f"top_k must be positive, got {top_k}")
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = kmin.shape[1]
    if kmin.shape != kmax.shape or kmin.shape[2] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"score_and_select: bounds {tuple(kmin.shape)} do not fit query {tuple(query.shape)}"
        )
    if block_table.shape[0] != batch or num_pages.shape != (batch,):
        raise ValueError(
            f"score_and_select: block_table {tuple(block_table.shape)} / num_pages "
            f"{tuple(num_pages.shape)} do not match batch {batch}"
        )
    max_pages = block_table.shape[1]
    k = min(top_k, max_pages)
    query = query if query.stride(2) == 1 else query.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    num_pages = num_pages.contiguous()
    if kmin.stride() != kmax.stride() or kmin.stride(2) != 1:
        kmin, kmax = kmin.contiguous(), kmax.contiguous()
    rows = batch * num_kv_heads
    scores = torch.empty(rows, max_pages, dtype=torch.float32, device=query.device)
    ids = torch.empty(batch, num_kv_heads, k, dtype=torch.int64, device=query.device)
    if rows == 0 or max_pages == 0:
        return ids
    _score_kernel[(rows, triton.cdiv(max_pages, SCORE_TILE))](
        query,
        kmin,
        kmax,
        block_table,
        num_pages,
        scores,
        max_pages,
        num_kv_heads,
        head_dim,
        query.stride(0),
        query.stride(1),
        kmin.stride(0),
        kmin.stride(1),
        block_table.stride(0),
        scores.stride(0),
        GROUP=num_q_heads // num_kv_heads,
        BLOCK_P=SCORE_TILE,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=4,
    )
    block_n = triton.next_power_of_2(max_pages)
    _select_kernel[(rows,)](
        scores,
        ids,
        max_pages,
        k,
        scores.stride(0),
        k,
        BLOCK_N=block_n,
        BLOCK_K=triton.next_power_of_2(k),
        BITS=radix_bits(block_n),
        num_warps=max(4, min(16, block_n // 512)),
    )
    return ids
