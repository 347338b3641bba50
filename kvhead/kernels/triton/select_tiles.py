"""Tile scoring shared by the int8 selection kernels (multi-launch and one-launch).

Each helper scores one tile of int8 boxes for one (sequence, KV head) row by the Quest bound,
max over the GQA group, on CUDA cores (fp32) or tensor cores (int8 digits of the query,
:mod:`kvhead.kernels.triton.box_score`), and applies the selection's masks: -inf where there is no
page or super-page, +inf for the newest one (it is still being written, so it is forced).
The ``*_best`` variants return the scores; the ``*_scores`` variants store them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from kvhead.kernels.triton.box_score import box_scores, box_scores_mma, query_digits


@triton.jit
def score_tile(
    q_ptr,
    stride_qh,
    h,
    qmin_ptr,
    qmax_ptr,
    box,
    scale,
    offs_d,
    d_mask,
    mask,
    pos,
    neg,
    row_scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Scores of one tile of boxes (row offsets ``box``) by the chosen arithmetic."""
    qmax = tl.load(qmax_ptr + box[:, None] + offs_d[None, :], mask=mask, other=0)
    qmin = tl.load(qmin_ptr + box[:, None] + offs_d[None, :], mask=mask, other=0)
    if MMA:
        best = box_scores_mma(pos, neg, row_scale, qmin, qmax, scale, GROUP, GP, BLOCK)
    else:
        best = box_scores(
            q_ptr,
            stride_qh,
            h,
            qmin.to(tl.float32),
            qmax.to(tl.float32),
            scale,
            offs_d,
            d_mask,
            GROUP,
        )
    return best


@triton.jit
def group_digits(
    q_ptr, stride_qh, h, offs_d, d_mask, GROUP: tl.constexpr, GP: tl.constexpr, MMA: tl.constexpr
):
    """The query's int8 digit rows when scoring on tensor cores (placeholders otherwise)."""
    if MMA:
        pos, neg, row_scale = query_digits(q_ptr, stride_qh, h, offs_d, d_mask, GROUP, GP)
    else:  # one return statement: compiled Triton wants equal types on every return
        pos = tl.zeros([1], tl.int8)
        neg = pos
        row_scale = tl.zeros([1], tl.float32)
    return pos, neg, row_scale


@triton.jit
def super_tile_best(
    q_ptr,
    qmin_ptr,
    qmax_ptr,
    scale_ptr,
    b,
    h,
    offs_s,
    num_groups,
    bound,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_sb,
    stride_sh,
    offs_d,
    d_mask,
    pos,
    neg,
    row_scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Scores of super-pages ``offs_s`` of row (b, h): -inf past the sequence, newest +inf.

    Boxes are read below ``bound``: ``num_groups`` reads only the sequence's; the row's width
    lets the loads start before the page count arrives (latency-bound callers)."""
    valid = offs_s < num_groups
    loaded = offs_s < bound
    box = b.to(tl.int64) * stride_mb + h * stride_mh + offs_s.to(tl.int64) * stride_ms
    scale = tl.load(
        scale_ptr + b.to(tl.int64) * stride_sb + h * stride_sh + offs_s, mask=loaded, other=0.0
    )
    best = score_tile(
        q_ptr,
        stride_qh,
        h,
        qmin_ptr,
        qmax_ptr,
        box,
        scale,
        offs_d,
        d_mask,
        loaded[:, None] & d_mask[None, :],
        pos,
        neg,
        row_scale,
        GROUP,
        GP,
        MMA,
        BLOCK_S,
    )
    best = tl.where(valid, best, float("-inf"))
    return tl.where(offs_s == num_groups - 1, float("inf"), best)


@triton.jit
def super_tile_scores(
    q_ptr,
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
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Score super-pages ``offs_s`` of row ``bh`` (newest forced) into ``scores``."""
    best = super_tile_best(
        q_ptr,
        qmin_ptr,
        qmax_ptr,
        scale_ptr,
        b,
        h,
        offs_s,
        num_groups,
        num_groups,
        stride_qh,
        stride_mb,
        stride_mh,
        stride_ms,
        stride_sb,
        stride_sh,
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
    tl.store(scores_ptr + bh * stride_sr + offs_s, best, mask=offs_s < num_groups_max)


@triton.jit
def block_tile_best(
    q_ptr,
    qmin_ptr,
    qmax_ptr,
    scale_ptr,
    block,
    h,
    page,
    loaded,
    valid,
    num_pages,
    stride_qh,
    stride_mb,
    stride_mh,
    stride_sb,
    offs_d,
    d_mask,
    pos,
    neg,
    row_scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    TILE: tl.constexpr,
):
    """Scores of pages ``page`` held in blocks ``block`` (boxes read where ``loaded``):
    -inf where not ``valid``, the newest page +inf."""
    block = tl.maximum(block, 0).to(tl.int64)
    scale = tl.load(scale_ptr + block * stride_sb + h, mask=loaded, other=0.0)
    best = score_tile(
        q_ptr,
        stride_qh,
        h,
        qmin_ptr,
        qmax_ptr,
        block * stride_mb + h * stride_mh,
        scale,
        offs_d,
        d_mask,
        loaded[:, None] & d_mask[None, :],
        pos,
        neg,
        row_scale,
        GROUP,
        GP,
        MMA,
        TILE,
    )
    best = tl.where(valid, best, float("-inf"))
    return tl.where(valid & (page == num_pages - 1), float("inf"), best)


@triton.jit
def cand_tile_best(
    q_ptr,
    qmin_ptr,
    qmax_ptr,
    scale_ptr,
    table_ptr,
    sup_ptr,
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
    offs_d,
    d_mask,
    pos,
    neg,
    row_scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    FLAT: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """Scores of candidate slots ``offs_c`` (pages of the chosen super-pages, or every page
    when ``FLAT``) through the block table: -inf where no page, newest page +inf."""
    in_range = offs_c < num_cand
    if FLAT:
        page = offs_c.to(tl.int64)
        valid = in_range & (page < num_pages)
    else:
        sup = tl.load(sup_ptr + bh * stride_ur + offs_c // group, mask=in_range, other=-1)
        page = sup * group + offs_c % group
        valid = in_range & (sup >= 0) & (page < num_pages)
    block = tl.load(table_ptr + b * stride_tb + page, mask=valid, other=0)
    return block_tile_best(
        q_ptr,
        qmin_ptr,
        qmax_ptr,
        scale_ptr,
        block,
        h,
        page,
        valid,
        valid,
        num_pages,
        stride_qh,
        stride_mb,
        stride_mh,
        stride_sb,
        offs_d,
        d_mask,
        pos,
        neg,
        row_scale,
        GROUP,
        GP,
        MMA,
        TILE_C,
    )


@triton.jit
def cand_tile_scores(
    q_ptr,
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
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    FLAT: tl.constexpr,
    TILE_C: tl.constexpr,
):
    """Score candidate slots ``offs_c`` into ``cand`` (see :func:`cand_tile_best`)."""
    best = cand_tile_best(
        q_ptr,
        qmin_ptr,
        qmax_ptr,
        scale_ptr,
        table_ptr,
        sup_ptr,
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
    tl.store(cand_ptr + bh * stride_cr + offs_c, best, mask=offs_c < num_cand)
