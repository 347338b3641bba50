"""A whole batch of pipelined round trips in one compiled call, on the socket's file descriptor.

Why: after :mod:`kvstore.wire` made encoding and checking cheap, what was left of the tier's
client CPU above redis-benchmark's was the Python around each 64-page chunk -- a dozen calls
per round trip (build, sendall, poll, recv, scan, verify, bookkeeping), each with numpy and
numba dispatch -- and, for reads, copying every payload out of the receive buffer. Here one
``nogil`` loop per ``put`` or ``get`` does what redis-benchmark's C loop does: build chunk
``i + 1`` while the server works on chunk ``i``, wait for chunk ``i``'s replies, send chunk
``i + 1``, then check chunk ``i``'s replies (at most one chunk in flight, as with ``-P``). It
calls libc's ``send``, ``recv``, ``recvmsg``, ``poll`` and ``setsockopt`` directly (declared as
external symbols, so numba's disk cache keeps working). Each wait sets ``SO_RCVLOWAT`` to the
fewest bytes the replies can still take, so the reader sleeps through partial replies. Reads
scatter each payload straight into the caller's result (:func:`_hits_layout`) and fall back to
a plain byte stream at the first byte that is not the all-hits layout.

Plain TCP and Unix sockets only (a TLS socket's bytes are not the protocol's); Linux only
(``__errno_location``, ``MSG_NOSIGNAL``, the ``msghdr`` layout). Replies the scanner does not
recognise (an OOM error, a value too big for the buffer) stop the loop with :data:`FALLBACK`
before the next chunk is sent: the caller parses that chunk with hiredis and calls again from
the next chunk.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba.core import types

from kvstore.wire import (
    SCAN_DONE,
    SCAN_EXTRA,
    SCAN_INCOMPLETE,
    _copy,
    _put_crlf,
    _put_int,
    scan,
    verify_pages,
    write_mget,
    write_sets,
)

# Addresses and sizes travel as int64 (numba turns uint64 + int64 arithmetic into float64).
_i32, _i64 = types.int32, types.int64
_send = types.ExternalFunction("send", _i64(_i32, _i64, _i64, _i32))
_recv = types.ExternalFunction("recv", _i64(_i32, _i64, _i64, _i32))
_recvmsg = types.ExternalFunction("recvmsg", _i64(_i32, _i64, _i32))
_poll = types.ExternalFunction("poll", _i32(_i64, _i64, _i32))
_setsockopt = types.ExternalFunction("setsockopt", _i32(_i32, _i32, _i32, _i64, types.uint32))
_errno = types.ExternalFunction("__errno_location", types.CPointer(_i32)())

DONE, FALLBACK, TIMEOUT, CLOSED, FAILED, EXTRA = 0, 1, 2, 3, 4, 5
"""Loop results. ``state = [chunk, bytes received, errno]`` says where it stopped."""
_DIVERGED = 6  # a reply is not the all-hits layout: read the rest as a plain byte stream
_IOV_MAX = 1024
_EINTR, _EAGAIN = 4, 11
_POLLIN, _POLLOUT = 1, 4
_MSG_NOSIGNAL = 0x4000
_SOL_SOCKET, _SO_RCVLOWAT = 1, 18

_jit = nb.njit(cache=True, nogil=True, boundscheck=False)


@_jit
def _addr(a: np.ndarray) -> int:
    return np.int64(a.ctypes.data)


@_jit
def _wait(fd: int, events: int, timeout_ms: int, pfd: np.ndarray) -> int:
    """``poll`` one descriptor (``pfd``: one ``struct pollfd`` as an int64) until ready."""
    pfd[0] = np.int64(fd) | (np.int64(events) << 32)
    while True:
        ready = _poll(_addr(pfd), 1, timeout_ms)
        if ready > 0:
            return DONE
        if ready == 0:
            return TIMEOUT
        if _errno()[0] != _EINTR:
            return FAILED


@_jit
def _send_all(
    fd: int, buf: np.ndarray, size: int, timeout_ms: int, pfd: np.ndarray, state: np.ndarray
) -> int:
    sent = 0
    while sent < size:
        n = _send(fd, _addr(buf) + sent, size - sent, _MSG_NOSIGNAL)
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
        _setsockopt(fd, _SOL_SOCKET, _SO_RCVLOWAT, _addr(opt), 4)


@_jit
def _receive(
    fd: int,
    buf: np.ndarray,
    got: int,
    replies: int,
    least: int,
    timeout_ms: int,
    lowat: bool,
    pfd: np.ndarray,
    opt: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    state: np.ndarray,
) -> tuple[int, int]:
    """Receive ``replies`` replies into ``buf`` (whose first ``got`` bytes have arrived):
    ``(status, elements)``; ``state[1]`` = bytes in ``buf``.

    ``least``: the fewest bytes they can take. :data:`FALLBACK` when they are not the shape
    :func:`kvstore.wire.scan` knows or do not fit ``buf``.
    """
    need = least
    state[1] = got
    while True:
        if got:
            status, count, need = scan(buf, got, replies, starts, lens)
            if status == SCAN_DONE:
                return DONE, count
            if status != SCAN_INCOMPLETE:
                return (EXTRA if status == SCAN_EXTRA else FALLBACK), 0
            if got == buf.size:
                return FALLBACK, 0
        _low_water(fd, max(1, min(need, buf.size - got)), lowat, opt)
        status = _wait(fd, _POLLIN, timeout_ms, pfd)
        if status != DONE:
            return status, 0
        n = _recv(fd, _addr(buf) + got, buf.size - got, 0)
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


@_jit
def _hits_layout(
    image: np.ndarray,
    frame: np.ndarray,
    mask: np.ndarray,
    iov: np.ndarray,
    heads: np.ndarray,
    out: np.ndarray,
    lo: int,
    m: int,
    header: int,
) -> int:
    """Plan receiving the reply to an ``MGET`` of rows ``[lo, lo + m)`` as if every key held a
    page: framing and headers into ``image``, each payload straight into its row of ``out``
    (``recvmsg`` scatters them; no copy of the payload afterwards). ``frame``/``mask``: the
    framing bytes the reply must then have (``*m``, ``$<value bytes>``, CRLFs; headers are
    left to :func:`kvstore.wire.verify_pages`); ``heads[j]``: where header ``j`` lands in
    ``image``. ``iov[2j]``: the piece of ``image`` before payload ``j``, ``iov[2j + 1]`` the
    payload's row, ``iov[2m]`` the last CRLF. Returns the number of iovecs."""
    payload = out.shape[1]
    frame[0] = 42  # "*"
    off, start = _put_crlf(frame, _put_int(frame, 1, m)), 0
    for j in range(m):
        if j:
            off = _put_crlf(frame, off)
        frame[off] = 36  # "$"
        off = _put_crlf(frame, _put_int(frame, off + 1, header + payload))
        mask[start:off] = 1
        mask[off : off + header] = 0
        heads[j] = off
        off += header
        iov[2 * j, 0], iov[2 * j, 1] = _addr(image) + start, off - start
        iov[2 * j + 1, 0], iov[2 * j + 1, 1] = _addr(out) + (lo + j) * payload, payload
        start = off
    off = _put_crlf(frame, off)
    mask[start:off] = 1
    iov[2 * m, 0], iov[2 * m, 1] = _addr(image) + start, off - start
    return 2 * m + 1


@_jit
def _receive_hits(
    fd: int,
    image: np.ndarray,
    frame: np.ndarray,
    mask: np.ndarray,
    iov: np.ndarray,
    count: int,
    msg: np.ndarray,
    timeout_ms: int,
    lowat: bool,
    pfd: np.ndarray,
    opt: np.ndarray,
    state: np.ndarray,
) -> tuple[int, int, int]:
    """Receive along :func:`_hits_layout`'s ``count`` iovecs: ``(status, iovec, bytes in it)``.

    :data:`_DIVERGED` as soon as a framing byte differs (a miss, a value of another size, an
    error): the bytes so far are then exactly iovecs ``[0, iovec)`` plus that many of the next.
    While a payload is arriving, the rest of it, its CRLF and 3 bytes per element behind it are
    sure to come, so the reader sleeps until then (``SO_RCVLOWAT``).
    """
    c, used, received, checked = 0, 0, 0, 0
    while c < count:
        need = 1
        if c % 2:  # in payload c // 2 of (count - 1) // 2
            need = iov[c, 1] - used + 2 + 3 * ((count - 1) // 2 - 1 - c // 2)
        _low_water(fd, need, lowat, opt)
        status = _wait(fd, _POLLIN, timeout_ms, pfd)
        if status != DONE:
            return status, c, used
        iov[c, 0] += used
        iov[c, 1] -= used
        msg[2], msg[3] = _addr(iov) + 16 * c, min(count - c, _IOV_MAX)
        n = _recvmsg(fd, _addr(msg), 0)
        iov[c, 0] -= used
        iov[c, 1] += used
        if n == 0:
            return CLOSED, c, used
        if n < 0:
            err = _errno()[0]
            if err == _EAGAIN or err == _EINTR:
                continue
            state[2] = err
            return FAILED, c, used
        while n > 0:
            take = min(n, iov[c, 1] - used)
            received += take if c % 2 == 0 else 0
            used += take
            n -= take
            if used == iov[c, 1]:
                c, used = c + 1, 0
        while checked < received:
            if mask[checked] and image[checked] != frame[checked]:
                return _DIVERGED, c, used
            checked += 1
    return DONE, c, used


@_jit
def _linearize(
    image: np.ndarray, iov: np.ndarray, c: int, used: int, out: np.ndarray, lo: int, dst: np.ndarray
) -> int:
    """The bytes :func:`_receive_hits` got before it stopped at iovec ``c``, in order."""
    off = 0
    for k in range(min(c + 1, iov.shape[0])):
        size = iov[k, 1] if k < c else used
        if k % 2:
            _copy(dst, off, out[lo + k // 2], 0, size)
        else:
            _copy(dst, off, image, iov[k, 0] - _addr(image), size)
        off += size
    return off


@_jit
def put_chunks(
    fd: int,
    timeout_ms: int,
    lowat: bool,
    first: int,
    n: int,
    depth: int,
    sbuf: np.ndarray,
    rbuf: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    state: np.ndarray,
    stored: np.ndarray,
    enc: tuple,
) -> int:
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
        status = _receive(
            fd, rbuf, 0, hi - lo, 5 * (hi - lo), timeout_ms, lowat, pfd, opt, starts, lens, state
        )[0]  # "+OK\r\n" each; an error is longer
        if status == DONE and size:
            status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
        if status == DONE:
            stored[lo:hi] = True
    _low_water(fd, 1, lowat, opt)  # give the socket back as found (redis-py reads it next)
    return status


@_jit
def get_chunks(
    fd: int,
    timeout_ms: int,
    lowat: bool,
    first: int,
    n: int,
    depth: int,
    sbuf: np.ndarray,
    rbuf: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    state: np.ndarray,
    image: np.ndarray,
    keys: tuple,
    check: tuple,
) -> int:
    """One ``MGET`` per ``depth`` rows of ``[first * depth, n)``, each reply verified.

    Each reply is first received as if every key held a page (:func:`_hits_layout`: payloads
    land in ``out`` directly, framing and headers in ``image``); at the first byte that says
    otherwise, what arrived is laid out in ``rbuf`` and the rest read and scanned there.
    ``keys``: :func:`kvstore.wire.write_mget`'s arguments after ``lo, hi``; ``check``:
    :func:`kvstore.wire.verify_pages`' after ``placed`` (``want, weights, out, out_words, ok,
    corrupt``). Returns a loop result; ``state[0]`` is the chunk it stopped at.
    """
    pfd, opt = np.zeros(1, np.int64), np.zeros(1, np.int32)
    out, weights = check[2], check[1]
    header = 8 * weights.shape[0] - out.shape[1]
    frame, mask = np.empty(image.size, np.uint8), np.empty(image.size, np.uint8)
    iov, msg = np.empty((2 * depth + 1, 2), np.int64), np.zeros(7, np.int64)  # struct msghdr
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
        count = _hits_layout(image, frame, mask, iov, starts, out, lo, hi - lo, header)
        status, c, used = _receive_hits(
            fd, image, frame, mask, iov, count, msg, timeout_ms, lowat, pfd, opt, state
        )
        placed = status == DONE
        elements = hi - lo
        if placed:
            lens[:elements] = header + out.shape[1]
        elif status == _DIVERGED:
            got = _linearize(image, iov, c, used, out, lo, rbuf)
            status, elements = _receive(
                fd, rbuf, got, 1, 1, timeout_ms, lowat, pfd, opt, starts, lens, state
            )
        if status == DONE and size:
            status = _send_all(fd, sbuf, size, timeout_ms, pfd, state)
        if status == DONE:
            verify_pages(image if placed else rbuf, starts, lens, elements, lo, placed, *check)
    _low_water(fd, 1, lowat, opt)
    return status
