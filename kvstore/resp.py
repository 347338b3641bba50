"""The Redis tier's buffers, and hiredis for the replies its compiled loops do not recognise.

:mod:`kvstore.netio` scans the common replies itself -- ``+OK`` per ``SET``, an ``MGET`` array
of bulk strings and nils. Anything else (an error reply such as OOM under ``noeviction``, a
value of another size, a protocol surprise) stops the loop, and :func:`read_rest` hands what
arrived to hiredis and reads the rest of that chunk's replies with it, so the fast path never
has to parse RESP in general.
"""

from __future__ import annotations

import socket
import threading

import hiredis
import numpy as np
import redis


class Scratch(threading.local):
    """Per-thread reusable byte buffers (a tier is called from several threads at once)."""

    def get(self, name: str, size: int) -> np.ndarray:
        """A buffer of at least ``size`` bytes (contents undefined)."""
        buf = self.__dict__.get(name)
        if buf is None or buf.size < size:
            buf = self.__dict__[name] = np.empty(max(size, 1 << 16), dtype=np.uint8)
        return buf


def read_rest(sock: socket.socket, buf: np.ndarray, got: int, replies: int) -> list:
    """``replies`` replies whose first ``got`` bytes are in ``buf``; the rest is read from
    ``sock`` (into ``buf``, after hiredis has copied what it was fed). Error replies come back
    as :class:`redis.ResponseError` values, not raised."""
    reader = hiredis.Reader(protocolError=redis.InvalidResponse, replyError=redis.ResponseError)
    reader.feed(buf, 0, got)
    out: list = []
    view = memoryview(buf)
    while len(out) < replies:
        reply = reader.gets()
        if reply is not False:
            out.append(reply)
            continue
        size = sock.recv_into(view)
        if not size:
            raise redis.ConnectionError("Redis closed the connection")
        reader.feed(buf, 0, size)
    return out
