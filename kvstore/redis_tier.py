"""The cluster-wide Redis tier: content-addressed binary pages shared by every replica.

Keys are ``{model fingerprint}:{prefix hash hex}:{layer}:{head}:{page}``: the prefix hash covers
every token through the page, so a replica that sees a prompt another replica served finds its
pages under the same names. Values are :mod:`kvstore.codec` pages (header + raw bytes +
checksum).

Redis is a cache here, never a dependency: every failure (refused connection, timeout, a server
error such as OOM) turns into misses or refused puts plus a counter, and nothing raises to the
caller. After a connection failure the tier answers at once with misses for ``retry_after_s``
(so decode never waits on a dead server), then tries again; the first success logs the
reconnection. Writes are pipelined ``SET ... PX ttl`` commands, reads one ``MGET`` per
``pipeline_depth`` keys, one round trip per ``pipeline_depth`` pages, through a bounded blocking
connection pool. On plain TCP and Unix sockets one compiled loop per call builds the commands,
moves the bytes and checks the replies (:mod:`kvstore.pipeline`); over TLS the same commands go
through redis-py pipelines and the numpy codec.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import redis
import torch
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvhead.core.spec import HeadPageSpec
from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.codec import PageCodec
from kvstore.config import RedisTierConfig
from kvstore.prefix import prefix_hex

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisTier(PageStore):
    """Shared tier over one Redis server (or a proxy that speaks the same commands)."""

    name = "redis"

    def __init__(self, spec: HeadPageSpec, config: RedisTierConfig, fingerprint: str) -> None:
        super().__init__(spec)
        self.config = config
        self.codec = PageCodec(spec, fingerprint)
        self.fingerprint = fingerprint
        self.pool = redis.BlockingConnectionPool.from_url(
            config.url,
            max_connections=config.max_connections,
            timeout=config.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            **config.connection_kwargs(),
        )
        self.client = redis.Redis(connection_pool=self.pool)
        self._lock = threading.Lock()
        # numba loads only when a Redis tier is built, never at ``import kvstore``: loading
        # numba/llvmlite early broke vLLM's scan of loaded modules when it registers its CPU
        # kernels, and host-only runs (the vLLM plugin's arena) never need it.
        from kvstore.pipeline import Pipeline

        self._pipe = Pipeline(self.codec, config, fingerprint)
        self._pipe.compile(self.page_shape, spec.dtype)
        self._ttl_ms = None if config.ttl_seconds is None else config.ttl_seconds * 1000
        self._tls = config.url.startswith("rediss://")  # the compiled loops need plain sockets
        self._stats = TierStats(self.name)
        self._down_until = 0.0
        self._down = False
        self.available = self._call("connect", self._connect, default=False)
        if self.available:
            log.info("kvstore: Redis tier at %s is up", _safe_url(config.url))

    # -- health -----------------------------------------------------------------------------
    def _connect(self) -> bool:
        self.client.ping()
        if self.config.memory_budget_bytes is not None:
            try:
                self.client.config_set("maxmemory", self.config.memory_budget_bytes)
                self.client.config_set("maxmemory-policy", self.config.eviction_policy)
            except redis.ResponseError as exc:  # managed Redis often disables CONFIG
                log.warning("kvstore: could not set the Redis memory budget: %s", exc)
        return True

    def _call(self, op: str, fn: Callable[[], T], default: T) -> T:
        """Run ``fn`` unless Redis is marked down; on failure mark it down, return ``default``."""
        if time.monotonic() < self._down_until:
            return default
        start = time.perf_counter()
        try:
            result = fn()
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            return default
        except redis.RedisError as exc:  # server-side error for the whole call
            with self._lock:
                self._stats.errors += 1
            log.warning("kvstore: Redis %s failed: %s", op, exc)
            return default
        with self._lock:
            self._stats.record(op, time.perf_counter() - start)
            was_down, self._down = self._down, False
        if was_down:
            log.warning("kvstore: Redis at %s is reachable again", _safe_url(self.config.url))
        return result

    def _mark_down(self, exc: Exception) -> None:
        with self._lock:
            self._stats.errors += 1
            self._down_until = time.monotonic() + self.config.retry_after_s
            first, self._down = not self._down, True
        if first:
            log.warning(
                "kvstore: Redis at %s unavailable (%s); serving from the host tier, "
                "retrying every %.1fs",
                _safe_url(self.config.url),
                exc,
                self.config.retry_after_s,
            )

    @property
    def is_down(self) -> bool:
        """True while the last attempt failed (calls return misses until the next retry)."""
        return self._down

    # -- naming -----------------------------------------------------------------------------
    def key_names(self, keys: PageKeys) -> list[str]:
        if keys.prefix is None or keys.pages is None:
            raise ValueError("the Redis tier needs content-addressed keys (prefix and pages)")
        fp, layer = self.fingerprint, keys.layer
        return [
            f"{fp}:{h}:{layer}:{head}:{page}"
            for h, head, page in zip(
                prefix_hex(keys.prefix), keys.heads.tolist(), keys.pages.tolist()
            )
        ]

    def _on_connection(self, fn: Callable[[socket.socket], None]) -> None:
        """``fn(sock)`` on a pooled connection's socket; a failure drops the connection."""
        conn = self.pool.get_connection()
        try:
            if conn._sock is None:
                raise redis.ConnectionError("connection closed")
            fn(conn._sock)
        except BaseException:
            conn.disconnect()  # replies may be half-read: never reuse this connection
            raise
        finally:
            self.pool.release(conn)

    # -- PageStore --------------------------------------------------------------------------
    def supports_shared_keys(self) -> bool:
        return True

    def put(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.check_pages(keys, k, v)
        n = len(keys)
        stored = np.zeros(n, dtype=bool)
        if keys.prefix is None or keys.pages is None or n == 0:
            return torch.from_numpy(stored)
        chunks, rows = self._pipe.rows(n)
        refused: list = []

        def on_slow(i: int, replies: list) -> None:
            lo, hi = rows(i)
            stored[lo:hi] = [r is True or r == b"OK" for r in replies]  # redis-py says True
            refused.extend(r for r in replies if isinstance(r, Exception))

        def over_tls() -> None:
            names, values = self.key_names(keys), self.codec.encode(keys, k, v)
            for i in range(chunks):
                pipe = self.client.pipeline(transaction=False)
                for j in range(*rows(i)):
                    pipe.set(names[j], values[j], px=self._ttl_ms)
                on_slow(i, pipe.execute(raise_on_error=False))

        self._call(
            "put",
            over_tls
            if self._tls
            else lambda: self._on_connection(self._pipe.put(keys, k, v, stored, on_slow)),
            default=None,
        )
        done = int(stored.sum())
        with self._lock:
            self._stats.puts += done
            self._stats.put_failures += n - done
            self._stats.bytes_in += done * self.codec.payload_bytes
        if refused:  # e.g. OOM under noeviction: a refused write, not an outage
            log.debug("kvstore: Redis refused %d writes: %s", len(refused), refused[0])
        return torch.from_numpy(stored)

    def get(self, keys: PageKeys) -> PageBatch:
        n = len(keys)
        if keys.prefix is None or keys.pages is None or n == 0:
            pages = torch.zeros((n, 2, *self.page_shape), dtype=self.spec.dtype)
            return PageBatch(pages[:, 0], pages[:, 1], torch.zeros(n, dtype=torch.bool))
        codec = self.codec
        chunks, rows = self._pipe.rows(n)
        want = codec.expected(keys)
        out = np.empty((n, codec.payload_bytes), dtype=np.uint8)
        ok, corrupt = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)

        def on_slow(i: int, replies: list) -> None:
            if isinstance(replies[0], Exception):  # the server refused the whole MGET
                raise replies[0]
            lo, hi = rows(i)  # a value of another size or another surprise: the numpy codec
            ok[lo:hi], corrupt[lo:hi] = codec.decode_into(
                replies[0], want[lo:hi], out, slice(lo, hi)
            )

        def over_tls() -> None:
            names = self.key_names(keys)
            for i in range(chunks):
                on_slow(i, [self.client.mget(names[slice(*rows(i))])])

        self._call(
            "get",
            over_tls
            if self._tls
            else lambda: self._on_connection(self._pipe.get(keys, want, out, ok, corrupt, on_slow)),
            default=None,
        )
        decoded = codec.finish(out, ok, corrupt)
        bad = np.flatnonzero(corrupt).tolist()
        if bad:  # never serve, and repair: the next writer replaces it
            log.warning("kvstore: dropped %d corrupt Redis pages", len(bad))
            names = self.key_names(keys)
            self._call("repair", lambda: self.client.delete(*[names[i] for i in bad]), default=0)
        hits = int(ok.sum())
        with self._lock:
            self._stats.hits += hits
            self._stats.misses += n - hits
            self._stats.corrupt += len(bad)
            self._stats.bytes_out += hits * codec.payload_bytes
        return PageBatch(decoded.pages[:, 0], decoded.pages[:, 1], decoded.ok)

    def contains(self, keys: PageKeys) -> torch.Tensor:
        n = len(keys)
        if keys.prefix is None or n == 0:
            return torch.zeros(n, dtype=torch.bool)
        names = self.key_names(keys)

        def run() -> list:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.exists(name)
            return pipe.execute()

        return torch.tensor(self._call("contains", run, default=[0] * n), dtype=torch.int64) > 0

    def delete(self, keys: PageKeys) -> int:
        if keys.prefix is None or len(keys) == 0:
            return 0
        names = self.key_names(keys)
        return int(self._call("delete", lambda: self.client.delete(*names), default=0))

    # -- chain markers ------------------------------------------------------------------------
    def _chain_names(self, prefix: torch.Tensor) -> list[str]:
        return [f"{self.fingerprint}:{h}:chain" for h in prefix_hex(prefix)]

    def mark_chains(self, prefix: torch.Tensor) -> bool:
        """Record that every layer and head of the pages hashed ``prefix [n, 2]`` is stored.

        A writer sets the markers after all of a page's per-head pages were accepted, so one
        ``MGET`` of markers tells a replica how much of a prompt it can load (not a scan of
        layers x heads keys). A marker can outlive a page (TTL skew, LRU eviction): a load
        that then misses falls back to recomputation, so a marker is a hint, never a promise.
        """
        names = self._chain_names(prefix)
        if not names:
            return True

        def run() -> bool:
            pipe = self.client.pipeline(transaction=False)
            for name in names:
                pipe.set(name, b"1", px=self._ttl_ms)
            return all(r is True for r in pipe.execute(raise_on_error=False))

        return self._call("mark", run, default=False)

    def leading_chains(self, prefix: torch.Tensor) -> int:
        """How many leading pages of ``prefix [n, 2]`` carry a chain marker (0 while down)."""
        names = self._chain_names(prefix)
        if not names:
            return 0

        def run() -> int:
            found = self.client.mget(names)
            return next((i for i, v in enumerate(found) if v is None), len(found))

        return self._call("match", run, default=0)

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(
                **{
                    **vars(self._stats),
                    "op_seconds": dict(self._stats.op_seconds),
                    "op_calls": dict(self._stats.op_calls),
                    "available": not self._down,
                }
            )

    def close(self) -> None:
        self.pool.disconnect()


def _safe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
