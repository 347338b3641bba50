"""Pipelined batches over one Redis connection's socket: the Redis tier's fast path.

One call of a compiled loop (:mod:`kvstore.netio`) moves a whole ``put`` or ``get``: commands
built by :mod:`kvstore.wire`, ``pipeline_depth`` pages per round trip, replies scanned and
pages verified as they arrive. This class holds what those loops need per tier (scratch
buffers, timeouts, the ``SET`` tail) and turns a batch into a function of the socket;
:class:`kvstore.redis_tier.RedisTier` decides when to call it (pool, health, counters).
Importing this module loads numba, so the tier imports it only when it is built.
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable

import numpy as np
import redis
import torch

from kvstore import netio, resp
from kvstore.base import PageKeys
from kvstore.codec import PageCodec, page_bytes
from kvstore.config import RedisTierConfig

_KEY_ROOM = 32 + 20 + 1 + 20 + 32  # prefix hex, head, ":", page, framing and length digits
OnSlow = Callable[[int, list], None]
"""``on_slow(chunk, replies)``: a chunk's replies the loop did not recognise, parsed by hiredis."""


class Pipeline:
    """Batches of one tier's pages as compiled round-trip loops on a plain socket."""

    def __init__(self, codec: PageCodec, config: RedisTierConfig, fingerprint: str) -> None:
        self.codec, self.config, self.fingerprint = codec, config, fingerprint
        self.depth = config.pipeline_depth
        self._scratch = resp.Scratch()
        self._timeout_ms = max(1, math.ceil(config.socket_timeout_s * 1000))
        ttl_ms = None if config.ttl_seconds is None else config.ttl_seconds * 1000
        self._set_head = _bytes((b"*3" if ttl_ms is None else b"*5") + b"\r\n$3\r\nSET\r\n$")
        self._set_tail = _bytes(
            b"\r\n"
            if ttl_ms is None
            else (b"\r\n$2\r\nPX\r\n$%d\r\n%d\r\n" % (len(str(ttl_ms)), ttl_ms))
        )

    def rows(self, n: int) -> tuple[int, Callable[[int], tuple[int, int]]]:
        """``(chunks, rows)``: ``rows(i)`` is chunk ``i``'s ``[lo, hi)`` of ``n`` rows."""
        depth = self.depth
        return (n + depth - 1) // depth, lambda i: (i * depth, min(n, (i + 1) * depth))

    def _run(
        self,
        sock: socket.socket,
        run: Callable[..., int],
        chunks: int,
        replies: Callable[[int], int],
        on_slow: OnSlow,
        send_size: int,
        recv_size: int,
    ) -> None:
        """Run a compiled chunk loop (:mod:`kvstore.netio`) on ``sock``.

        redis-py owns the connection (pool, AUTH, SELECT, reconnects); the loop only moves the
        chunks' bytes. ``run(fd, lowat, first, sbuf, rbuf, starts, lens, state)`` handles
        chunks ``first...``; when it stops at a chunk whose replies it does not recognise,
        ``on_slow(i, replies)`` gets that chunk's replies parsed by hiredis and the loop goes on
        from ``i + 1``.
        """
        depth = self.depth
        lowat = sock.family in (socket.AF_INET, socket.AF_INET6)
        bufs = (
            self._scratch.get("send", send_size),
            self._scratch.get("recv", recv_size),
            np.empty(depth, np.int64),
            np.empty(depth, np.int64),
            np.zeros(3, np.int64),
        )
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
                    "Redis closed the connection"
                    if status == netio.CLOSED
                    else "Redis sent bytes after the last expected reply"
                )
            on_slow(chunk, resp.read_rest(sock, bufs[1], got, replies(chunk)))
            first = chunk + 1

    def _key_parts(self, keys: PageKeys) -> tuple[np.ndarray, ...]:
        """``stem``, ``mid``, ``prefix [n, 16]``, ``heads``, ``pages`` for :mod:`kvstore.wire`."""
        assert keys.prefix is not None and keys.pages is not None
        return (
            np.frombuffer(f"{self.fingerprint}:".encode(), dtype=np.uint8),
            np.frombuffer(f":{keys.layer}:".encode(), dtype=np.uint8),
            keys.prefix.contiguous().numpy().view(np.uint8).reshape(-1, 16),
            keys.heads.contiguous().numpy(),
            keys.pages.contiguous().numpy(),
        )

    def _set_encoder(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> tuple[tuple, int]:
        """``(enc, send_size)``: :func:`kvstore.wire.write_sets`' arguments after ``lo, hi``
        for these pages, and the most bytes one chunk of their ``SET [PX]`` commands takes."""
        codec, parts = self.codec, self._key_parts(keys)
        template, kb, vb = codec.template(keys.layer), page_bytes(k), page_bytes(v)
        if kb.shape[1] % 8:  # K alone is not whole words: checksum K|V as one payload
            kb, vb = np.concatenate([kb, vb], axis=1), np.empty((len(keys), 0), dtype=np.uint8)
        cmd, tail = self._set_head, self._set_tail
        value_head = _bytes(b"\r\n$%d\r\n" % codec.value_bytes)
        row_bytes = (
            len(cmd)
            + len(value_head)
            + codec.value_bytes
            + len(tail)
            + _KEY_ROOM
            + len(parts[0])
            + len(parts[1])
        )
        enc = (
            *parts,
            template,
            kb,
            vb,
            kb.view("<u8"),
            vb.view("<u8"),
            codec.weights,
            cmd,
            value_head,
            tail,
        )
        return enc, self.depth * row_bytes

    def put(
        self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor, stored: np.ndarray, on_slow: OnSlow
    ) -> Callable[[socket.socket], None]:
        """Pipelined ``SET`` of these pages over a plain socket (see :meth:`_run`)."""
        n, depth, timeout = len(keys), self.depth, self._timeout_ms
        chunks, rows = self.rows(n)
        enc, send_size = self._set_encoder(keys, k, v)

        def run(fd: int, lowat: bool, first: int, *bufs: np.ndarray) -> int:
            return netio.put_chunks(fd, timeout, lowat, first, n, depth, *bufs, stored, enc)

        return lambda sock: self._run(
            sock, run, chunks, lambda i: len(range(*rows(i))), on_slow, send_size, 5 * depth
        )

    def get(
        self,
        keys: PageKeys,
        want: np.ndarray,
        out: np.ndarray,
        ok: np.ndarray,
        corrupt: np.ndarray,
        on_slow: OnSlow,
    ) -> Callable[[socket.socket], None]:
        """One verified ``MGET`` per ``pipeline_depth`` keys over a plain socket: good pages'
        payloads into ``out``, ``ok`` / ``corrupt`` per row (see :meth:`_run`)."""
        n, depth, timeout, codec = len(keys), self.depth, self._timeout_ms, self.codec
        chunks, _ = self.rows(n)
        parts = self._key_parts(keys)
        check = (
            np.ascontiguousarray(want).view("<u8"),
            codec.weights,
            out,
            out.view("<u8"),
            ok,
            corrupt,
        )
        element = len(b"$%d\r\n\r\n" % codec.value_bytes) + codec.value_bytes
        header = codec.value_bytes - codec.payload_bytes
        image = self._scratch.get("image", 32 + depth * (header + 32))  # framing and headers

        def run(fd: int, lowat: bool, first: int, *bufs: np.ndarray) -> int:
            return netio.get_chunks(fd, timeout, lowat, first, n, depth, *bufs, image, parts, check)

        send_size = 32 + depth * (_KEY_ROOM + len(parts[0]) + len(parts[1]))
        return lambda sock: self._run(
            sock, run, chunks, lambda i: 1, on_slow, send_size, 16 + element * depth
        )

    def compile(self, page_shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Compile the loops of :mod:`kvstore.netio` and :mod:`kvstore.wire` now, for this
        tier's argument types: one page ``SET`` and read back over a socket pair whose other
        end answers as Redis would, with no server involved.

        numba compiles on first call (seconds on a fresh machine; later runs load its on-disk
        cache in well under one). Paying that inside the first ``put`` would stall the
        write-behind thread, and inside the first ``get`` a decode step.
        """
        one = torch.zeros(1, dtype=torch.long)
        keys = PageKeys(0, one, one, torch.zeros((1, 2), dtype=torch.int64), one)
        page = torch.zeros((1, *page_shape), dtype=dtype)
        value = bytes(self.codec.encode(keys, page, page)[0])
        stored, ok, corrupt = (np.zeros(1, dtype=bool) for _ in range(3))
        out = np.empty((1, self.codec.payload_bytes), dtype=np.uint8)
        ours, redis_end = socket.socketpair()
        with ours, redis_end:
            redis_end.sendall(b"+OK\r\n")
            self.put(keys, page, page, stored, _no_fallback)(ours)
            redis_end.sendall(b"*1\r\n$%d\r\n%s\r\n" % (len(value), value))
            self.get(keys, self.codec.expected(keys), out, ok, corrupt, _no_fallback)(ours)
        if not (stored.all() and ok.all()):
            raise RuntimeError("kvstore: the compiled Redis wire path failed its own round trip")


def _no_fallback(i: int, replies: list) -> None:
    raise RuntimeError(f"kvstore: unexpected replies in the compile round trip: {replies}")


def _bytes(text: bytes) -> np.ndarray:
    return np.frombuffer(text, dtype=np.uint8)
