"""vLLM's own CPU kernels as the FlexiCache backend uses them: prefill attention and page copies.

Every cache this backend touches (vLLM's unstable-head cache, the stable-head staging scratch,
the device hot pool) uses vLLM's CPU layout ``[blocks, heads, page_size, 2 * head_dim]`` (keys
then values inside a block). Prefill runs vLLM's tuned causal kernel; rows of single-head blocks
(``block * heads + head``, a free reshape of a contiguous tensor) let a per-head page list act
as a block table. Decode runs the plugin's own kernels (:mod:`kvhead.kernels.cpu.native`),
which read the same layout.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from vllm import _custom_ops as ops
from vllm import envs


def set_threads(count: int) -> None:
    """Set torch's OpenMP thread count even inside vLLM's CPU worker.

    The worker pins its OpenMP threads to cores and then replaces ``torch.set_num_threads`` with
    a stub that only logs a warning, so going through it would silently keep every thread (and
    log once per call). The team shrinks and grows back to the same pinned threads here.
    """
    torch._C.set_num_threads(count)


@contextmanager
def one_thread() -> Iterator[int]:
    """Run the enclosed torch ops on one thread; yields the caller's thread count.

    The bookkeeping around a decode step (rerank page moves, small index ops) is tiny: with
    OpenMP each op pays a fork/join that costs more than it saves, many times over on a busy
    machine. The native decode step sets its own thread count inside (:func:`set_threads`).
    """
    before = torch.get_num_threads()
    set_threads(1)
    try:
        yield before
    finally:
        set_threads(before)


def split_kv(cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Key and value views of a ``[blocks, heads, page, 2*D]`` cache, as the kernel wants them."""
    blocks, heads, page, _ = cache.shape
    return cache.view(blocks, heads, page * 2, -1).chunk(2, dim=2)


def write_cache(
    cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slots: torch.Tensor,
    isa: str,
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
) -> None:
    """Causal attention of ``query [T, Hq, D]`` over ``cache``, written into ``out [T, Hq, D]``.

    ``query_start_loc [R+1]`` splits the tokens into R rows; row r attends to the first
    ``seq_lens[r]`` tokens of the blocks in ``block_table[r]``.
    """
    num_rows = seq_lens.shape[0]
    if num_rows == 0:
        return
    key_cache, value_cache = split_kv(cache)
    seq_lens = seq_lens.to(torch.int32)
    query_start_loc = query_start_loc.to(torch.int32)
    block_table = block_table.to(torch.int32)
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=num_rows,
        num_heads=query.shape[1],
        num_kv_heads=cache.shape[1],
        head_dim=query.shape[2],
        seq_lens=seq_lens,
        dtype=query.dtype,
        query_start_loc=query_start_loc,
        causal=True,
        sliding_window_size=-1,
        isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
    )
    ops.cpu_attention_with_kv_cache(
        query=query,
        key_cache=key_cache,
        value_cache=value_cache,
        output=out,
        query_start_loc=query_start_loc,
        seq_lens=seq_lens,
        scale=scale,
        causal=True,
        alibi_slopes=None,
        sliding_window=-1,
        block_table=block_table,
        softcap=0.0,
        scheduler_metadata=meta,
        s_aux=None,
    )
