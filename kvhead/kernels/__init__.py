"""GPU kernels (Triton) for the FlexiCache path, with the core torch code as fallback and oracle.

Every function here computes the same function as its reference in the core package:

=========================  ==============================================================
``sparse_decode_attention``  :func:`kvhead.core.attention.sparse_decode_attention`
``score_and_select``         ``select_top_k(score_pages(...), top_k, num_pages)``
``update_bounds``            :meth:`kvhead.core.pages.PageBounds.update`
``combine_partials``         :func:`kvhead.core.combine.combine_partials`
``copy_pages_async``         promoted-page copy, pinned host arena -> device pool (no reference)
``hier_select``              :func:`kvhead.core.bounds.compact.hier_select` (int8, two-level)
``flat_select``              :func:`kvhead.core.bounds.compact.flat_select` (int8, every page)
``select_pages``             one of the two above, by pages per head (the rerank entry)
``append_bounds``            :meth:`kvhead.core.bounds.live.LiveBounds.append` (int8, on append)
=========================  ==============================================================

Dispatch: Triton runs when the tensors are on CUDA, or anywhere when Triton's interpreter is on
(``TRITON_INTERPRET=1`` set before triton is imported; the CPU test suite does this). Otherwise
the torch reference runs, so callers can use this module unconditionally. Triton is imported
only on the Triton path, which keeps the package importable where triton is not installed.

Dependency rule: imports ``kvhead.core`` (the references) and its own ``triton``/``cpu``
kernels; never the engines above it (``kvhead.eval``, ``kvhead.vllm``) or ``kvstore``.
"""

from __future__ import annotations

import os

import torch

from kvhead.core import attention as _ref_attention
from kvhead.core import combine as _ref_helix
from kvhead.core import pages as _ref_pages
from kvhead.core.bounds import compact as _ref_compact
from kvhead.core.bounds import live as _ref_live
from kvhead.kernels.triton.transfer import copy_pages_async

__all__ = [
    "append_bounds",
    "combine_partials",
    "copy_pages_async",
    "flat_select",
    "hier_select",
    "score_and_select",
    "select_pages",
    "sparse_decode_attention",
    "triton_active",
    "update_bounds",
]


def triton_active(tensor: torch.Tensor) -> bool:
    """Whether the Triton path serves ``tensor``: CUDA tensors, or the interpreter is on."""
    return tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def sparse_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_ids: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over per-head page lists; returns ``(out [B, Hq, D], lse [B, Hq])``."""
    if not triton_active(query):
        return _ref_attention.sparse_decode_attention(
            query, k_cache, v_cache, block_table, seq_lens, page_ids, scale
        )
    from kvhead.kernels.triton.attention import sparse_decode_attention as kernel

    return kernel(query, k_cache, v_cache, block_table, seq_lens, page_ids, scale)


def score_and_select(
    query: torch.Tensor,
    bounds: _ref_pages.PageBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Top-``top_k`` pages per (sequence, KV head) by bound score, newest page always kept."""
    if not triton_active(query):
        return _ref_pages.select_top_k(
            _ref_pages.score_pages(query, bounds, block_table, num_pages), top_k, num_pages
        )
    from kvhead.kernels.triton.select import score_and_select as kernel

    return kernel(query, bounds.kmin, bounds.kmax, block_table, num_pages, top_k)


def hier_select(
    query: torch.Tensor,
    pages: _ref_compact.CompactBounds,
    supers: _ref_compact.CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int,
    num_super: int,
) -> torch.Tensor:
    """Two-level top-K over int8 bounds: top-``num_super`` super-pages of ``group`` pages, then
    the top-``top_k`` of their pages; newest page and super-page always kept."""
    if not triton_active(query):
        return _ref_compact.hier_select(
            query, pages, supers, block_table, num_pages, top_k, group, num_super
        )
    from kvhead.kernels.triton.select_hier import hier_select as kernel

    return kernel(query, pages, supers, block_table, num_pages, top_k, group, num_super)


def flat_select(
    query: torch.Tensor,
    pages: _ref_compact.CompactBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
) -> torch.Tensor:
    """Top-``top_k`` pages by int8 bound, every page scored; newest page always kept."""
    if not triton_active(query):
        return _ref_compact.flat_select(query, pages, block_table, num_pages, top_k)
    from kvhead.kernels.triton.select_hier import flat_select as kernel

    return kernel(query, pages, block_table, num_pages, top_k)


def select_pages(
    query: torch.Tensor,
    pages: _ref_compact.CompactBounds,
    supers: _ref_compact.CompactBounds | None,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int,
    group: int = _ref_compact.DEFAULT_GROUP,
    flat_max_pages: int = _ref_compact.FLAT_MAX_PAGES,
    flat_max_boxes: int = _ref_compact.FLAT_MAX_BOXES,
) -> torch.Tensor:
    """Rerank selection over int8 bounds: flat for few pages per head, two-level for many.

    The path follows :func:`kvhead.core.bounds.compact.plan_selection` on the block table's width
    and the number of rows (batch x KV heads): static shapes, so the choice needs no host sync
    and is stable across graph replays. ``supers`` (super-page bounds of ``group`` pages) are
    read only on the two-level path; callers that keep them only when ``plan_selection`` says
    so may pass None otherwise.
    """
    num_super = _ref_compact.plan_selection(
        block_table.shape[1],
        top_k,
        group,
        flat_max_pages=flat_max_pages,
        rows=block_table.shape[0] * pages.qmin.shape[1],
        flat_max_boxes=flat_max_boxes,
    )
    if num_super is None:
        return flat_select(query, pages, block_table, num_pages, top_k)
    if supers is None:
        raise ValueError(
            f"{block_table.shape[1]} pages per head take the two-level path: pass super-page "
            f"bounds of {group} pages (kvhead.core.bounds.compact.build_super_bounds)"
        )
    return hier_select(query, pages, supers, block_table, num_pages, top_k, group, num_super)


def update_bounds(
    bounds: _ref_pages.PageBounds,
    keys: torch.Tensor,
    slot_mapping: torch.Tensor,
    page_size: int,
) -> None:
    """Fold appended keys ``[T, Hkv, D]`` at flat slots into ``bounds`` (in place).

    The Triton path needs fp32 bounds (it folds with fp32 atomics); other dtypes use the
    reference.
    """
    if not triton_active(keys) or bounds.kmin.dtype != torch.float32:
        bounds.update(keys, slot_mapping, page_size)
        return
    from kvhead.kernels.triton.bounds import update_bounds as kernel

    kernel(bounds.kmin, bounds.kmax, keys, slot_mapping, page_size)


def append_bounds(
    live: _ref_live.LiveBounds, keys: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor
) -> None:
    """Fold one decode key per row ``[B, Hkv, D]`` into ``live``'s open boxes (in place); pages
    and groups the key closes get their int8 bounds, bit-identical to a build from scratch."""
    if not triton_active(keys):
        live.append(keys, slots, positions)
        return
    from kvhead.kernels.triton.bounds_live import append_bounds as kernel

    kernel(live, keys, slots, positions)


def combine_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact LSE combine of ``outs [S, ..., D]`` / ``lses [S, ...]`` over shards (axis 0)."""
    if not triton_active(outs):
        return _ref_helix.combine_partials(outs, lses)
    from kvhead.kernels.triton.combine import combine

    return combine(outs, lses)
