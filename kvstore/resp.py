"""Socket side of the Redis tier's fast path: reusable buffers and a reply reader.

Replies are received straight into a reused buffer and their framing scanned by
:func:`kvstore.wire.scan` (no Python object per element). Only the common shapes are handled
there -- ``+OK`` per ``SET``, an ``MGET`` array of bulk strings and nils; anything else (an error
reply such as OOM under ``noeviction``, a protocol surprise) is handed to hiredis for that chunk,
so the fast path never has to parse RESP in general.
"""

from __future__ import annotations

import socket
import ssl
import threading

import hiredis
import numpy as np
import redis

from kvstore.wire import SCAN_DONE, SCAN_EXTRA, SCAN_INCOMPLETE, scan


class Scratch(threading.local):
    """Per-thread reusable byte buffers (a tier is called from several threads at once)."""

    def get(self, name: str, size: int, keep: int = 0) -> np.ndarray:
        """A buffer of at least ``size`` bytes; a grown buffer keeps the first ``keep`` bytes."""
        buf = self.__dict__.get(name)
        if buf is None or buf.size < size:
            grown = np.empty(max(size, 1 << 16), dtype=np.uint8)
            if buf is not None and keep:
                grown[:keep] = buf[:keep]
            buf = self.__dict__[name] = grown
        return buf


class ReplyReader:
    """Reads the replies to one chunk of pipelined commands from one connection.

    After :meth:`read` returns an element count, element ``i``'s body is
    ``buf[starts[i] : starts[i] + lens[i]]`` (``lens[i] == -1``: nil), valid until the next read.
    """

    def __init__(self, sock: socket.socket, elements: int, scratch: Scratch) -> None:
        self.sock, self.scratch = sock, scratch
        self.starts = np.empty(elements, dtype=np.int64)
        self.lens = np.empty(elements, dtype=np.int64)
        self.buf = scratch.get("recv", 0)
        self.lowat = 1
        self.can_wait_for = sock.family in (socket.AF_INET, socket.AF_INET6) and not isinstance(
            sock, ssl.SSLSocket)  # TLS records make received bytes no bound on reply bytes

    def _wait_for(self, size: int) -> None:
        """Wake the reader only once ``size`` bytes are there (``SO_RCVLOWAT``).

        Redis answers a chunk of big ``SET`` commands in many small pieces (it replies after
        each socket read); waking for each cost more client CPU than building the chunk. The
        mark is always a lower bound on the bytes still to come, so it can never stall a read.
        """
        size = max(1, size)
        if self.can_wait_for and size != self.lowat:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, size)
            self.lowat = size

    def close(self) -> None:
        """Give the socket back as found (redis-py reads it next)."""
        self._wait_for(1)

    def read(self, replies: int, expect: int, least: int = 1) -> int | list:
        """Receive ``replies`` replies (``expect``: their usual total size; ``least``: the
        fewest bytes they can possibly take). Returns the element count when
        :func:`kvstore.wire.scan` recognises them all, else hiredis' parsed replies (error
        replies as exception values, not raised)."""
        buf = self.buf = self.scratch.get("recv", expect + 1)
        got = 0
        while True:
            if got == buf.size:  # larger than usual (foreign values): grow, keep what arrived
                buf = self.buf = self.scratch.get("recv", 2 * buf.size, keep=got)
            self._wait_for(least - got)
            size = self.sock.recv_into(memoryview(buf)[got:])
            if not size:
                raise redis.ConnectionError("Redis closed the connection")
            got += size
            if buf[got - 1] != 10:  # every complete reply ends in CRLF: more is on the way
                continue
            status, count = scan(buf, got, replies, self.starts, self.lens)
            if status == SCAN_DONE:
                return count
            if status == SCAN_EXTRA:
                raise redis.ConnectionError("Redis sent bytes after the last expected reply")
            if status != SCAN_INCOMPLETE:
                return self._slow(got, replies)

    def _slow(self, got: int, replies: int) -> list:
        """Hand what arrived to hiredis and read the rest of the ``replies`` replies with it."""
        self._wait_for(1)
        reader = hiredis.Reader()
        reader.feed(self.buf, 0, got)
        out: list = []
        view = memoryview(self.buf)
        while len(out) < replies:
            reply = reader.gets()
            if reply is not False:
                out.append(reply)
                continue
            size = self.sock.recv_into(view)
            if not size:
                raise redis.ConnectionError("Redis closed the connection")
            reader.feed(self.buf, 0, size)
        return out
