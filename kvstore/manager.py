"""The tier manager: host arena in front, a shared tier (Redis) behind, one PageStore outside.

Why it looks like this:

- **Writes never wait on Redis.** ``put`` stores into the host arena synchronously (a memcpy)
  and hands named pages to a bounded write-behind queue drained by one thread; when the queue
  is full the write is dropped and counted, because a lost copy in a cache costs a recompute,
  while a blocked decode step costs every request in the batch.
- **Spill.** Pages the arena evicts go through the same queue to the shared tier, so a full
  host arena degrades to Redis latency rather than to recomputation.
- **Lookup.** ``get`` reads the arena; rows it misses that carry a content address are read
  from Redis and, when found, promoted into the arena under the caller's block ids. This is
  the cross-replica path: a replica allocates blocks for a prompt another replica served, and
  its first ``get`` pulls the pages.
- **Prefetch** does the same lookup on a background thread and returns a ``Future``.
- ``delete`` forgets local copies only: Redis pages are content-addressed, so they can never be
  stale for another sequence; they leave by TTL or Redis's own eviction.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.config import TierManagerConfig
from kvstore.host_arena import HostArena

log = logging.getLogger(__name__)
_COALESCE_PAGES = 1024  # write-behind batches merged up to this size for deeper pipelines


class TierManager(PageStore):
    """Host arena + optional shared tier; see the module docstring."""

    name = "manager"

    def __init__(
        self, arena: HostArena, shared: PageStore | None, config: TierManagerConfig | None = None
    ) -> None:
        super().__init__(arena.spec)
        self.arena, self.shared = arena, shared
        self.config = config or TierManagerConfig()
        self._stats = TierStats(self.name, capacity_pages=arena.config.capacity_pages)
        self._lock = threading.Lock()
        self._queue: deque[tuple[PageKeys, torch.Tensor, torch.Tensor]] = deque()
        self._queued_pages = 0
        self._busy = False
        self._wake = threading.Condition(self._lock)
        self._closed = False
        self._writer: threading.Thread | None = None
        self._prefetcher: ThreadPoolExecutor | None = None
        arena.spill = self._on_spill
        if shared is not None:
            self._writer = threading.Thread(
                target=self._write_loop, name="kvstore-writer", daemon=True
            )
            self._writer.start()
            self._prefetcher = ThreadPoolExecutor(1, thread_name_prefix="kvstore-prefetch")

    # -- write path -------------------------------------------------------------------------
    def put(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        stored = self.arena.put(keys, k, v)
        if self.config.publish_on_put and keys.named:
            self._enqueue(keys, k.clone(), v.clone())  # the caller may reuse its buffers
        with self._lock:
            self._stats.puts += len(keys)
            self._stats.record("put", time.perf_counter() - start)
        return stored

    def _on_spill(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> None:
        """Arena eviction callback (runs under the arena lock: enqueue only)."""
        with self._lock:
            self._stats.evictions += len(keys)
        if keys.named:
            self._enqueue(keys, k, v)
        else:  # a page without a content address can only be recomputed
            with self._lock:
                self._stats.put_failures += len(keys)

    def _enqueue(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> None:
        if self.shared is None:
            return
        with self._lock:
            if self._queued_pages + len(keys) > self.config.write_queue_pages:
                self._stats.put_failures += len(keys)  # dropped, never waited for
                return
            self._queue.append((keys, k, v))
            self._queued_pages += len(keys)
            self._stats.spilled += len(keys)
            self._wake.notify()

    def _write_loop(self) -> None:
        assert self.shared is not None
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = [self._queue.popleft()]
                size = len(batch[0][0])
                while (
                    self._queue
                    and self._queue[0][0].layer == batch[0][0].layer
                    and size + len(self._queue[0][0]) <= _COALESCE_PAGES
                ):
                    batch.append(self._queue.popleft())
                    size += len(batch[-1][0])
                self._busy = True
            try:
                keys, k, v = _concat(batch)
                self.shared.put(keys, k, v)
            except Exception:  # the writer must outlive any one bad batch
                log.exception("kvstore: write-behind batch failed")
            finally:
                with self._lock:
                    self._queued_pages -= size
                    self._busy = False
                    self._wake.notify_all()

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued writes reached the shared tier; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    # -- read path --------------------------------------------------------------------------
    def get(self, keys: PageKeys) -> PageBatch:
        start = time.perf_counter()
        k, v, found = self.arena.get(keys)
        miss = ~found
        if self.shared is not None and keys.named and bool(miss.any()):
            rows = miss.nonzero().flatten()
            lower = self.shared.get(keys.select(rows))
            k[rows], v[rows] = lower.k, lower.v
            found[rows] = lower.found
            if self.config.promote_on_hit and bool(lower.found.any()):
                got = lower.found
                self.arena.put(keys.select(rows[got]), lower.k[got], lower.v[got])
        hits = int(found.sum())
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += len(keys) - hits
            self._stats.record("get", time.perf_counter() - start)
        return PageBatch(k, v, found)

    def prefetch(self, keys: PageKeys) -> Future:
        """Pull arena misses from the shared tier into the arena in the background.

        The future resolves to ``found [n]`` (in the arena afterwards); with no shared tier it
        resolves at once to the arena's own answer.
        """
        if self._prefetcher is None:
            done: Future = Future()
            done.set_result(self.arena.contains(keys))
            return done
        return self._prefetcher.submit(lambda: self.get(keys).found)

    def contains(self, keys: PageKeys) -> torch.Tensor:
        found = self.arena.contains(keys)
        if self.shared is not None and keys.named and not bool(found.all()):
            rows = (~found).nonzero().flatten()
            found[rows] = self.shared.contains(keys.select(rows))
        return found

    def match_prefix(self, prefix: torch.Tensor, num_layers: int) -> int:
        """Leading pages of ``prefix [m, 2]`` present in the shared tier for every layer and head.

        This is the prefill a replica can skip: pages 0..returned-1 can be fetched instead of
        recomputed. Only the shared tier is asked, since local blocks are keyed by block id.
        """
        if self.shared is None or len(prefix) == 0:
            return 0
        m, heads = len(prefix), self.spec.num_kv_heads
        page_idx = torch.arange(m).repeat_interleave(heads)
        present = torch.ones(m, dtype=torch.bool)
        for layer in range(num_layers):
            keys = PageKeys(
                layer,
                torch.zeros(m * heads, dtype=torch.long),
                torch.arange(heads).repeat(m),
                prefix[page_idx],
                page_idx,
            )
            present &= self.shared.contains(keys).view(m, heads).all(dim=1)
        missing = (~present).nonzero()
        return m if len(missing) == 0 else int(missing[0])

    # -- bookkeeping ------------------------------------------------------------------------
    def delete(self, keys: PageKeys) -> int:
        return self.arena.delete(keys)

    def stats(self) -> TierStats:
        resident = self.arena.stats().resident_pages  # outside our lock: spill nests the other way
        with self._lock:
            self._stats.resident_pages = resident
            return TierStats(
                **{
                    **vars(self._stats),
                    "op_seconds": dict(self._stats.op_seconds),
                    "op_calls": dict(self._stats.op_calls),
                }
            )

    def tier_stats(self) -> list[TierStats]:
        """Per-tier counters, host first."""
        tiers: list[PageStore] = [self.arena] + ([self.shared] if self.shared else [])
        return [t.stats() for t in tiers]

    def supports_shared_keys(self) -> bool:
        return self.shared is not None and self.shared.supports_shared_keys()

    def close(self) -> None:
        if self._writer is not None:
            self.flush()
            with self._lock:
                self._closed = True
                self._wake.notify_all()
            self._writer.join(timeout=10)
        if self._prefetcher is not None:
            self._prefetcher.shutdown(wait=True)
        if self.shared is not None:
            self.shared.close()


def _concat(
    batch: list[tuple[PageKeys, torch.Tensor, torch.Tensor]],
) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    if len(batch) == 1:
        return batch[0]
    keys = [b[0] for b in batch]
    merged = PageKeys(
        keys[0].layer,
        torch.cat([x.block_ids for x in keys]),
        torch.cat([x.heads for x in keys]),
        torch.cat([x.prefix for x in keys]),  # type: ignore[misc]
        torch.cat([x.pages for x in keys]),  # type: ignore[misc]
    )
    return merged, torch.cat([b[1] for b in batch]), torch.cat([b[2] for b in batch])
