"""Triton sparse paged decode attention (split-K flash decoding over per-head page lists).

Same function as :func:`kvhead.core.attention.sparse_decode_attention`. Each program owns one
(sequence, KV head) and a contiguous slice of that head's *listed tokens*: listed token t is
offset ``t % P`` of listed page ``t // P``. Walking listed tokens rather than pages lets one
tile span several pages (any page size works, and a tile of 64 tokens reads four 16-token pages
in one pass), and it makes the split even no matter how pages are padded.

The whole GQA group of a KV head is one small matrix (padded to 16 rows for ``tl.dot``), so every
K/V byte is read once per group, not once per query head. Partials (fp32 out, LSE) go through
the exact LSE combine in :mod:`kvhead.kernels.triton.combine`, so the split count changes only
speed.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvhead.kernels.triton.combine import combine


@dataclass(frozen=True)
class LaunchConfig:
    """Launch shape of the split kernel; results never depend on it beyond fp32 rounding.

    The defaults won a sweep on an H200 (benchmarks/gpu/gpu_kernels.py, 128k context, K = 64,
    batch 1/8/64; see docs/gpu.md): larger tiles put more bytes in flight per
    dependent page-id -> block -> K/V load chain, which is what bounds this kernel.
    """

    tile_tokens: int = 128  # listed tokens per inner step (eight 16-token pages, 64 KiB K+V)
    programs_per_sm: int = 4  # split each head until the grid holds this many programs per SM
    num_warps: int = 4
    num_stages: int = 2


DEFAULT_CONFIG = LaunchConfig()
_DOT_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@triton.jit
def _sparse_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    seq_lens_ptr,
    ids_ptr,
    part_out_ptr,
    part_lse_ptr,
    scale,
    num_listed,
    tokens_per_split,
    num_kv_heads,
    head_dim,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kp,
    stride_kh,
    stride_vb,
    stride_vp,
    stride_vh,
    stride_tb,
    stride_ib,
    stride_ih,
    stride_po_s,
    stride_pl_s,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    q_rows = h * GROUP + offs_g
    q = tl.load(
        q_ptr + b * stride_qb + q_rows[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(DOT_DTYPE)
    seq_len = tl.load(seq_lens_ptr + b)
    start = split * tokens_per_split
    end = tl.minimum(start + tokens_per_split, num_listed * PAGE_SIZE)

    run_max = tl.full([BLOCK_G], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for t0 in range(start, end, BLOCK_N):
        t = t0 + offs_n
        slot = t // PAGE_SIZE
        offset = t % PAGE_SIZE
        page = tl.load(ids_ptr + b * stride_ib + h * stride_ih + slot, mask=t < end, other=-1)
        listed = page >= 0
        block = tl.load(table_ptr + b * stride_tb + page, mask=listed, other=0).to(tl.int64)
        valid = listed & (page * PAGE_SIZE + offset < seq_len)
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(
            k_ptr
            + (block * stride_kb + offset * stride_kp + h * stride_kh)[:, None]
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        v = tl.load(
            v_ptr
            + (block * stride_vb + offset * stride_vp + h * stride_vh)[:, None]
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        logits = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=PRECISION) * scale
        logits = tl.where(valid[None, :], logits, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(logits, 1))
        # A row with no valid token yet keeps max -inf; shifting by 0 keeps exp() at 0, not NaN.
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        alpha = tl.exp(run_max - shift)
        probs = tl.exp(logits - shift[:, None])
        run_sum = run_sum * alpha + tl.sum(probs, 1)
        acc = acc * alpha[:, None] + tl.dot(
            probs.to(DOT_DTYPE), v.to(DOT_DTYPE), input_precision=PRECISION
        )
        run_max = new_max

    covered = run_sum > 0
    out = tl.where(covered[:, None], acc / tl.where(covered, run_sum, 1.0)[:, None], 0.0)
    lse = tl.where(covered, run_max + tl.log(tl.where(covered, run_sum, 1.0)), float("-inf"))
    row = b * num_kv_heads * GROUP + q_rows
    tl.store(
        part_out_ptr + split * stride_po_s + row[:, None] * head_dim + offs_d[None, :],
        out,
        mask=g_mask[:, None] & d_mask[None, :],
    )
    tl.store(part_lse_ptr + split * stride_pl_s + row, lse, mask=g_mask)


def _check(query, k_cache, v_cache, block_table, seq_lens, page_ids) -> None:
    """Shape checks with messages a caller can act on (a bad shape would read wild memory)."""
    if query.dim() != 3 or k_cache.dim() != 4 or v_cache.shape != k_cache.shape:
        raise ValueError(
            "sparse_decode_attention: expected query [B, Hq, D] and k/v caches "
            f"[num_blocks, P, Hkv, D], got {tuple(query.shape)}, {tuple(k_cache.shape)}, "
            f"{tuple(v_cache.shape)}"
        )
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim or num_q_heads % num_kv_heads:
        raise ValueError(
            f"sparse_decode_attention: query heads {num_q_heads} / dim {head_dim} do not fit "
            f"{num_kv_heads} KV heads of dim {k_cache.shape[3]}"
        )
    if page_ids.shape[:2] != (batch, num_kv_heads) or page_ids.dim() != 3:
        raise ValueError(
            f"sparse_decode_attention: page_ids must be [B={batch}, Hkv={num_kv_heads}, K], "
            f"got {tuple(page_ids.shape)}"
        )
    if block_table.dim() != 2 or block_table.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(
            "sparse_decode_attention: block_table must be [B, max_pages] and seq_lens [B], got "
            f"{tuple(block_table.shape)} and {tuple(seq_lens.shape)}"
        )
    if k_cache.dtype not in _DOT_DTYPES or query.dtype not in _DOT_DTYPES:
        raise ValueError(
            f"sparse_decode_attention: supports fp32/fp16/bf16, got query {query.dtype}, "
            f"cache {k_cache.dtype}"
        )
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ValueError("sparse_decode_attention: k/v caches need a contiguous head_dim axis")


@functools.cache
def _sm_count(device: torch.device) -> int:
    return (
        torch.cuda.get_device_properties(device).multi_processor_count
        if device.type == "cuda"
        else 4
    )


def _num_splits(programs: int, num_tiles: int, device: torch.device, per_sm: int) -> int:
    """Split each head's token list until the grid holds ``per_sm`` programs per SM."""
    wanted = max(1, -(-per_sm * _sm_count(device) // max(programs, 1)))
    return max(1, min(wanted, num_tiles))


def sparse_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_ids: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    config: LaunchConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of :func:`kvhead.core.attention.sparse_decode_attention` (same arguments).

    ``num_splits`` overrides the split-K heuristic and ``config`` the launch shape (benchmarks
    sweep both); results do not depend on either beyond fp32 rounding.
    """
    _check(query, k_cache, v_cache, block_table, seq_lens, page_ids)
    batch, num_q_heads, head_dim = query.shape
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = num_q_heads // num_kv_heads
    query = query if query.stride(2) == 1 else query.contiguous()
    block_table = block_table if block_table.stride(1) == 1 else block_table.contiguous()
    page_ids = page_ids if page_ids.stride(2) == 1 else page_ids.contiguous()
    seq_lens = seq_lens.contiguous()  # an expanded view would make every row read row 0
    num_listed = page_ids.shape[2]
    tile = config.tile_tokens
    num_tiles = max(1, -(-num_listed * page_size // tile))
    splits = num_splits or _num_splits(
        batch * num_kv_heads, num_tiles, query.device, config.programs_per_sm
    )
    splits = max(1, min(splits, num_tiles))
    tiles_per_split = -(-num_tiles // splits)
    splits = -(-num_tiles // tiles_per_split)
    part_out = torch.empty(
        splits, batch * num_q_heads, head_dim, dtype=torch.float32, device=query.device
    )
    part_lse = torch.empty(splits, batch * num_q_heads, dtype=torch.float32, device=query.device)
    if batch:
        dot_dtype = _DOT_DTYPES[k_cache.dtype]
        if os.environ.get("TRITON_INTERPRET") == "1":
            dot_dtype = tl.float32  # the interpreter (triton 3.9) multiplies bf16 dots wrongly
        precision = "ieee" if dot_dtype == tl.float32 else "tf32"
        _sparse_decode_kernel[(batch * num_kv_heads, splits)](
            query,
            k_cache,
            v_cache,
            block_table,
            seq_lens,
            page_ids,
            part_out,
            part_lse,
            float(scale),
            num_listed,
            tiles_per_split * tile,
            num_kv_heads,
            head_dim,
            query.stride(0),
            query.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            v_cache.stride(0),
            v_cache.stride(1),
            v_cache.stride(2),
            block_table.stride(0),
            page_ids.stride(0),
            page_ids.stride(1),
            part_out.stride(0),
            part_lse.stride(0),
            GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
            PAGE_SIZE=page_size,
            BLOCK_N=tile,
            DOT_DTYPE=dot_dtype,
            PRECISION=precision,
            num_warps=config.num_warps,
            num_stages=config.num_stages,
        )
    out, lse = combine(part_out, part_lse, out_dtype=query.dtype)
    return out.view(batch, num_q_heads, head_dim), lse.view(batch, num_q_heads)
