"""Triton min/max page-bounds update on append (same function as ``PageBounds.update``).

Two launches, because the order matters across programs: a slot at page offset 0 means the block
starts a new page (possibly reused from a finished request), so its stale bounds must be reset
before any token of the batch is folded in. The fold itself uses fp32 atomic min/max, which is
exact and order-independent, so tokens of one page may land in any program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reset_kernel(
    kmin_ptr,
    kmax_ptr,
    slots_ptr,
    page_size,
    head_dim,
    stride_mb,
    stride_mh,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    # The slot is loaded once per lane: Triton's interpreter rejects masks built from a scalar.
    slot = tl.load(slots_ptr + t + offs_d * 0).to(tl.int64)
    mask = (slot >= 0) & (slot % page_size == 0) & (offs_d < head_dim)
    meta = (slot // page_size) * stride_mb + h * stride_mh + offs_d
    tl.store(kmin_ptr + meta, tl.full([BLOCK_D], float("inf"), tl.float32), mask=mask)
    tl.store(kmax_ptr + meta, tl.full([BLOCK_D], float("-inf"), tl.float32), mask=mask)


@triton.jit
def _fold_kernel(
    kmin_ptr,
    kmax_ptr,
    keys_ptr,
    slots_ptr,
    page_size,
    head_dim,
    stride_mb,
    stride_mh,
    stride_kt,
    stride_kh,
    BLOCK_D: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(slots_ptr + t + offs_d * 0).to(tl.int64)
    mask = (slot >= 0) & (offs_d < head_dim)
    key = tl.load(
        keys_ptr + t.to(tl.int64) * stride_kt + h * stride_kh + offs_d, mask=mask, other=0.0
    ).to(tl.float32)
    meta = (slot // page_size) * stride_mb + h * stride_mh + offs_d
    tl.atomic_min(kmin_ptr + meta, key, mask=mask)
    tl.atomic_max(kmax_ptr + meta, key, mask=mask)


def update_bounds(
    kmin: torch.Tensor,
    kmax: torch.Tensor,
    keys: torch.Tensor,
    slot_mapping: torch.Tensor,
    page_size: int,
) -> None:
    """Fold keys ``[T, Hkv, D]`` written at flat slots into fp32 bounds ``[num_blocks, Hkv, D]``."""
    if kmin.dtype != torch.float32 or kmax.dtype != torch.float32:
        raise ValueError(f"update_bounds: the Triton path needs fp32 bounds, got {kmin.dtype}")
    if keys.dim() != 3 or keys.shape[1:] != kmin.shape[1:] or slot_mapping.shape != keys.shape[:1]:
        raise ValueError(
            f"update_bounds: keys {tuple(keys.shape)} / slot_mapping {tuple(slot_mapping.shape)} "
            f"do not fit bounds {tuple(kmin.shape)}"
        )
    if kmin.stride() != kmax.stride() or kmin.stride(2) != 1:
        raise ValueError("update_bounds: kmin and kmax must share a layout with contiguous dim")
    num_tokens, num_kv_heads, head_dim = keys.shape
    if num_tokens == 0:
        return
    keys = keys if keys.stride(2) == 1 else keys.contiguous()
    slot_mapping = slot_mapping.contiguous()
    grid = (num_tokens, num_kv_heads)
    block_d = triton.next_power_of_2(head_dim)
    _reset_kernel[grid](
        kmin,
        kmax,
        slot_mapping,
        page_size,
        head_dim,
        kmin.stride(0),
        kmin.stride(1),
        BLOCK_D=block_d,
        num_warps=1,
    )
    _fold_kernel[grid](
        kmin,
        kmax,
        keys,
        slot_mapping,
        page_size,
        head_dim,
        kmin.stride(0),
        kmin.stride(1),
        keys.stride(0),
        keys.stride(1),
        BLOCK_D=block_d,
        num_warps=1,
    )
