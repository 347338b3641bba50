"""int8 page and super-page bounds kept current while decode appends tokens: the torch reference.

Why: :mod:`kvhead.core.bounds.compact` builds int8 boxes and super-page boxes from fp32 page bounds
of every page. Rebuilding them at each rerank reads the fp32 bounds again (1 KiB per page and
head at head dim 128), the very bytes the int8 path exists to avoid, and keeping fp32 bounds of
every page costs 4x the int8 memory. Here only the pages still being written keep exact fp32
boxes: each sequence row has one open page and one open super-page. An append folds the key
into both exact boxes; when a page's last slot is written its box is rounded once into the int8
page bounds (bit for bit what :meth:`CompactBounds.quantize` gives for the whole page), and when
the last page of a group closes, the group's box is rounded into the row's super-page bounds
(bit for bit :func:`build_super_bounds` for that group).

Until then the int8 box of the open page and of the open super-page is stale (a reused block's
old box, or nothing). That is safe because selection never ranks them: the open page is its
sequence's newest, and the newest page and super-page are always selected.

Rows are batch rows (sequences); a row reused by a new request restarts at position 0, which
resets both open boxes, and super-pages past a sequence's end are masked by its page count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvhead.core.bounds.compact import CompactBounds, fold_super_boxes, num_super_pages
from kvhead.core.pages import PageBounds

PAGE, SUPER = 0, 1  # index of the open page / open super-page box in ``open_min``/``open_max``


@dataclass
class LiveBounds:
    """Compact bounds of one layer plus the exact boxes of each row's open page and group.

    ``pages``: int8 page bounds ``[num_blocks, Hkv, D]`` by physical block. ``supers``: int8
    super-page bounds ``[B, Hkv, S, D]`` by row and group of ``group`` logical pages, or None
    when only the flat selection is used. ``open_min``/``open_max``: fp32 ``[B, 2, Hkv, D]``,
    the exact box of each row's open page (index 0) and open super-page (index 1).
    """

    pages: CompactBounds
    supers: CompactBounds | None
    open_min: torch.Tensor
    open_max: torch.Tensor
    page_size: int
    group: int

    @classmethod
    def empty(
        cls,
        num_blocks: int,
        batch: int,
        max_pages: int,
        num_kv_heads: int,
        head_dim: int,
        page_size: int,
        group: int | None,
        device: torch.device | str = "cpu",
    ) -> LiveBounds:
        """Zeroed bounds (scale 0: empty boxes) for ``batch`` rows of up to ``max_pages``."""

        def compact(*lead: int) -> CompactBounds:
            return CompactBounds(
                qmin=torch.zeros(*lead, head_dim, dtype=torch.int8, device=device),
                qmax=torch.zeros(*lead, head_dim, dtype=torch.int8, device=device),
                scale=torch.zeros(*lead, device=device),
            )

        supers = None
        if group is not None:
            supers = compact(batch, num_kv_heads, num_super_pages(max_pages, group))
        shape = (batch, 2, num_kv_heads, head_dim)
        return cls(
            pages=compact(num_blocks, num_kv_heads),
            supers=supers,
            open_min=torch.full(shape, float("inf"), device=device),
            open_max=torch.full(shape, float("-inf"), device=device),
            page_size=page_size,
            group=group or 1,
        )

    @classmethod
    def from_bounds(
        cls,
        bounds: PageBounds,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        page_size: int,
        group: int | None,
    ) -> LiveBounds:
        """Start from fp32 page bounds (after prefill): quantise every page, fold and quantise
        the super-pages, and keep the exact boxes of each row's newest page and group."""
        num_pages = (seq_lens.long() + page_size - 1) // page_size
        rows = torch.arange(block_table.shape[0], device=block_table.device)
        newest = (num_pages - 1).clamp_min(0)
        block = block_table.long()[rows, newest].clamp_min(0)
        open_min = torch.stack([bounds.kmin[block].float()] * 2, dim=1)
        open_max = torch.stack([bounds.kmax[block].float()] * 2, dim=1)
        supers = None
        if group is not None:
            kmin, kmax = fold_super_boxes(bounds, block_table, num_pages, group)
            supers = CompactBounds.quantize(kmin, kmax)
            open_min[:, SUPER] = kmin[rows, :, newest // group]
            open_max[:, SUPER] = kmax[rows, :, newest // group]
        return cls(
            pages=CompactBounds.from_pages(bounds),
            supers=supers,
            open_min=open_min,
            open_max=open_max,
            page_size=page_size,
            group=group or 1,
        )

    def append(self, keys: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> None:
        """Fold one key per row, ``keys [B, Hkv, D]`` written at flat ``slots [B]`` (-1: the row
        has no token this step) as token ``positions [B]`` of its sequence (0-based)."""
        live = (slots >= 0).nonzero().flatten()
        if live.numel() == 0:
            return
        key = keys[live].float()
        slot, pos = slots[live].long(), positions[live].long()
        offset, page = pos % self.page_size, pos // self.page_size
        page_closes = offset == self.page_size - 1
        self._fold(live, PAGE, key, offset == 0)
        if bool(page_closes.any()):
            at = live[page_closes]
            box = CompactBounds.quantize(self.open_min[at, PAGE], self.open_max[at, PAGE])
            block = slot[page_closes] // self.page_size
            self.pages.qmin[block], self.pages.qmax[block] = box.qmin, box.qmax
            self.pages.scale[block] = box.scale
        if self.supers is None:
            return
        self._fold(live, SUPER, key, (offset == 0) & (page % self.group == 0))
        group_closes = page_closes & (page % self.group == self.group - 1)
        if bool(group_closes.any()):
            at = live[group_closes]
            box = CompactBounds.quantize(self.open_min[at, SUPER], self.open_max[at, SUPER])
            index = (at, slice(None), page[group_closes] // self.group)
            self.supers.qmin[index], self.supers.qmax[index] = box.qmin, box.qmax
            self.supers.scale[index] = box.scale

    def _fold(self, rows: torch.Tensor, which: int, key: torch.Tensor, start: torch.Tensor) -> None:
        """Min/max-fold ``key`` into the rows' open boxes; ``start`` rows begin a new box."""
        start = start.view(-1, 1, 1)
        lo, hi = self.open_min[rows, which], self.open_max[rows, which]
        self.open_min[rows, which] = torch.where(start, key, torch.minimum(lo, key))
        self.open_max[rows, which] = torch.where(start, key, torch.maximum(hi, key))
