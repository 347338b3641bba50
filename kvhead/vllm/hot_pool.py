"""The device hot pool: the stable-head pages a layer attends to right now, keyed by vLLM block.

A slot holds one (block, stable head) page in vLLM's CPU cache layout ``[slots, 1, P, 2*D]``, so
the attention kernel reads it like any vLLM cache. ``slot_of[block, s]`` finds a page's slot; the
key is vLLM's block id, so when vLLM hands a block to a new request (its first token lands at
offset 0) the old request's pages are dropped with :meth:`release_blocks` and nothing else needs
to track request lifetimes.
"""

from __future__ import annotations

import torch


class HotPoolFullError(RuntimeError):
    """The pool cannot hold the pages the current batch attends to."""


class HotPool:
    """Fixed-capacity slot allocator plus the page tensor of one layer."""

    def __init__(
        self,
        capacity: int,
        num_blocks: int,
        num_stable: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> None:
        self.capacity = capacity
        self.pages = torch.zeros(capacity, 1, page_size, 2 * head_dim, dtype=dtype, device=device)
        self.slot_of = torch.full((num_blocks, num_stable), -1, dtype=torch.int64, device=device)
        self._owner = torch.full((capacity,), -1, dtype=torch.int64, device=device)  # flat key
        self._free = torch.arange(capacity - 1, -1, -1, dtype=torch.int64, device=device)
        self._num_free = capacity
        self.peak_in_use = 0

    @property
    def in_use(self) -> int:
        return self.capacity - self._num_free

    @property
    def nbytes(self) -> int:
        """Device bytes allocated: pages plus the slot index and free list."""
        parts = (self.pages, self.slot_of, self._owner, self._free)
        return sum(t.numel() * t.element_size() for t in parts)

    @staticmethod
    def bytes_per_block(num_stable: int) -> int:
        """Bytes one vLLM block adds (its ``slot_of`` row), for the start-up budget."""
        return 8 * num_stable

    @staticmethod
    def fixed_bytes(capacity: int, page_bytes: int) -> int:
        """Bytes of ``capacity`` pages of ``page_bytes`` each, plus their owner and free lists."""
        return capacity * (page_bytes + 2 * 8)

    def allocate(self, blocks: torch.Tensor, heads: torch.Tensor) -> torch.Tensor:
        """Slots for pages ``(blocks[i], heads[i])`` that have none yet (distinct pairs)."""
        n = blocks.numel()
        if n > self._num_free:
            raise HotPoolFullError(
                f"hot pool of {self.capacity} pages cannot take {n} more ({self.in_use} in use); "
                "raise kvhead hot_pool_pages"
            )
        slots = self._free[self._num_free - n : self._num_free].clone()
        self._num_free -= n
        self.slot_of[blocks, heads] = slots
        self._owner[slots] = blocks * self.slot_of.shape[1] + heads
        self.peak_in_use = max(self.peak_in_use, self.in_use)
        return slots

    def release(self, slots: torch.Tensor) -> None:
        """Return slots to the free list and forget their pages."""
        slots = slots[slots >= 0]
        if not slots.numel():
            return
        owner = self._owner[slots]
        width = self.slot_of.shape[1]
        self.slot_of[owner // width, owner % width] = -1
        self._owner[slots] = -1
        self._free[self._num_free : self._num_free + slots.numel()] = slots
        self._num_free += slots.numel()

    def release_blocks(self, blocks: torch.Tensor) -> None:
        """Drop every page of ``blocks`` (vLLM reassigned them to a new request)."""
        if blocks.numel():
            self.release(self.slot_of[torch.unique(blocks)].flatten())

    def release_unreferenced(self, live_blocks: torch.Tensor) -> int:
        """Free pages of blocks outside ``live_blocks`` (requests that finished); returns count."""
        used = self._owner >= 0
        blocks = self._owner.clamp_min(0) // self.slot_of.shape[1]
        dead = used & ~torch.isin(blocks, live_blocks)
        slots = dead.nonzero().flatten()
        self.release(slots)
        return slots.numel()
