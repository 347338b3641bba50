"""Quest bound of int8 boxes for a GQA group of queries: the scoring step of every int8 kernel.

score(box) = max over the group's query heads g of  scale x sum_d max(q_gd x qmax_d, q_gd x qmin_d)
           = scale x max_g (relu(q_g) . qmax + min(q_g, 0) . qmin).

Two ways to compute it, same function:

* ``box_scores`` (CUDA cores): dequantise the tile to fp32 and reduce over d per query head.
  Per box that is 2 D int8 -> fp32 conversions (a quarter-rate instruction) and one row
  reduction per query head; at 260 bytes per box the arithmetic, not the bytes, set its speed
  (super-page scoring ran at 26-34% of the copy bandwidth on an H200).
* ``box_scores_mma`` (tensor cores, int8 x int8 -> int32): each query row is written exactly
  enough as three int8 digits, q ~ s (d0 + d1 / 127 + d2 / 127^2) with s = max|q| / 127
  (error <= max|q| / (2 x 127^3), about 2.4e-7 of max|q|: fp32 rounding level), split by sign
  into relu and min parts. Two int8 dots of [4 x groups rows, D] by the box tile give every
  digit's dot product exactly in int32; the boxes are never converted and nothing is reduced
  across lanes but the (at most 4 x group) rows.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def box_scores(q_ptr, stride_qh, h, qmin, qmax, scale, offs_d, d_mask, GROUP: tl.constexpr):
    """Max over the GQA group of the dequantised Quest bound of each box (fp32 tiles)."""
    best = tl.zeros_like(scale) + float("-inf")
    for g in tl.static_range(GROUP):
        q = tl.load(q_ptr + (h * GROUP + g) * stride_qh + offs_d, mask=d_mask, other=0.0)
        q = q.to(tl.float32)
        raw = tl.sum(tl.maximum(q, 0.0)[None, :] * qmax + tl.minimum(q, 0.0)[None, :] * qmin, 1)
        best = tl.maximum(best, raw * scale)
    return best


@triton.jit
def query_digits(q_ptr, stride_qh, h, offs_d, d_mask, GROUP: tl.constexpr, GP: tl.constexpr):
    """int8 digit rows of the group's queries: ``(pos, neg, row_scale)``.

    Rows ``r = part x GP + g`` (part 0..2 the digits, part 3 zero; g < GROUP a query head).
    ``pos``/``neg`` ``[4 GP, D]`` int8 hold the digits where q > 0 / q < 0, ``row_scale``
    ``[4 GP]`` fp32 the weight of each row's digit (0 for padding rows).
    """
    rows = tl.arange(0, 4 * GP)
    part = rows // GP
    g = rows % GP
    ok = (g < GROUP)[:, None] & d_mask[None, :]
    q = tl.load(
        q_ptr + (h * GROUP + g)[:, None] * stride_qh + offs_d[None, :], mask=ok, other=0.0
    ).to(tl.float32)
    s0 = tl.maximum(tl.max(tl.abs(q), 1), 1e-30) / 127.0  # [R]
    d0 = tl.math.floor(q / s0[:, None] + 0.5)
    s1 = s0 / 127.0
    r0 = q - d0 * s0[:, None]
    d1 = tl.math.floor(r0 / s1[:, None] + 0.5)
    s2 = s1 / 127.0
    d2 = tl.math.floor((r0 - d1 * s1[:, None]) / s2[:, None] + 0.5)
    digit = tl.where((part == 0)[:, None], d0, tl.where((part == 1)[:, None], d1, d2))
    digit = tl.where((part < 3)[:, None], digit, 0.0)
    row_scale = tl.where(part == 0, s0, tl.where(part == 1, s1, tl.where(part == 2, s2, 0.0)))
    pos = tl.where(q > 0, digit, 0.0).to(tl.int8)
    neg = tl.where(q < 0, digit, 0.0).to(tl.int8)
    return pos, neg, row_scale


@triton.jit
def box_scores_mma(
    pos,
    neg,
    row_scale,
    qmin,
    qmax,
    scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Same as :func:`box_scores` from int8 tiles ``qmin``/``qmax`` ``[BLOCK_S, D]`` and the
    digits of :func:`query_digits`: two int8 tensor-core dots, exact int32 per digit."""
    acc = tl.dot(pos, tl.trans(qmax), out_dtype=tl.int32)
    acc += tl.dot(neg, tl.trans(qmin), out_dtype=tl.int32)  # [4 GP, BLOCK_S]
    raw = acc.to(tl.float32) * row_scale[:, None]
    raw = tl.sum(tl.reshape(raw, (4, GP, BLOCK_S)), 0)  # digits summed: [GP, BLOCK_S]
    g = tl.arange(0, GP)
    raw = tl.where((g < GROUP)[:, None], raw, float("-inf"))
    return tl.max(raw, 0) * scale
