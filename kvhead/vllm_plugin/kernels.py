"""Paged attention calls for the FlexiCache backend, on vLLM's own CPU kernels.

Every cache this backend reads (vLLM's unstable-head cache, the stable-head host arena, the
device hot pool) uses vLLM's CPU layout ``[blocks, heads, page_size, 2 * head_dim]`` (keys then
values inside a block). A per-head page list is run as one *pseudo-sequence* per (sequence, kv
head): the cache is viewed as single-head blocks (``block * heads + head``, a free reshape of a
contiguous tensor), and the head's listed pages become that pseudo-sequence's block table. The
newest page is always listed last, so masking by length covers exactly the written tokens, and
keys carry RoPE already, so page order needs no positions. This reuses vLLM's tuned kernel instead
of a second attention implementation.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from vllm import _custom_ops as ops
from vllm import envs


def _set_threads(count: int) -> None:
    """Set torch's OpenMP thread count even inside vLLM's CPU worker.

    The worker pins its OpenMP threads to cores and then replaces ``torch.set_num_threads`` with
    a stub that only logs a warning, so going through it would silently keep every thread (and
    log once per call). The team shrinks and grows back to the same pinned threads here.
    """
    torch._C.set_num_threads(count)


@contextmanager
def one_thread() -> Iterator[int]:
    """Run the enclosed torch ops on one thread; yields the caller's thread count.

    A decode step of one layer is dozens of tiny ops (page bookkeeping, policy scoring, pool
    copies): with OpenMP each pays a fork/join that costs more than it saves, many times over on
    a busy machine. The attention kernel's thread count is passed to :func:`paged_attention`.
    """
    before = torch.get_num_threads()
    _set_threads(1)
    try:
        yield before
    finally:
        _set_threads(before)


def split_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views of a ``[blocks, heads, page, 2*D]`` cache, as the kernel wants them."""
    blocks, heads, page, _ = cache.shape
    return cache.view(blocks, heads, page * 2, -1).chunk(2, dim=2)


def single_head_view(cache: torch.Tensor) -> torch.Tensor:
    """``[blocks*heads, 1, page, 2*D]`` view: block ``b`` head ``h`` becomes block ``b*heads+h``."""
    blocks, heads, page, width = cache.shape
    return cache.view(blocks * heads, 1, page, width)


def write_cache(
    cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, isa: str,
) -> None:
    """Write ``key``/``value`` ``[T, heads, D]`` at flat slots ``block * page + offset``."""
    key_cache, value_cache = split_kv(cache)
    ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa)


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    out: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    isa: str,
    threads: int | None = None,
) -> None:
    """Causal attention of ``query [T, Hq, D]`` over ``cache``, written into ``out [T, Hq, D]``.

    ``query_start_loc [R+1]`` splits the tokens into R rows; row r attends to the first
    ``seq_lens[r]`` tokens of the blocks in ``block_table[r]``. ``threads`` (when given) is the
    OpenMP thread count for the kernel, e.g. the caller's inside :func:`one_thread`.
    """
    num_rows = seq_lens.shape[0]
    if num_rows == 0:
        return
    key_cache, value_cache = split_kv(cache)
    seq_lens = seq_lens.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)
    block_table = block_table.to(torch.int32)
    inner = torch.get_num_threads()
    if threads is not None:
        _set_threads(threads)
    try:  # the scheduler splits work by the thread count, so it runs under the same one
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=num_rows, num_heads=query.shape[1], num_kv_heads=cache.shape[1],
            head_dim=query.shape[2], seq_lens=seq_lens, dtype=query.dtype,
            query_start_loc=query_start_loc, causal=True, sliding_window_size=-1, isa=isa,
            enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
        )
        ops.cpu_attention_with_kv_cache(
            query=query, key_cache=key_cache, value_cache=value_cache, output=out,
            query_start_loc=query_start_loc, seq_lens=seq_lens, scale=scale, causal=True,
            alibi_slopes=None, sliding_window=-1, block_table=block_table,
            softcap=0.0, scheduler_metadata=meta, s_aux=None,
        )
    finally:
        _set_threads(inner)
