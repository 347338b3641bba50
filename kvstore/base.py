"""The page-store interface every tier implements, and the batch types it speaks.

A *page* here is the K and V of one KV head for one page of ``spec.page_size`` tokens:
``k, v [P, D]`` in ``spec.dtype``. Every call is batched: a :class:`PageKeys` names ``n`` pages of
one layer by tensors, so the vLLM plugin can call a tier every decode step without a Python loop
per page.

Two addresses travel together in :class:`PageKeys`, and each tier uses the one it can trust:

- ``block_ids`` (local): the vLLM block a page belongs to. The host arena is indexed by
  ``(layer, block id, head)``, so page lifetime follows vLLM's block allocator.
- ``prefix`` + ``pages`` (global, optional): a 128-bit content hash of the token prefix *through*
  this page and the page's logical index. Replicas that saw the same tokens compute the same
  hash, which is what lets a shared tier (Redis) serve one replica's pages to another. A page
  without a prefix hash can only live in local tiers.

Methods of :class:`PageStore` and who calls them:

- ``put(keys, k, v)`` -- plugin (full pages leaving the device), tier manager (spill, promote).
  Returns which rows were stored; a tier that cannot store a row says so, it never raises for
  capacity or a remote failure.
- ``get(keys) -> PageBatch(k, v, found)`` -- plugin at rerank time, tier manager on lookup. Rows
  not found are zero and ``found`` is False: a miss means "recompute", never "wrong data".
- ``contains(keys) -> found`` -- tier manager (prefix matching, prefetch planning).
- ``delete(keys) -> int`` -- plugin when vLLM frees a block.
- ``stats() -> TierStats`` -- metrics exporter, benchmarks.
- ``aput/aget/acontains/adelete`` -- async callers; by default the sync call in a worker thread.
- ``supports_shared_keys()`` -- capability probe: True when the tier addresses pages by prefix
  hash (and ignores rows without one) instead of by block id.
- ``close()`` -- shutdown; releases threads, connections and buffers.
"""

from __future__ import annotations

import asyncio
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from kvhead.core.spec import HeadPageSpec


@dataclass(frozen=True)
class PageKeys:
    """Addresses of ``n`` pages of one layer (see the module docstring for the two schemes)."""

    layer: int
    block_ids: torch.Tensor  # [n] int64: local vLLM block id of each page
    heads: torch.Tensor  # [n] int64: KV head of each page
    prefix: torch.Tensor | None = None  # [n, 2] int64: 128-bit hash of tokens through the page
    pages: torch.Tensor | None = None  # [n] int64: logical page index in its sequence

    def __post_init__(self) -> None:
        n = self.block_ids.shape[0]
        if self.block_ids.dim() != 1 or self.heads.shape != (n,):
            raise ValueError(
                f"block_ids and heads must be 1-D of one length, got {tuple(self.block_ids.shape)}"
                f" and {tuple(self.heads.shape)}"
            )
        if (self.prefix is None) != (self.pages is None):
            raise ValueError("prefix and pages go together: give both or neither")
        if self.prefix is not None and (
            self.prefix.shape != (n, 2) or self.pages is None or self.pages.shape != (n,)
        ):
            raise ValueError(f"prefix must be [{n}, 2] and pages [{n}] for {n} keys")

    def __len__(self) -> int:
        return self.block_ids.shape[0]

    @property
    def named(self) -> bool:
        """True when every row carries a content address (prefix hash and page index)."""
        return self.prefix is not None

    def select(self, rows: torch.Tensor) -> PageKeys:
        """The sub-batch at ``rows`` (a bool mask or an index tensor)."""
        return PageKeys(
            self.layer,
            self.block_ids[rows],
            self.heads[rows],
            None if self.prefix is None else self.prefix[rows],
            None if self.pages is None else self.pages[rows],
        )


class PageBatch(NamedTuple):
    """Pages read from a tier: ``k, v [n, P, D]`` (zero where missing) and ``found [n]``."""

    k: torch.Tensor
    v: torch.Tensor
    found: torch.Tensor


@dataclass
class TierStats:
    """Counters of one tier since it started; the metrics module turns these into gauges."""

    name: str
    capacity_pages: int = 0  # 0 = unbounded or unknown (a shared Redis)
    resident_pages: int = 0
    hits: int = 0
    misses: int = 0
    puts: int = 0  # pages stored
    put_failures: int = 0  # pages a tier refused or lost (remote down, out of memory)
    evictions: int = 0
    spilled: int = 0  # evicted pages handed to the next tier
    corrupt: int = 0  # pages whose header or checksum did not match: dropped, never served
    errors: int = 0  # remote operations that failed (connection, timeout, server error)
    bytes_in: int = 0  # payload bytes written into the tier
    bytes_out: int = 0  # payload bytes served from the tier
    available: bool = True  # False while a remote tier is unreachable (calls return misses)
    op_seconds: dict[str, float] = field(default_factory=dict)  # total wall time per operation
    op_calls: dict[str, int] = field(default_factory=dict)

    def record(self, op: str, seconds: float) -> None:
        self.op_seconds[op] = self.op_seconds.get(op, 0.0) + seconds
        self.op_calls[op] = self.op_calls.get(op, 0) + 1

    def mean_latency(self, op: str) -> float:
        """Mean seconds per call of ``op`` (0 when never called)."""
        calls = self.op_calls.get(op, 0)
        return self.op_seconds.get(op, 0.0) / calls if calls else 0.0


class PageStore(ABC):
    """One tier of the page store; see the module docstring for each method's caller."""

    name: str = "store"

    def __init__(self, spec: HeadPageSpec) -> None:
        self.spec = spec

    @property
    def page_shape(self) -> tuple[int, int]:
        return (self.spec.page_size, self.spec.head_dim)

    @abstractmethod
    def put(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Store ``k, v [n, P, D]`` under ``keys``; returns ``stored [n]`` bool."""

    @abstractmethod
    def get(self, keys: PageKeys) -> PageBatch:
        """Read the pages named by ``keys``; misses are zero with ``found`` False."""

    @abstractmethod
    def contains(self, keys: PageKeys) -> torch.Tensor:
        """``found [n]`` bool without reading the pages."""

    @abstractmethod
    def delete(self, keys: PageKeys) -> int:
        """Forget the pages; returns how many were present."""

    @abstractmethod
    def stats(self) -> TierStats:
        """A snapshot of this tier's counters."""

    def supports_shared_keys(self) -> bool:
        """True when the tier addresses pages by prefix hash, so other replicas can read them."""
        return False

    def close(self) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Release threads, connections and buffers (no-op for purely local tiers)."""

    async def aput(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return await asyncio.to_thread(self.put, keys, k, v)

    async def aget(self, keys: PageKeys) -> PageBatch:
        return await asyncio.to_thread(self.get, keys)

    async def acontains(self, keys: PageKeys) -> torch.Tensor:
        return await asyncio.to_thread(self.contains, keys)

    async def adelete(self, keys: PageKeys) -> int:
        return await asyncio.to_thread(self.delete, keys)

    def check_pages(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> None:
        """Raise a clear ``ValueError`` when ``k``/``v`` do not match ``keys`` and the spec."""
        want = (len(keys), *self.page_shape)
        for name, t in (("k", k), ("v", v)):
            if tuple(t.shape) != want:
                raise ValueError(f"{self.name}: {name} must be {list(want)}, got {list(t.shape)}")
            if t.dtype != self.spec.dtype:
                raise ValueError(f"{self.name}: {name} must be {self.spec.dtype}, got {t.dtype}")
