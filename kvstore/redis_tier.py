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
connection pool. Commands are built and replies checked by compiled loops (:mod:`kvstore.wire`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

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

if TYPE_CHECKING:
    from kvstore.resp import ReplyReader

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
        from kvstore import resp, wire
        self._resp, self._wire = resp, wire
        self._scratch = resp.Scratch()
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

    def _exchange(self, count: int, build: Callable[[int, np.ndarray], int],
                  replies: Callable[[int], int], expect: Callable[[int], int],
                  on_reply: Callable[[int, ReplyReader, int | list], None], send_size: int,
                  least: Callable[[int], int] = lambda i: 1) -> None:
        """Send ``count`` chunks, one round trip each, at most one chunk outstanding.

        redis-py owns the connection (pool, AUTH, TLS, SELECT); we write the chunks that
        ``build(i, buf)`` packs into ``buf`` to its socket and read the replies with
        :class:`ReplyReader`. Chunk ``i + 1`` is *built* while the server works on chunk ``i``
        and *sent* before ``on_reply(i, ...)`` runs, so both the encoding and the decoding overlap
        the server's work while no more than ``pipeline_depth`` commands are ever in flight (the
        same pipelining as redis-benchmark ``-P``). Error replies (an OOM-refused SET) arrive as
        exception values, not raised. ``least(i)``: the fewest bytes chunk ``i``'s replies can
        take (the reader sleeps until they are there).
        """
        conn = self.pool.get_connection()
        try:
            sock = conn._sock
            if sock is None:
                raise redis.ConnectionError("connection closed")
            reader = self._resp.ReplyReader(sock, self.config.pipeline_depth, self._scratch)
            buf = self._scratch.get("send", send_size)
            view = memoryview(buf)
            sock.sendall(view[: build(0, buf)])
            for i in range(count):
                size = build(i + 1, buf) if i + 1 < count else 0  # sendall returned: buf is free
                reply = reader.read(replies(i), expect(i), least(i))
                if size:
                    sock.sendall(view[:size])
                on_reply(i, reader, reply)
            reader.close()
        except BaseException:
            conn.disconnect()  # replies may be half-read: never reuse this connection
            raise
        finally:
            self.pool.release(conn)

    def _key_parts(self, keys: PageKeys) -> tuple[np.ndarray, ...]:
        """``stem``, ``mid``, ``prefix [n, 16]``, ``heads``, ``pages`` for :mod:`kvstore.wire`."""
        assert keys.prefix is not None and keys.pages is not None
        return (np.frombuffer(f"{self.fingerprint}:".encode(), dtype=np.uint8),
                np.frombuffer(f":{keys.layer}:".encode(), dtype=np.uint8),
                keys.prefix.contiguous().numpy().view(np.uint8).reshape(-1, 16),
                keys.heads.contiguous().numpy(), keys.pages.contiguous().numpy())

    def _chunks(self, n: int) -> tuple[int, Callable[[int], tuple[int, int]]]:
        depth = self.config.pipeline_depth
        return (n + depth - 1) // depth, lambda i: (i * depth, min(n, (i + 1) * depth))

    def _set_commands(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor
                      ) -> tuple[int, Callable[[int], tuple[int, int]],
                                 Callable[[int, np.ndarray], int], int]:
        """``(chunks, rows, build, send_size)`` for pipelined ``SET [PX]`` of these pages:
        ``build(i, buf)`` packs chunk ``i`` (key, header, checksum, payload) into ``buf``."""
        codec, parts = self.codec, self._key_parts(keys)
        template, kb, vb = codec.template(keys.layer), page_bytes(k), page_bytes(v)
        if kb.shape[1] % 8:  # K alone is not whole words: checksum K|V as one payload
            kb, vb = np.concatenate([kb, vb], axis=1), np.empty((len(keys), 0), dtype=np.uint8)
        ttl_ms = None if self.config.ttl_seconds is None else self.config.ttl_seconds * 1000
        tail = _bytes(b"\r\n" if ttl_ms is None else b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (
            len(str(ttl_ms)), ttl_ms))
        cmd = _bytes((b"*3" if ttl_ms is None else b"*5") + b"\r\n$3\r\nSET\r\n$")
        value_head = _bytes(b"\r\n$%d\r\n" % codec.value_bytes)
        row_bytes = len(cmd) + len(value_head) + codec.value_bytes + len(tail) + _KEY_ROOM + len(
            parts[0]) + len(parts[1])
        chunks, rows = self._chunks(len(keys))

        def build(i: int, buf: np.ndarray) -> int:
            return self._wire.write_sets(buf, *rows(i), *parts, template, kb, vb, kb.view("<u8"),
                                         vb.view("<u8"), codec.weights, cmd, value_head, tail)

        return chunks, rows, build, self.config.pipeline_depth * row_bytes

    def _mget_commands(self, keys: PageKeys) -> tuple[int, Callable[[int], tuple[int, int]],
                                                      Callable[[int, np.ndarray], int], int]:
        """``(chunks, rows, build, send_size)`` for one ``MGET`` per ``pipeline_depth`` keys."""
        parts = self._key_parts(keys)
        chunks, rows = self._chunks(len(keys))

        def build(i: int, buf: np.ndarray) -> int:
            return self._wire.write_mget(buf, *rows(i), *parts)

        return chunks, rows, build, 32 + self.config.pipeline_depth * (
            _KEY_ROOM + len(parts[0]) + len(parts[1]))

    def _compile(self) -> None:
        """Compile :mod:`kvstore.wire`'s loops now, for this tier's argument types, by encoding
        one page and checking it as if Redis had sent it back, with no server involved.

        numba compiles on first call (seconds on a fresh machine; later runs load its on-disk
        cache in well under one). Paying that inside the first ``put`` would stall the
        write-behind thread, and inside the first ``get`` a decode step.
        """
        one = torch.zeros(1, dtype=torch.long)
        keys = PageKeys(0, one, one, torch.zeros((1, 2), dtype=torch.int64), one)
        page = torch.zeros((1, *self.page_shape), dtype=self.spec.dtype)
        _, _, build, size = self._set_commands(keys, page, page)
        build(0, self._scratch.get("send", size))
        _, _, build, size = self._mget_commands(keys)
        build(0, self._scratch.get("send", size))
        value = bytes(self.codec.encode(keys, page, page)[0])
        reply = np.frombuffer(b"*1\r\n$%d\r\n%s\r\n" % (len(value), value), np.uint8).copy()
        starts, lens = np.empty(1, dtype=np.int64), np.empty(1, dtype=np.int64)
        _, count = self._wire.scan(reply, reply.size, 1, starts, lens)
        want = np.ascontiguousarray(self.codec.expected(keys)).view("<u8")
        out = np.empty((1, self.codec.payload_bytes), dtype=np.uint8)
        ok, corrupt = np.zeros(1, dtype=bool), np.zeros(1, dtype=bool)
        self._wire.verify_pages(reply, starts, lens, count, 0, want, self.codec.weights, out,
                                out.view("<u8"), ok, corrupt)
        if not ok.all():
            raise RuntimeError("kvstore: the compiled Redis wire path failed its own round trip")

    # -- PageStore --------------------------------------------------------------------------
    def supports_shared_keys(self) -> bool:
        return True

    def put(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.check_pages(keys, k, v)
        n = len(keys)
        stored = np.zeros(n, dtype=bool)
        if keys.prefix is None or keys.pages is None or n == 0:
            return torch.from_numpy(stored)
        chunks, rows, build, send_size = self._set_commands(keys, k, v)
        refused: list = []

        def on_reply(i: int, reader: ReplyReader, reply: int | list) -> None:
            lo, hi = rows(i)
            if isinstance(reply, int):  # every reply was +OK
                stored[lo:hi] = True
            else:
                stored[lo:hi] = [r == b"OK" for r in reply]
                refused.extend(r for r in reply if isinstance(r, Exception))

        self._call("put", lambda: self._exchange(
            chunks, build, lambda i: len(range(*rows(i))), lambda i: 5 * len(range(*rows(i))),
            on_reply, send_size,
            least=lambda i: 5 * len(range(*rows(i)))), default=None)  # "+OK\r\n"; errors longer
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
        chunks, rows, build, send_size = self._mget_commands(keys)
        want = codec.expected(keys)
        want_words = np.ascontiguousarray(want).view("<u8")
        out = np.empty((n, codec.payload_bytes), dtype=np.uint8)
        ok, corrupt = np.zeros(n, dtype=bool), np.zeros(n, dtype=bool)
        element = len(b"$%d\r\n\r\n" % codec.value_bytes) + codec.value_bytes

        def on_reply(i: int, reader: ReplyReader, reply: int | list) -> None:
            lo, hi = rows(i)
            if isinstance(reply, int):
                self._wire.verify_pages(reader.buf, reader.starts, reader.lens, reply, lo,
                                        want_words, codec.weights, out, out.view("<u8"), ok,
                                        corrupt)
            elif isinstance(reply[0], Exception):  # the server refused the whole MGET
                raise reply[0]
            else:  # a value of another size or another surprise: the numpy reference path
                ok[lo:hi], corrupt[lo:hi] = codec.decode_into(reply[0], want[lo:hi], out,
                                                              slice(lo, hi))

        self._call("get", lambda: self._exchange(
            chunks, build, lambda i: 1, lambda i: 16 + element * len(range(*rows(i))), on_reply,
            send_size), default=None)
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


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)


def _safe_url(url: str) -> str:
    """The URL without credentials, for logs."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
