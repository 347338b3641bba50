"""The host arena: a fixed-capacity, preallocated page pool keyed by (layer, block id, head).

One buffer ``[capacity, 2, P, D]`` (K and V of a page side by side, so a page is one contiguous
run of bytes for the Redis codec) is allocated up front, pinned when CUDA exists so device copies
can be asynchronous. A dense int32 table maps the flat key ``(layer * num_blocks + block) *
num_heads + head`` to a slot, so every call is a handful of tensor ops whatever the batch size;
there is no per-page Python on the hot path.

Eviction is LRU at call granularity: each call stamps the slots it touches with a tick, and when
free slots run out the arena frees the ``evict_fraction`` least recently used pages at once (one
``topk`` over the stamps), handing them to ``spill`` -- the next tier -- before reuse. Freeing a
batch at a time keeps the O(capacity) scan off most calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import torch

from kvhead.core.spec import HeadPageSpec
from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.config import HostArenaConfig

SpillFn = Callable[[PageKeys, torch.Tensor, torch.Tensor], None]
_NEVER = torch.iinfo(torch.int64).max


class HostArena(PageStore):
    """Host tier; ``spill`` (set by the tier manager) receives evicted pages, one layer a call."""

    name = "host"

    def __init__(self, spec: HeadPageSpec, config: HostArenaConfig, spill: SpillFn | None = None):
        super().__init__(spec)
        self.config = config
        self.spill = spill
        cap, p, d = config.capacity_pages, spec.page_size, spec.head_dim
        pin = torch.cuda.is_available() if config.pin_memory is None else config.pin_memory
        self.buffer = torch.zeros((cap, 2, p, d), dtype=spec.dtype, pin_memory=pin)
        self._blocks, self._heads = config.num_blocks, spec.num_kv_heads
        self._slot_of = torch.full(
            (config.num_layers * config.num_blocks * spec.num_kv_heads,), -1, dtype=torch.int32
        )
        self._key = torch.full((cap,), -1, dtype=torch.int64)  # flat key per slot, -1 = free
        self._prefix = torch.zeros((cap, 2), dtype=torch.int64)
        self._page = torch.full((cap,), -1, dtype=torch.int64)
        self._named = torch.zeros(cap, dtype=torch.bool)
        self._last = torch.zeros(cap, dtype=torch.int64)
        self._free = torch.arange(cap - 1, -1, -1, dtype=torch.int64)  # a stack; top at the end
        self._num_free = cap
        self._tick = 0
        self._lock = threading.Lock()
        self._stats = TierStats(self.name, capacity_pages=cap)

    # -- addressing -------------------------------------------------------------------------
    def _flat(self, keys: PageKeys) -> torch.Tensor:
        if not 0 <= keys.layer < self.config.num_layers:
            raise ValueError(f"host arena: layer {keys.layer} not in [0, {self.config.num_layers})")
        blocks, heads = keys.block_ids.long(), keys.heads.long()
        if len(keys):
            if int(blocks.min()) < 0 or int(blocks.max()) >= self._blocks:
                raise ValueError(f"host arena: block ids must be in [0, {self._blocks})")
            if int(heads.min()) < 0 or int(heads.max()) >= self._heads:
                raise ValueError(f"host arena: heads must be in [0, {self._heads})")
        return (keys.layer * self._blocks + blocks) * self._heads + heads

    def _match(self, keys: PageKeys, slots: torch.Tensor) -> torch.Tensor:
        """Rows whose slot holds this page: present, and same content address when one is given.

        The address check is what keeps a reused vLLM block from serving its previous request's
        page if the caller forgot to delete it.
        """
        found = slots >= 0
        if keys.prefix is not None:
            s = slots.clamp_min(0)
            same = (self._prefix[s] == keys.prefix).all(dim=1) & (self._page[s] == keys.pages)
            found &= self._named[s] & same
        return found

    # -- PageStore --------------------------------------------------------------------------
    def put(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.check_pages(keys, k, v)
        n = len(keys)
        if n > self.config.capacity_pages:
            raise ValueError(
                f"host arena: a batch of {n} pages exceeds the capacity of "
                f"{self.config.capacity_pages}; raise capacity_pages or split the batch"
            )
        start = time.perf_counter()
        flat = self._flat(keys)
        rows = _last_occurrence(flat)
        if rows is not None:  # duplicate keys in one batch: the last write wins
            keys, flat, k, v = keys.select(rows), flat[rows], k[rows], v[rows]
        with self._lock:
            self._tick += 1
            slots = self._slot_of[flat].long()
            new = slots < 0
            self._last[slots[~new]] = self._tick  # protect overwritten slots from this eviction
            needed = int(new.sum())
            if needed > self._num_free:
                self._evict(needed - self._num_free, protected=int((~new).sum()))
            fresh = self._free[self._num_free - needed : self._num_free].clone()
            self._num_free -= needed
            slots[new] = fresh
            self._slot_of[flat[new]] = fresh.to(torch.int32)
            self._key[slots] = flat
            self._last[slots] = self._tick
            self._named[slots] = keys.prefix is not None
            if keys.prefix is not None:
                self._prefix[slots] = keys.prefix
                self._page[slots] = keys.pages
            self.buffer[slots, 0] = k
            self.buffer[slots, 1] = v
            self._stats.puts += len(flat)
            self._stats.bytes_in += len(flat) * self.spec.head_page_bytes
            self._stats.record("put", time.perf_counter() - start)
        return torch.ones(n, dtype=torch.bool)

    def get(self, keys: PageKeys, out: torch.Tensor | None = None) -> PageBatch:
        """Read pages; ``out`` may be a preallocated ``[n, 2, P, D]`` (e.g. pinned) buffer."""
        start = time.perf_counter()
        flat = self._flat(keys)
        with self._lock:
            self._tick += 1
            slots = self._slot_of[flat].long()
            found = self._match(keys, slots)
            pages = torch.index_select(self.buffer, 0, slots.clamp_min(0), out=out)
            self._last[slots[found]] = self._tick
            hits = int(found.sum())
            self._stats.hits += hits
            self._stats.misses += len(flat) - hits
            self._stats.bytes_out += hits * self.spec.head_page_bytes
            self._stats.record("get", time.perf_counter() - start)
        if hits < len(flat):
            pages[~found] = 0
        return PageBatch(pages[:, 0], pages[:, 1], found)

    def contains(self, keys: PageKeys) -> torch.Tensor:
        flat = self._flat(keys)
        with self._lock:
            return self._match(keys, self._slot_of[flat].long())

    def delete(self, keys: PageKeys) -> int:
        flat = self._flat(keys)
        with self._lock:
            slots = self._slot_of[flat].long()
            slots = torch.unique(slots[self._match(keys, slots)])
            self._release(slots)
        return len(slots)

    def stats(self) -> TierStats:
        with self._lock:
            self._stats.resident_pages = self.config.capacity_pages - self._num_free
            return TierStats(
                **{
                    **vars(self._stats),
                    "op_seconds": dict(self._stats.op_seconds),
                    "op_calls": dict(self._stats.op_calls),
                }
            )

    # -- eviction ---------------------------------------------------------------------------
    def _evict(self, needed: int, protected: int) -> None:
        """Free at least ``needed`` LRU slots (a batch of ``evict_fraction`` when possible)."""
        cap = self.config.capacity_pages
        batch = max(needed, int(cap * self.config.evict_fraction))
        count = min(batch, cap - self._num_free - protected)
        stamps = self._last.masked_fill(self._key < 0, _NEVER)
        victims = torch.topk(stamps, count, largest=False, sorted=False).indices
        if self.spill is not None:
            self._spill(victims)
        self._release(victims)
        self._stats.evictions += count

    def _spill(self, victims: torch.Tensor) -> None:
        """Hand evicted pages to the next tier, one call per (layer, named or local) group."""
        assert self.spill is not None
        layers = self._key[victims] // (self._blocks * self._heads)
        named = self._named[victims]
        for layer in torch.unique(layers).tolist():
            for is_named in (True, False):
                rows = victims[(layers == layer) & (named == is_named)]
                if not len(rows):
                    continue
                flat = self._key[rows]
                keys = PageKeys(
                    layer,
                    (flat // self._heads) % self._blocks,
                    flat % self._heads,
                    self._prefix[rows] if is_named else None,
                    self._page[rows] if is_named else None,
                )
                pages = self.buffer[rows]  # a copy: the slots are reused right after
                self.spill(keys, pages[:, 0], pages[:, 1])
                self._stats.spilled += len(rows)

    def _release(self, slots: torch.Tensor) -> None:
        if not len(slots):
            return
        self._slot_of[self._key[slots]] = -1
        self._key[slots] = -1
        self._named[slots] = False
        self._free[self._num_free : self._num_free + len(slots)] = slots
        self._num_free += len(slots)


def _last_occurrence(flat: torch.Tensor) -> torch.Tensor | None:
    """Row of the last occurrence of each distinct key, or None when all keys are distinct."""
    uniq, inverse = torch.unique(flat, return_inverse=True)
    if len(uniq) == len(flat):
        return None
    rows = torch.arange(len(flat))
    last = torch.full((len(uniq),), -1, dtype=torch.int64)
    return last.scatter_reduce_(0, inverse, rows, reduce="amax")
