"""A whole batch of pipelined round trips in one compiled call, on the socket's file descriptor.

Why: after :mod:`kvstore.wire` made encoding and checking cheap, what was left of the tier's
client CPU above redis-benchmark's was the Python around each 64-page chunk -- a dozen calls
per round trip (build, sendall, poll, recv, scan, verify, bookkeeping), each with numpy and
numba dispatch -- and for reads, waking for every piece of a reply. Here one ``nogil`` loop
per ``put`` or ``get`` does what redis-benchmark's C loop does: build chunk ``i + 1`` while the
server works on chunk ``i``, wait for chunk ``i``'s replies, send chunk ``i + 1``, then check
chunk ``i``'s replies (at most one chunk in flight, as with ``-P``). It calls libc's ``send``,
``recv``, ``poll`` and ``setsockopt`` directly (declared as external symbols, so numba's disk
cache keeps working). Each wait sets ``SO_RCVLOWAT`` to the fewest bytes the replies can still
take (:func:`kvstore.wire.scan`'s ``need``), so the reader wakes about once per chunk instead
of once per piece the server writes.

Plain TCP and Unix sockets only (a TLS socket's bytes are not the protocol's); Linux only
(``__errno_location``, ``MSG_NOSIGNAL``). Replies the scanner does not recognise (an OOM error,
a value of another size) stop the loop with :data:`FALLBACK` before the next chunk is sent:
the caller parses that chunk with hiredis and calls again from the next chunk.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba.core import types

from kvstore.wire import (
    SCAN_DONE,
    SCAN_EXTRA,
    SCAN_INCOMPLETE,
    scan,
    verify_pages,
    write_mget,
    write_sets,
)

_i32, _i64, _u64 = types.int32, types.int64, types.uint64
_send = types.ExternalFunction("send", _i64(_i32, _u64, _u64, _i32))
_recv = types.ExternalFunction("recv", _i64(_i32, _u64, _u64, _i32))
_poll = types.ExternalFunction("poll", _i32(_u64, _u64, _i32))
_setsockopt = types.ExternalFunction("setsockopt", _i32(_i32, _i32, _i32, _u64, types.uint32))
_errno = types.ExternalFunction("__errno_location", types.CPointer(_i32)())

DONE, FALLBACK, TIMEOUT, CLOSED, FAILED, EXTRA = 0, 1, 2, 3, 4, 5
"""Loop results. ``state = [chunk, bytes received, errno]`` says where it stopped."""
_EINTR, _EAGAIN = 4, 11
_POLLIN, _POLLOUT = 1, 4
_MSG_NOSIGNAL = 0x4000
_SOL_SOCKET, _SO_RCVLOWAT = 1, 18

_jit = nb.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _wait(fd: int, events: int, timeout_ms: int, pfd: np.ndarray) -> int:
    """``poll`` one descriptor (``pfd``: one ``struct pollfd`` as an int64) until ready."""
    pfd[0] = np.int64(fd) | (np.int64(events) << 32)
    while True:
        ready = _poll(pfd.ctypes.data, 1, timeout_ms)
        if ready > 0:
            return DONE
        if ready == 0:
            return TIMEOUT
        if _errno()[0] != _EINTR:
            return FAILED


@_jit
def _send_all(fd: int, buf: np.ndarray, size: int, timeout_ms: int, pfd: np.ndarray,
              state: np.ndarray) -> int:
    sent = 0
    while sent < size:
        n = _send(fd, buf.ctypes.data + sent, size - sent, _MSG_NOSIGNAL)
        if n >= 0:
            sent += n
            continue
        err = _errno()[0]
        if err == _EAGAIN:  # socket buffer full: wait until it drains
            status = _wait(fd, _POLLOUT, timeout_ms, pfd)
            if status != DONE:
                return status
        elif err != _EINTR:
            state[2] = err
            return FAILED
    return DONE


@_jit
def _low_water(fd: int, size: int, lowat: bool, opt: np.ndarray) -> None:
    """``SO_RCVLOWAT = size`` (kept in ``opt[0]`` to skip repeats); plain TCP only."""
    if lowat and opt[0] != size:
        opt[0] = size
        _setsockopt(fd, _SOL_SOCKET, _SO_RCVLOWAT, opt.ctypes.data, 4)


@_jit
def _receive(fd: int, buf: np.ndarray, replies: int, least: int, timeout_ms: int, lowat: bool,
             pfd: np.ndarray, opt: np.ndarray, starts: np.ndarray, lens: np.ndarray,
             state: np.ndarray) -> tuple[int, int]:
    """Receive ``replies`` replies into ``buf``: ``(status, elements)``; ``state[1]`` = bytes.

    ``least``: the fewest bytes they can take. :data:`FALLBACK` when they are not the shape
    :func:`kvstore.wire.scan` knows or do not fit ``buf``.
    """
    got, need = 0, least
    while True:
        _low_water(fd, max(1, min(need, buf.size - got)), lowat, opt)
        status = _wait(fd, _POLLIN, timeout_ms, pfd)
        if status != DONE:
            return status, 0
        n = _recv(fd, buf.ctypes.data + got, buf.size - got, 0)
        if n == 0:
            return CLOSED, 0
        if n < 0:
            err = _errno()[0]
            if err == _EAGAIN or err == _EINTR:
                continue
            state[2] = err
            return FAILED, 0
        got += n
        state[1] = got
        status, count, need = scan(buf, got, replies, starts, lens)
        if status == SCAN_DONE:
            return DONE, count
        if status != SCAN_INCOMPLETE:
            return (EXTRA if status == SCAN_EXTRA else FALLBACK), 0
        if got == buf.size:
            return FALLBACK, 0


@_jit
def put_chunks(fd: int, timeout_ms: int, lowat: bool, first: int, n: int, depth: int,
               sbuf: np.ndarray, rbuf: np.ndarray, starts: np.ndarray, lens: np.ndarray,
               state: np.ndarray, stored: np.ndarray, enc: tuple) -> int:
    """Pipelined ``SET`` of rows ``[first * depth, n)``, ``depth`` per round trip.

    ``enc``: :func:`kvstore.wire.write_sets`' arguments after ``lo, hi``. ``stored[row]`` is set
    for every ``+OK``. Returns a loop result; ``state[0]`` is the chunk it stopped at.
    """
    pfd, opt = np.zeros(1, np.int64), np.zeros(1, np.int32)
    chunks = (n + depth - 1) // depth
    lo = first * depth
    size = write_sets(sbuf, lo, min(n, lo + depth), *enc)
    status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
    for i in range(first, chunks):
        if status != DONE:
            break
        state[0] = i
        lo, hi = i * depth, min(n, (i + 1) * depth)
        size = write_sets(sbuf, hi, min(n, hi + depth), *enc) if hi < n else 0
        status = _receive(fd, rbuf, hi - lo, 5 * (hi - lo), timeout_ms, lowat, pfd, opt,
                          starts, lens, state)[0]  # "+OK\r\n" each; an error is longer
        if status == DONE and size:
            status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
        if status == DONE:
            stored[lo:hi] = True
    _low_water(fd, 1, lowat, opt)  # give the socket back as found (redis-py reads it next)
    return status


@_jit
def get_chunks(fd: int, timeout_ms: int, lowat: bool, first: int, n: int, depth: int,
               sbuf: np.ndarray, rbuf: np.ndarray, starts: np.ndarray, lens: np.ndarray,
               state: np.ndarray, keys: tuple, check: tuple) -> int:
    """One ``MGET`` per ``depth`` rows of ``[first * depth, n)``, each reply verified.

    ``keys``: :func:`kvstore.wire.write_mget`'s arguments after ``lo, hi``; ``check``:
    :func:`kvstore.wire.verify_pages`' after ``row0`` (``want, weights, out, out_words, ok,
    corrupt``). Returns a loop result; ``state[0]`` is the chunk it stopped at.
    """
    pfd, opt = np.zeros(1, np.int64), np.zeros(1, np.int32)
    chunks = (n + depth - 1) // depth
    lo = first * depth
    size = write_mget(sbuf, lo, min(n, lo + depth), *keys)
    status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
    for i in range(first, chunks):
        if status != DONE:
            break
        state[0] = i
        lo, hi = i * depth, min(n, (i + 1) * depth)
        size = write_mget(sbuf, hi, min(n, hi + depth), *keys) if hi < n else 0
        status, count = _receive(fd, rbuf, 1, 4 + 3 * (hi - lo), timeout_ms, lowat, pfd, opt,
                                 starts, lens, state)  # "*<n>\r\n" and a nil ("_\r\n") each
        if status == DONE and size:
            status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
        if status == DONE:
            verify_pages(rbuf, starts, lens, count, lo, *check)
    _low_water(fd, 1, lowat, opt)
    return status
