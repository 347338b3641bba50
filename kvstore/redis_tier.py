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
moves the bytes and checks the replies (:mod:`kvstore.netio`, :mod:`kvstore.wire`); over TLS the
same commands go through redis-py pipelines and the numpy codec.
"""

from __future__ import annotations

import logging
import math
import os
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

from kvhead.spec import HeadPageSpec
from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.codec import PageCodec, page_bytes
from kvstore.config import RedisTierConfig
from kvstore.prefix import prefix_hex

log = logging.getLogger(__name__)
T = TypeVar("T")
_KEY_ROOM = 32 + 20 + 1 + 20 + 32  # prefix hex, head, ":", page, framing and length digits


class RedisTier(PageStore):
    """Shared tier over one Redis server (or a proxy that speaks the same commands)."""

    name = "redis"

    def __init__(self, spec: HeadPageSpec, config: RedisTierConfig, fingerprint: str) -> None:
        super().__init__(spec)
        self.config = config
        self.codec = PageCodec(spec, fingerprint)
        self.fingerprint = fingerprint
        extra: dict = {}
        if config.url.startswith("rediss://"):
            extra.update(ssl_ca_certs=config.ssl_ca_certs, ssl_certfile=config.ssl_certfile,
                         ssl_keyfile=config.ssl_keyfile)
        self.pool = redis.BlockingConnectionPool.from_url(
            config.url, max_connections=config.max_connections, timeout=config.socket_timeout_s,
            socket_timeout=config.socket_timeout_s,
            socket_connect_timeout=config.connect_timeout_s,
            username=config.username, password=config.password,
            retry=Retry(NoBackoff(), 0), **extra,
        )
        self.client = redis.Redis(connection_pool=self.pool)
        self._lock = threading.Lock()
        # numba loads only when a Redis tier is built, never at ``import kvstore``: loading
        # numba/llvmlite early broke vLLM's scan of loaded modules when it registers its CPU
        # kernels, and host-only runs (the vLLM plugin's arena) never need it.
        from kvstore import netio, resp, wire
        self._netio, self._resp, self._wire = netio, resp, wire
        self._scratch = resp.Scratch()
        self._timeout_ms = max(1, math.ceil(config.socket_timeout_s * 1000))
        self._ttl_ms = None if config.ttl_seconds is None else config.ttl_seconds * 1000
        self._tls = config.url.startswith("rediss://")  # the compiled loops need plain sockets
        self._compile()
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
        """Run ``fn`` unless Redis is marked down; on failure mark it down and return ``default``."""
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
                "retrying every %.1fs", _safe_url(self.config.url), exc, self.config.retry_after_s,
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
            for h, head, page in zip(prefix_hex(keys.prefix), keys.heads.tolist(),
                                     keys.pages.tolist())
        ]

    def _pipelined(self, sock: socket.socket, run: Callable[..., int], chunks: int,
                   replies: Callable[[int], int], on_slow: Callable[[int, list], None],
                   send_size: int, recv_size: int) -> None:
        """Run a compiled chunk loop (:mod:`kvstore.netio`) on ``sock``.

        redis-py owns the connection (pool, AUTH, SELECT, reconnects); the loop only moves the
        chunks' bytes. ``run(fd, lowat, first, sbuf, rbuf, starts, lens, state)`` handles
        chunks ``first...``; when it stops at a chunk whose replies it does not recognise,
        ``on_slow(i, replies)`` gets that chunk's replies parsed by hiredis and the loop goes on
        from ``i + 1``.
        """
        netio, depth = self._netio, self.config.pipeline_depth
        lowat = sock.family in (socket.AF_INET, socket.AF_INET6)
        bufs = (self._scratch.get("send", send_size), self._scratch.get("recv", recv_size),
                np.empty(depth, np.int64), np.empty(depth, np.int64), np.zeros(3, np.int64))
        first = 0
        while first < chunks:
            status = run(sock.fileno(), lowat, first, *bufs)
            if status == netio.DONE:
                return
            chunk, got, err = (int(x) for x in bufs[4])
            if status == netio.TIMEOUT:
                raise redis.TimeoutError("Redis did not answer in time")
            if status == netio.FAILED:
                raise redis.ConnectionError(os.strerror(err))
            if status != netio.FALLBACK:
                raise redis.ConnectionError(
                    "Redis closed the connection" if status == netio.CLOSED
                    else "Redis sent bytes after the last expected reply")
            on_slow(chunk, self._resp.read_rest(sock, bufs[1], got, replies(chunk)))
            first = chunk + 1

    def _key_parts(self, keys: PageKeys) -> tuple[np.ndarray, ...]:
        """``stem``, ``mid``, ``prefix [n, 16]``, ``heads``, ``pages`` for :mod:`kvstore.wire`."""
        assert keys.prefix is not None and keys.pages is not None
        return (np.frombuffer(f"{self.fingerprint}:".encode(), dtype=np.uint8),
                np.frombuffer(f":{keys.layer}:".encode(), dtype=np.uint8),
                keys.prefix.contiguous().numpy().view(np.uint8).reshape(-1, 16),
                keys.heads.contiguous().numpy(), keys.pages.contiguous().numpy())

    def _rows(self, n: int) -> tuple[int, Callable[[int], tuple[int, int]]]:
        """``(chunks, rows)``: ``rows(i)`` is chunk ``i``'s ``[lo, hi)`` of ``n`` rows."""
        depth = self.config.pipeline_depth
        return (n + depth - 1) // depth, lambda i: (i * depth, min(n, (i + 1) * depth))

    def _set_encoder(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor
                     ) -> tuple[tuple, int]:
        """``(enc, send_size)``: :func:`kvstore.wire.write_sets`' arguments after ``lo, hi``
        for these pages, and the most bytes one chunk of their ``SET [PX]`` commands takes."""
        codec, parts = self.codec, self._key_parts(keys)
        template, kb, vb = codec.template(keys.layer), page_bytes(k), page_bytes(v)
        if kb.shape[1] % 8:  # K alone is not whole words: checksum K|V as one payload
            kb, vb = np.concatenate([kb, vb], axis=1), np.empty((len(keys), 0), dtype=np.uint8)
        ttl_ms = self._ttl_ms
        tail = _bytes(b"\r\n" if ttl_ms is None else b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (
            len(str(ttl_ms)), ttl_ms))
        cmd = _bytes((b"*3" if ttl_ms is None else b"*5") + b"\r\n$3\r\nSET\r\n$")
        value_head = _bytes(b"\r\n$%d\r\n" % codec.value_bytes)
        row_bytes = len(cmd) + len(value_head) + codec.value_bytes + len(tail) + _KEY_ROOM + len(
            parts[0]) + len(parts[1])
        enc = (*parts, template, kb, vb, kb.view("<u8"), vb.view("<u8"), codec.weights, cmd,
               value_head, tail)
        return enc, self.config.pipeline_depth * row_bytes

    def _put_loop(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor, stored: np.ndarray,
                  on_slow: Callable[[int, list], None]) -> Callable[[socket.socket], None]:
        """Pipelined ``SET`` of these pages over a plain socket (see :meth:`_pipelined`)."""
        n, depth, timeout = len(keys), self.config.pipeline_depth, self._timeout_ms
        chunks, rows = self._rows(n)
        enc, send_size = self._set_encoder(keys, k, v)

        def run(fd: int, lowat: bool, first: int, *bufs: np.ndarray) -> int:
            return self._netio.put_chunks(fd, timeout, lowat, first, n, depth, *bufs, stored,
                                          enc)

        return lambda sock: self._pipelined(sock, run, chunks, lambda i: len(range(*rows(i))),
                                            on_slow, send_size, 5 * depth)

    def _get_loop(self, keys: PageKeys, want: np.ndarray, out: np.ndarray, ok: np.ndarray,
                  corrupt: np.ndarray, on_slow: Callable[[int, list], None]
                  ) -> Callable[[socket.socket], None]:
        """One verified ``MGET`` per ``pipeline_depth`` keys over a plain socket."""
        n, depth, timeout, codec = len(keys), self.config.pipeline_depth, self._timeout_ms, \
            self.codec
        chunks, _ = self._rows(n)
        parts = self._key_parts(keys)
        check = (np.ascontiguousarray(want).view("<u8"), codec.weights, out, out.view("<u8"),
                 ok, corrupt)
        element = len(b"$%d\r\n\r\n" % codec.value_bytes) + codec.value_bytes
        header = codec.value_bytes - codec.payload_bytes
        image = self._scratch.get("image", 32 + depth * (header + 32))  # framing and headers

        def run(fd: int, lowat: bool, first: int, *bufs: np.ndarray) -> int:
            return self._netio.get_chunks(fd, timeout, lowat, first, n, depth, *bufs, image,
                                          parts, check)

        send_size = 32 + depth * (_KEY_ROOM + len(parts[0]) + len(parts[1]))
        return lambda sock: self._pipelined(sock, run, chunks, lambda i: 1, on_slow, send_size,
                                            16 + element * depth)

    def _compile(self) -> None:
        """Compile the loops of :mod:`kvstore.netio` and :mod:`kvstore.wire` now, for this
        tier's argument types: one page ``SET`` and read back over a socket pair whose other
        end answers as Redis would, with no server involved.

        numba compiles on first call (seconds on a fresh machine; later runs load its on-disk
        cache in well under one). Paying that inside the first ``put`` would stall the
        write-behind thread, and inside the first ``get`` a decode step.
        """
        one = torch.zeros(1, dtype=torch.long)
        keys = PageKeys(0, one, one, torch.zeros((1, 2), dtype=torch.int64), one)
        page = torch.zeros((1, *self.page_shape), dtype=self.spec.dtype)
        value = bytes(self.codec.encode(keys, page, page)[0])
        stored, ok, corrupt = (np.zeros(1, dtype=bool) for _ in range(3))
        out = np.empty((1, self.codec.payload_bytes), dtype=np.uint8)
        ours, redis_end = socket.socketpair()
        with ours, redis_end:
            redis_end.sendall(b"+OK\r\n")
            self._put_loop(keys, page, page, stored, _no_fallback)(ours)
            redis_end.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(value), value))
            self._get_loop(keys, self.codec.expected(keys), out, ok, corrupt, _no_fallback)(ours)
        if not (stored.all() and ok.all()):
            raise RuntimeError("kvstore: the compiled Redis wire path failed its own round trip")

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
        chunks, rows = self._rows(n)
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

        self._call("put", over_tls if self._tls else lambda: self._on_connection(
            self._put_loop(keys, k, v, stored, on_slow)), default=None)
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
        chunks, rows = self._rows(n)
        want = codec.expected(keys)
        out = np.empty((n, codec.payload_bytes), dtype=np.uint8)
        ok, corrupt = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)

        def on_slow(i: int, replies: list) -> None:
            if isinstance(replies[0], Exception):  # the server refused the whole MGET
                raise replies[0]
            lo, hi = rows(i)  # a value of another size or another surprise: the numpy codec
            ok[lo:hi], corrupt[lo:hi] = codec.decode_into(replies[0], want[lo:hi], out,
                                                          slice(lo, hi))

        def over_tls() -> None:
            names = self.key_names(keys)
            for i in range(chunks):
                on_slow(i, [self.client.mget(names[slice(*rows(i))])])

        self._call("get", over_tls if self._tls else lambda: self._on_connection(
            self._get_loop(keys, want, out, ok, corrupt, on_slow)), default=None)
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

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(**{**vars(self._stats), "op_seconds": dict(self._stats.op_seconds),
                                "op_calls": dict(self._stats.op_calls),
                                "available": not self._down})

    def close(self) -> None:
        self.pool.disconnect()


def _no_fallback(i: int, replies: list) -> None:
    raise RuntimeError(f"kvstore: unexpected replies in the compile round trip: {replies}")


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def _safe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
