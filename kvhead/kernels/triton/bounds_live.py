"""Triton append for :class:`kvhead.core.bounds.live.LiveBounds`: one launch per decode step.

One program per (row, KV head) folds the row's key into the exact fp32 boxes of its open page
and open super-page, and when the key closes the page (or the group) rounds the box onto the
int8 grid exactly as :meth:`kvhead.core.bounds.compact.CompactBounds.quantize` does: the scale and
the ceil/floor with their fix-ups run in fp64, so closed boxes are bit-identical to a build from
scratch. No program touches another's memory (one token per row), so unlike the fp32
``update_bounds`` there is no reset launch and no atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvhead.core.bounds.compact import _SCALE_PAD, QMAX
from kvhead.core.bounds.live import LiveBounds

# Constants of CompactBounds.quantize, as compile-time values (all exact in fp32 and fp64).
_QMAX = tl.constexpr(float(QMAX))
_PAD = tl.constexpr(_SCALE_PAD)
_TINY = tl.constexpr(float(torch.finfo(torch.float32).tiny))


@triton.jit
def _quantize_box(lo, hi, d_mask):
    """``CompactBounds.quantize`` of one box (lanes of ``lo``/``hi``): int8 pair and scale."""
    lo64 = lo.to(tl.float64)
    hi64 = hi.to(tl.float64)
    finite = (tl.abs(lo64) < float("inf")) & (tl.abs(hi64) < float("inf"))
    filled = tl.sum((d_mask & ~finite).to(tl.int32), 0) == 0
    lo64 = tl.where(filled & d_mask, lo64, 0.0)
    hi64 = tl.where(filled & d_mask, hi64, 0.0)
    amax = tl.max(tl.maximum(tl.abs(lo64), tl.abs(hi64)), 0)
    scale = (amax / _QMAX * _PAD).to(tl.float32)
    s = tl.maximum(scale.to(tl.float64), _TINY)
    qmax = tl.math.ceil(hi64 / s)
    qmin = tl.math.floor(lo64 / s)
    qmax = tl.where(qmax * s < hi64, qmax + 1.0, qmax)
    qmin = tl.where(qmin * s > lo64, qmin - 1.0, qmin)
    qmax = tl.minimum(tl.maximum(qmax, -_QMAX), _QMAX)
    qmin = tl.minimum(tl.maximum(qmin, -_QMAX), _QMAX)
    return qmin.to(tl.int8), qmax.to(tl.int8), scale


@triton.jit
def _fold_open(min_ptr, max_ptr, key, start, live):
    """Fold ``key`` into one open box (a fresh box where ``start``); returns the new box."""
    lo = tl.load(min_ptr, mask=live & ~start, other=float("inf"))
    hi = tl.load(max_ptr, mask=live & ~start, other=float("-inf"))
    lo = tl.minimum(lo, key)
    hi = tl.maximum(hi, key)
    tl.store(min_ptr, lo, mask=live)
    tl.store(max_ptr, hi, mask=live)
    return lo, hi


@triton.jit
def _append_kernel(
    keys_ptr,
    slots_ptr,
    pos_ptr,
    omin_ptr,
    omax_ptr,
    pmin_ptr,
    pmax_ptr,
    pscale_ptr,
    smin_ptr,
    smax_ptr,
    sscale_ptr,
    page_size,
    group,
    head_dim,
    stride_kb,
    stride_kh,
    stride_ob,
    stride_ow,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_psb,
    stride_psh,
    stride_sb,
    stride_sh,
    stride_ss,
    stride_ssb,
    stride_ssh,
    stride_sss,
    HAS_SUPER: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    # Row scalars loaded once per lane: the interpreter rejects masks built from a scalar.
    slot = tl.load(slots_ptr + b + offs_d * 0).to(tl.int64)
    pos = tl.load(pos_ptr + b + offs_d * 0).to(tl.int64)
    live = (slot >= 0) & d_mask
    offset = pos % page_size
    page = pos // page_size
    key = tl.load(keys_ptr + b * stride_kb + h * stride_kh + offs_d, mask=live, other=0.0).to(
        tl.float32
    )
    first = offs_d == 0

    box = b * stride_ob + h * stride_oh + offs_d
    lo, hi = _fold_open(omin_ptr + box, omax_ptr + box, key, offset == 0, live)
    closes = live & (offset == page_size - 1)
    qmin, qmax, scale = _quantize_box(lo, hi, d_mask)
    at = (slot // page_size) * stride_pb + h * stride_ph
    tl.store(pmin_ptr + at + offs_d, qmin, mask=closes)
    tl.store(pmax_ptr + at + offs_d, qmax, mask=closes)
    tl.store(
        pscale_ptr + (slot // page_size) * stride_psb + h * stride_psh + offs_d * 0,
        scale + tl.zeros([BLOCK_D], tl.float32),
        mask=closes & first,
    )
    if HAS_SUPER:
        box += stride_ow
        lo, hi = _fold_open(
            omin_ptr + box, omax_ptr + box, key, (offset == 0) & (page % group == 0), live
        )
        closes = closes & (page % group == group - 1)
        qmin, qmax, scale = _quantize_box(lo, hi, d_mask)
        at = b * stride_sb + h * stride_sh + (page // group) * stride_ss
        tl.store(smin_ptr + at + offs_d, qmin, mask=closes)
        tl.store(smax_ptr + at + offs_d, qmax, mask=closes)
        tl.store(
            sscale_ptr + b * stride_ssb + h * stride_ssh + (page // group) * stride_sss,
            scale + tl.zeros([BLOCK_D], tl.float32),
            mask=closes & first,
        )


def append_bounds(
    live: LiveBounds, keys: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
) -> None:
    """Triton :meth:`LiveBounds.append`: one key per row, ``keys [B, Hkv, D]``."""
    batch, num_kv_heads, head_dim = keys.shape
    pages, supers = live.pages, live.supers
    if (
        live.open_min.shape != (batch, 2, num_kv_heads, head_dim)
        or slots.shape != (batch,)
        or positions.shape != (batch,)
    ):
        raise ValueError(
            f"append_bounds: keys {tuple(keys.shape)}, slots {tuple(slots.shape)}, "
            f"positions {tuple(positions.shape)} do not fit open boxes "
            f"{tuple(live.open_min.shape)}"
        )
    if live.open_min.stride() != live.open_max.stride() or live.open_min.stride(3) != 1:
        raise ValueError("append_bounds: open boxes must share a layout with contiguous dim")
    for c in (pages, supers):
        if c is not None and (c.qmin.stride() != c.qmax.stride() or c.qmin.stride(-1) != 1):
            raise ValueError("append_bounds: int8 bounds must share a layout, contiguous dim")
    if batch == 0:
        return
    keys = keys if keys.stride(2) == 1 else keys.contiguous()
    slots, positions = slots.contiguous(), positions.contiguous()
    sup = supers if supers is not None else pages  # placeholder pointers when flat only
    s_strides = (
        (
            sup.qmin.stride(0),
            sup.qmin.stride(1),
            sup.qmin.stride(2),
            sup.scale.stride(0),
            sup.scale.stride(1),
            sup.scale.stride(2),
        )
        if supers is not None
        else (0,) * 6
    )
    _append_kernel[(batch, num_kv_heads)](
        keys,
        slots,
        positions,
        live.open_min,
        live.open_max,
        pages.qmin,
        pages.qmax,
        pages.scale,
        sup.qmin,
        sup.qmax,
        sup.scale,
        live.page_size,
        live.group,
        head_dim,
        keys.stride(0),
        keys.stride(1),
        live.open_min.stride(0),
        live.open_min.stride(1),
        live.open_min.stride(2),
        pages.qmin.stride(0),
        pages.qmin.stride(1),
        pages.scale.stride(0),
        pages.scale.stride(1),
        *s_strides,
        HAS_SUPER=supers is not None,
        BLOCK_D=triton.next_power_of_2(head_dim),
        num_warps=1,
    )
