"""Worker side of the kvhead KV connector: pages between FlexiCache layers and Redis (prompts,
and the whole context of preempted requests).

A page here is one KV head of one 16-token page of one layer, for every head, dense and stable
alike: the split into vLLM's cache and the host arena is this engine's choice, so pages are
stored split-free and a replica with another preset (or profile) can load them. A load writes
the pages through :meth:`FlexiLayer.write`, the path new tokens take, so the dense heads land in
vLLM's cache, the stable heads in the arena, and page bounds and summary means are made exactly
as prefill would make them.

Nothing here may stall decode or fail a request:

- loads fetch on a background thread and are applied between forward passes (vLLM polls
  :meth:`PrefixMover.finish_loads` after each step); any missing, corrupt or foreign page fails
  the whole load, and vLLM recomputes the prompt instead;
- saves copy the pages out at once (the blocks may be reused after this step) and a write-behind
  thread sends them; chain markers follow only when every page of the job was accepted, and a
  full queue drops the job (counted), never waits.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvhead.vllm.runtime import FlexiRuntime
from kvstore import PageKeys
from kvstore.redis_tier import RedisTier

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrefixJob:
    """Pages ``first_page .. first_page + n - 1`` of one request.

    ``prefix [n, 2]`` are their names: chained content hashes of a prompt
    (:func:`kvstore.prefix.prefix_hashes`), or for a *swap* (a preempted request's whole
    context, prompt and generated tokens) hashes salted with the request and its preemption,
    since generated tokens' K/V depend on the request's own sparse history. ``block_ids`` are
    the request's vLLM blocks of those pages, one list per KV cache group; ``num_tokens`` the
    valid tokens from the first page on (None: every page is full).
    """

    req_id: str
    first_page: int
    prefix: torch.Tensor
    block_ids: tuple[list[int], ...]
    num_tokens: int | None = None
    swap: bool = False

    @property
    def num_pages(self) -> int:
        return int(self.prefix.shape[0])


@dataclass
class ConnectorCounters:
    """What the connector did (exported as ``kvhead_connector_*``)."""

    loads: int = 0  # prompts whose pages were loaded
    load_failures: int = 0  # loads that fell back to recomputation
    loaded_pages: int = 0  # per-head pages written into the engine by loads
    saves: int = 0  # prompts whose pages were all accepted (and marked)
    save_failures: int = 0  # saves Redis refused in part, or that found the queue full
    saved_pages: int = 0  # per-head pages Redis accepted
    loaded_tokens: int = 0  # prompt tokens whose prefill loads skipped


@dataclass
class _Fetched:
    pages: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # per layer


class PrefixMover:
    """Loads and saves prompt pages for one worker (see the module docstring)."""

    def __init__(self, tier: RedisTier, runtime: FlexiRuntime, queue_pages: int) -> None:
        self.tier, self.runtime = tier, runtime
        self.queue_pages = queue_pages
        self.counters = ConnectorCounters()
        self._layers: list[tuple[int, torch.Tensor, int]] = []  # (layer, cache, group)
        self._fetches: dict[str, tuple[PrefixJob, Future]] = {}
        self._fetcher = ThreadPoolExecutor(1, thread_name_prefix="kvhead-prefix-load")
        self._lock = threading.Condition()
        self._queue: deque[tuple[PrefixJob, list[tuple[PageKeys, torch.Tensor, torch.Tensor]]]]
        self._queue = deque()
        self._queued_pages = 0
        self._busy = False
        self._closed = False
        self._swapped: dict[str, bool] = {}  # swap-outs written since the last report
        self._writer = threading.Thread(target=self._write_loop, name="kvhead-prefix-save")
        self._writer.daemon = True
        self._writer.start()

    # -- set-up --------------------------------------------------------------------------
    def register(self, layers: list[tuple[int, torch.Tensor, int]]) -> None:
        """Every decoder layer as (index, its vLLM cache tensor, its KV cache group)."""
        found = sorted(i for i, _, _ in layers)
        if found != list(range(self.runtime.geo.num_layers)):
            raise RuntimeError(
                f"kvhead connector: vLLM registered caches for layers {found}, expected "
                f"0..{self.runtime.geo.num_layers - 1}"
            )
        self._layers = sorted(layers, key=lambda t: t[0])

    # -- addressing ----------------------------------------------------------------------
    def _keys(self, job: PrefixJob, layer: int) -> PageKeys:
        """Keys of every head of the job's pages, page-major."""
        heads = self.runtime.geo.num_kv_heads
        n = job.num_pages
        return PageKeys(
            layer,
            torch.zeros(n * heads, dtype=torch.int64),
            torch.arange(heads).repeat(n),
            job.prefix.repeat_interleave(heads, dim=0),
            (job.first_page + torch.arange(n)).repeat_interleave(heads),
        )

    # -- loads ---------------------------------------------------------------------------
    def start_loads(self, jobs: list[PrefixJob]) -> None:
        for job in jobs:
            self._fetches[job.req_id] = (job, self._fetcher.submit(self._fetch, job))

    def _fetch(self, job: PrefixJob) -> _Fetched | None:
        """Every layer's pages of ``job`` from Redis, or None at the first page missing."""
        fetched = _Fetched()
        for layer, _, _ in self._layers:
            got = self.tier.get(self._keys(job, layer))
            if not bool(got.found.all()):
                return None
            fetched.pages.append((got.k, got.v))
        return fetched

    def finish_loads(self) -> tuple[set[str], set[str]]:
        """Apply every finished fetch (between forward passes): ``(loaded, failed)`` ids."""
        loaded: set[str] = set()
        failed: set[str] = set()
        for req_id, (job, future) in list(self._fetches.items()):
            if not future.done():
                continue
            del self._fetches[req_id]
            try:
                fetched = future.result()
                if fetched is not None:
                    self._ingest(job, fetched)
            except Exception:  # a load must never take the engine down: recompute instead
                logger.exception("kvhead connector: loading the prefix of %s failed", req_id)
                fetched = None
            if fetched is None:
                failed.add(req_id)
                self.counters.load_failures += 1
                logger.warning(
                    "kvhead connector: %s: %d prompt pages missing or refused in Redis; "
                    "recomputing its prompt",
                    req_id,
                    job.num_pages,
                )
            else:
                loaded.add(req_id)
                if job.swap:  # the request goes on where it stopped: same selection, clock
                    self.runtime.requests.resume(req_id)
                self.counters.loads += 1
                self.counters.loaded_tokens += job.num_tokens or (
                    job.num_pages * self.runtime.geo.page_size
                )
                self.counters.loaded_pages += (
                    job.num_pages * len(fetched.pages) * (self.runtime.geo.num_kv_heads)
                )
        return loaded, failed

    def _ingest(self, job: PrefixJob, fetched: _Fetched) -> None:
        """Write the fetched pages into every layer as if prefill had computed them."""
        geo = self.runtime.geo
        n, heads, page = job.num_pages, geo.num_kv_heads, geo.page_size
        tokens = n * page if job.num_tokens is None else job.num_tokens
        offsets = torch.arange(page)
        for (layer, cache, group), (k, v) in zip(self._layers, fetched.pages, strict=True):
            blocks = torch.tensor(job.block_ids[group][:n], dtype=torch.int64)
            slots = (blocks.view(-1, 1) * page + offsets).flatten()[:tokens]
            key = k.view(n, heads, page, -1).transpose(1, 2).reshape(n * page, heads, -1)
            value = v.view(n, heads, page, -1).transpose(1, 2).reshape(n * page, heads, -1)
            flexi = self.runtime.layer(layer, cache.shape[0])
            # a partial last page (a swap) stays open: it takes a pool slot, kept by `blocks`
            flexi.write(
                key[:tokens].to(cache.dtype), value[:tokens].to(cache.dtype), slots, cache, blocks
            )

    # -- saves ---------------------------------------------------------------------------
    def save(self, jobs: list[PrefixJob]) -> None:
        """Copy the jobs' pages out of every layer now; a writer thread sends them."""
        heads = self.runtime.geo.num_kv_heads
        for job in jobs:
            size = job.num_pages * heads * len(self._layers)
            with self._lock:
                if self._queued_pages + size > self.queue_pages:
                    self.counters.save_failures += 1
                    if job.swap:
                        self._swapped[job.req_id] = False
                    logger.warning(
                        "kvhead connector: save queue full; %s's pages are not stored",
                        job.req_id,
                    )
                    continue
            parts = []
            for layer, cache, group in self._layers:
                blocks = torch.tensor(job.block_ids[group][: job.num_pages], dtype=torch.int64)
                k, v = self.runtime.layer(layer, cache.shape[0]).stage_pages(blocks, cache)
                # [n, P, H, D] -> one page per (page, head), page-major like _keys
                k = k.transpose(1, 2).flatten(0, 1).contiguous()
                v = v.transpose(1, 2).flatten(0, 1).contiguous()
                parts.append((self._keys(job, layer), k, v))
            with self._lock:
                self._queue.append((job, parts))
                self._queued_pages += size
                self._lock.notify_all()

    def _write_loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closed:
                    self._lock.wait()
                if not self._queue:
                    return
                job, parts = self._queue.popleft()
                self._busy = True
            accepted = 0
            try:
                for keys, k, v in parts:
                    stored = self.tier.put(keys, k, v)
                    accepted += int(stored.sum())
                    if not bool(stored.all()):
                        break  # the chain is incomplete: no markers, stop spending writes
                complete = accepted == sum(len(keys) for keys, _, _ in parts)
                complete = complete and self.tier.mark_chains(job.prefix)
            except Exception:  # the writer must outlive any one bad job
                logger.exception("kvhead connector: saving %s's prompt pages failed", job.req_id)
                complete = False
            with self._lock:
                self.counters.saved_pages += accepted
                if job.swap:
                    self._swapped[job.req_id] = complete
                if complete:
                    self.counters.saves += 1
                else:
                    self.counters.save_failures += 1
                self._queued_pages -= sum(len(keys) for keys, _, _ in parts)
                self._busy = False
                self._lock.notify_all()

    def take_swapped(self) -> dict[str, bool]:
        """Swap-outs finished since the last call: request id -> all pages stored."""
        with self._lock:
            done, self._swapped = self._swapped, {}
        return done

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued saves reached Redis (tests, shutdown); False on timeout."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        self.flush()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._writer.join(timeout=10)
        self._fetcher.shutdown(wait=True)
        self.tier.close()
