"""Triton LSE combine: merges partial attentions over disjoint key sets exactly.

One kernel serves two callers: the Helix combine across KV shards and the split-K reduction of
the sparse decode kernel, because both are the same function (``O = sum_i exp(LSE_i - LSE) O_i``).
The shard axis is walked in chunks with a running maximum, so any number of shards fits in a
fixed register budget. Shards with LSE = -inf carry zero weight; a row that no shard covers
gets out = 0, LSE = -inf, exactly as :func:`kvhead.core.combine.combine_partials`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _combine_kernel(
    outs_ptr,
    lses_ptr,
    out_ptr,
    lse_ptr,
    num_shards,
    head_dim,
    stride_os,
    stride_or,
    stride_ls,
    stride_out_r,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    run_max = tl.full([1], float("-inf"), tl.float32)
    run_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for s0 in range(0, num_shards, BLOCK_S):
        offs_s = s0 + tl.arange(0, BLOCK_S)
        s_mask = offs_s < num_shards
        lse = tl.load(lses_ptr + offs_s * stride_ls + row, mask=s_mask, other=float("-inf"))
        lse = lse.to(tl.float32)
        part = tl.load(
            outs_ptr + offs_s[:, None] * stride_os + row * stride_or + offs_d[None, :],
            mask=s_mask[:, None] & d_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(lse, 0))
        # All shards so far empty: shift by 0 so exp(-inf - 0) = 0 instead of NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - shift)
        weight = tl.exp(lse - shift)
        run_sum = run_sum * alpha + tl.sum(weight, 0)
        acc = acc * alpha + tl.sum(weight[:, None] * part, 0)
        run_max = new_max
    covered = run_sum > 0
    out = tl.where(covered, acc / tl.where(covered, run_sum, 1.0), 0.0)
    lse_out = tl.where(covered, run_max + tl.log(tl.where(covered, run_sum, 1.0)), float("-inf"))
    tl.store(out_ptr + row * stride_out_r + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
    tl.store(lse_ptr + row + tl.arange(0, 1), lse_out)


def combine(
    outs: torch.Tensor,
    lses: torch.Tensor,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``outs [S, ..., D]`` / ``lses [S, ...]`` over axis 0 (see module docstring).

    ``out_dtype`` defaults to the dtype of ``outs``; the split-K path passes the query dtype so
    its fp32 partials are rounded once, at the end.
    """
    if outs.dim() < 2 or lses.shape != outs.shape[:-1]:
        raise ValueError(
            f"combine: expected outs [S, ..., D] and lses [S, ...], got {tuple(outs.shape)} "
            f"and {tuple(lses.shape)}"
        )
    num_shards, head_dim = outs.shape[0], outs.shape[-1]
    rows_shape = outs.shape[1:-1]
    flat_out = outs.reshape(num_shards, -1, head_dim)
    if flat_out.stride(-1) != 1:
        flat_out = flat_out.contiguous()
    flat_lse = lses.reshape(num_shards, -1).contiguous()
    num_rows = flat_out.shape[1]
    out = torch.empty(num_rows, head_dim, dtype=out_dtype or outs.dtype, device=outs.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=outs.device)
    if num_rows and num_shards:
        _combine_kernel[(num_rows,)](
            flat_out,
            flat_lse,
            out,
            lse,
            num_shards,
            head_dim,
            flat_out.stride(0),
            flat_out.stride(1),
            flat_lse.stride(0),
            out.stride(0),
            BLOCK_S=min(16, triton.next_power_of_2(num_shards)),
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
    elif num_rows:
        out.zero_()
        lse.fill_(float("-inf"))
    return out.reshape(*rows_shape, head_dim), lse.reshape(rows_shape)
