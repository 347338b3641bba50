"""RESP framing for the Redis tier, built and checked with numpy over whole chunks.

Why not a per-page loop: at redis-benchmark's rate a page has a few microseconds of client time
in total, and a Python f-string, an ``encode()``, a list append and a parsed reply object per
page already spend most of it. Here a batch's key names are laid out as fixed-width byte tables
(one per combination of head / page digit counts, so usually one to four tables), commands are
written row by row into one buffer with numpy slicing, and replies whose shape is known in
advance (``+OK`` per ``SET``, one bulk string of the page size per ``MGET`` key) are received
straight into a buffer and checked with vectorized compares. Anything else -- a miss, an error
reply, a value of another size -- falls back to hiredis for that chunk, so the fast path only
ever has to recognise the common case, never to parse RESP in general.

Key text is ``{fingerprint}:{prefix hex}:{layer}:{head}:{page}``, byte for byte what
``RedisTier.key_names`` formats.
"""

from __future__ import annotations

import functools
import itertools
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import hiredis
import numpy as np
import redis

Rows = slice | np.ndarray  # which original batch rows a run of sorted rows maps to


_POW10 = 10 ** np.arange(19, dtype=np.int64)  # 1, 10, ..., 10**18


def decimal_widths(x: np.ndarray) -> np.ndarray:
    """Characters of ``str(x)`` for each int64 (the sign included)."""
    digits = np.searchsorted(_POW10[1:], np.abs(x), side="right") + 1
    return digits + (x < 0)


def write_decimal(dst: np.ndarray, x: np.ndarray) -> None:
    """Write ``str(x)`` of each row into ``dst [m, w]`` (every value exactly ``w`` characters)."""
    pows = _POW10[min(dst.shape[1], len(_POW10)) - 1 :: -1]
    dst[:, : dst.shape[1] - len(pows)] = ord("0")  # only a 20-character "-9..." gets here
    dst[:, dst.shape[1] - len(pows) :] = np.abs(x)[:, None] // pows % 10 + 48
    negative = x < 0
    if bool(negative.any()):
        dst[negative, 0] = ord("-")


class Scratch(threading.local):
    """Per-thread reusable byte buffers (a tier is called from several threads at once)."""

    def get(self, name: str, size: int) -> np.ndarray:
        buf = self.__dict__.get(name)
        if buf is None or buf.size < size:
            buf = self.__dict__[name] = np.empty(max(size, 1 << 16), dtype=np.uint8)
        return buf[:size]


@dataclass(frozen=True)
class KeyGroup:
    """Sorted rows ``[start, stop)`` whose key names all have ``head_w`` / ``page_w`` digits."""

    start: int
    stop: int
    head_w: int
    page_w: int
    key_len: int


class KeyPlan:
    """The key names of one batch as fixed-width byte tables, rows sorted by key width.

    Commands go out in sorted order (``order[i]`` is the batch row of sorted row ``i``); the
    sort is stable, so two writes of one key keep their order. When the batch is already sorted
    (the usual case: page indices ascend) rows map to slices and nothing is gathered.
    """

    def __init__(self, fingerprint: str, layer: int, prefix: np.ndarray, heads: np.ndarray,
                 pages: np.ndarray) -> None:
        self.stem = np.frombuffer(f"{fingerprint}:".encode(), dtype=np.uint8)
        self.mid = np.frombuffer(f":{layer}:".encode(), dtype=np.uint8)
        self.prefix = np.ascontiguousarray(prefix, dtype="<i8").view(np.uint8).reshape(-1, 16)
        self.heads, self.pages = heads, pages
        head_w, page_w = decimal_widths(heads), decimal_widths(pages)
        group_id = head_w * 32 + page_w
        self.order = np.argsort(group_id, kind="stable")
        self.identity = bool((self.order == np.arange(len(heads))).all())
        ordered = group_id[self.order]
        starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(heads) else []
        bounds = [*map(int, starts), len(heads)]
        fixed = len(self.stem) + 32 + len(self.mid) + 1
        self.groups = []
        for a, b in itertools.pairwise(bounds):
            hw, pw = int(head_w[self.order[a]]), int(page_w[self.order[a]])
            self.groups.append(KeyGroup(a, b, hw, pw, fixed + hw + pw))

    def rows(self, lo: int, hi: int) -> Rows:
        """Batch rows of sorted rows ``[lo, hi)``: a slice when the batch was already sorted."""
        return slice(lo, hi) if self.identity else self.order[lo:hi]

    def segments(self, lo: int, hi: int) -> Iterator[tuple[int, int, KeyGroup]]:
        """``(a, b, group)`` runs of sorted rows ``[lo, hi)`` that share one key width."""
        for g in self.groups:
            a, b = max(lo, g.start), min(hi, g.stop)
            if a < b:
                yield a, b, g

    def write_keys(self, dst: np.ndarray, rows: Rows, group: KeyGroup) -> None:
        """Key names of ``rows`` into ``dst [m, group.key_len]``."""
        c = len(self.stem)
        dst[:, :c] = self.stem
        hexed = self.prefix[rows].tobytes().hex().encode()  # C speed, one call per group
        dst[:, c : c + 32] = np.frombuffer(hexed, dtype=np.uint8).reshape(-1, 32)
        c += 32
        dst[:, c : c + len(self.mid)] = self.mid
        c += len(self.mid)
        write_decimal(dst[:, c : c + group.head_w], self.heads[rows])
        c += group.head_w
        dst[:, c] = ord(":")
        write_decimal(dst[:, c + 1 :], self.pages[rows])


def build_rows(plan: KeyPlan, lo: int, hi: int, head: Callable[[int], bytes], mid: bytes,
               width: int, fill: Callable[[np.ndarray, Rows], None] | None,
               end: bytes, scratch: Scratch | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One command (or argument) per sorted row in ``[lo, hi)``, concatenated; and the end
    offset of each row in that buffer.

    Row layout: ``head(key_len) | key | mid | width bytes written by fill(dst, rows) | end``.
    The buffer comes from ``scratch`` when given (reused: fresh pages cost a fault each).
    """
    segs = list(plan.segments(lo, hi))
    strides = [len(head(g.key_len)) + g.key_len + len(mid) + width + len(end) for _, _, g in segs]
    size = sum((b - a) * s for (a, b, _), s in zip(segs, strides))
    out = np.empty(size, dtype=np.uint8) if scratch is None else scratch.get("send", size)
    ends = np.zeros(hi - lo, dtype=np.int64)
    off = 0
    for (a, b, g), stride in zip(segs, strides):
        ends[a - lo : b - lo] = off + stride * np.arange(1, b - a + 1)
        rows_view = out[off : off + (b - a) * stride].reshape(b - a, stride)
        off += (b - a) * stride
        rows = plan.rows(a, b)
        h = np.frombuffer(head(g.key_len), dtype=np.uint8)
        pre = np.empty((b - a, len(h) + g.key_len + len(mid)), dtype=np.uint8)  # one strided
        pre[:, : len(h)] = h  # copy below instead of one per piece
        plan.write_keys(pre[:, len(h) : len(h) + g.key_len], rows, g)
        pre[:, len(h) + g.key_len :] = np.frombuffer(mid, dtype=np.uint8)
        rows_view[:, : pre.shape[1]] = pre
        c = pre.shape[1]
        if fill is not None:
            fill(rows_view[:, c : c + width], rows)
        c += width
        rows_view[:, c:] = np.frombuffer(end, dtype=np.uint8)
    return out, ends


class Chunks:
    """Commands for sorted rows, built ``span`` rows at a time and served ``depth`` at a time.

    Building a few hundred rows per numpy call amortises the call overhead (a 64-row chunk
    alone would spend more on overhead than on bytes), while building lazily still lets the
    encoding of later rows overlap the server's work on earlier chunks.
    """

    def __init__(self, n: int, depth: int, build: Callable[[int, int], tuple[np.ndarray,
                 np.ndarray]], span: int = 256) -> None:
        self.n, self.depth, self.build = n, depth, build
        self.span = depth * max(1, span // depth)
        self.lo, self.buf, self.ends = -1, np.empty(0, np.uint8), np.empty(0, np.int64)

    def __len__(self) -> int:
        return (self.n + self.depth - 1) // self.depth

    def rows(self, i: int) -> tuple[int, int]:
        """Sorted rows ``[lo, hi)`` of chunk ``i``."""
        return i * self.depth, min(self.n, (i + 1) * self.depth)

    def __getitem__(self, i: int) -> memoryview:
        lo, hi = self.rows(i)
        start = lo - lo % self.span
        if start != self.lo:
            self.buf, self.ends = self.build(start, min(self.n, start + self.span))
            self.lo = start
        a = int(self.ends[lo - start - 1]) if lo > start else 0
        return memoryview(self.buf)[a : int(self.ends[hi - start - 1])]


class Shape:
    """A reply of known shape: ``head`` then ``count`` elements ``frame | body bytes | tail``.

    ``fixed`` holds the whole reply when it has no variable bytes (``+OK`` replies), so the
    check is one byte-string compare.
    """

    def __init__(self, head: bytes, frame: bytes, body: int, tail: bytes, count: int) -> None:
        self.head, self.frame, self.body, self.tail, self.count = head, frame, body, tail, count
        self.stride = len(frame) + body + len(tail)
        self.size = len(head) + count * self.stride
        self.fixed = head + frame * count if body == 0 and not tail else None
        self.frame_arr = np.frombuffer(frame, dtype=np.uint8)
        self.tail_arr = np.frombuffer(tail, dtype=np.uint8)


@functools.lru_cache(maxsize=64)
def ok_replies(count: int) -> Shape:
    """``count`` pipelined ``SET`` replies that all say ``+OK``."""
    return Shape(b"", b"+OK\r\n", 0, b"", count)


@functools.lru_cache(maxsize=64)
def full_mget(count: int, value_bytes: int) -> Shape:
    """An ``MGET`` reply in which every one of ``count`` keys holds ``value_bytes`` bytes."""
    return Shape(b"*%d\r\n" % count, b"$%d\r\n" % value_bytes, value_bytes, b"\r\n", count)


class ReplyReader:
    """Receives replies of one connection into a reusable buffer (no object per element)."""

    def __init__(self, sock: socket.socket, size: int, scratch: Scratch | None = None) -> None:
        self.sock, self.scratch = sock, scratch or Scratch()
        self.buf = self.scratch.get("recv", size)

    def read(self, shape: Shape, replies: int) -> np.ndarray | list:
        """The elements' bodies ``[count, body]`` (a view, valid until the next read) when the
        reply has exactly ``shape``; otherwise the ``replies`` parsed replies from hiredis (error
        replies as exception values)."""
        if self.buf.size < shape.size:
            self.buf = self.scratch.get("recv", shape.size)
        view, got, checked, total = memoryview(self.buf), 0, 0, shape.size
        while got < total:
            size = self.sock.recv_into(view[got:total])
            if not size:
                raise redis.ConnectionError("Redis closed the connection")
            got += size
            if got < total and (got < 2 or self.buf[got - 1] != 10 or self.buf[got - 2] != 13):
                continue  # every complete reply ends in CRLF: more is on the way, check later
            checked, fits = self._check(shape, got, checked)
            if not fits:
                return self._slow(got, replies)
        body = self.buf[len(shape.head) : total].reshape(shape.count, shape.stride)
        return body[:, len(shape.frame) : len(shape.frame) + shape.body]

    def _check(self, shape: Shape, got: int, checked: int) -> tuple[int, bool]:
        """Compare the framing bytes received so far with ``shape``: ``(bytes checked, ok)``.

        Every element completed since the last call is checked, and so is the framing of the
        partial element at the end, so a shorter reply (a nil, an error) is noticed as soon as
        it could have ended -- never waited for. (:meth:`read` calls this only when the bytes so
        far end in CRLF, as any complete reply does, and once the expected size has arrived.)
        """
        buf, hl, stride = self.buf, len(shape.head), shape.stride
        if shape.fixed is not None:
            return got, bytes(buf[checked:got]) == shape.fixed[checked:got]
        if got <= hl:
            return 0, bytes(buf[:got]) == shape.head[:got]
        if checked < hl:
            if bytes(buf[:hl]) != shape.head:
                return checked, False
            checked = hl
        done = hl + (got - hl) // stride * stride
        if done > checked:
            elems = buf[checked:done].reshape(-1, stride)
            if not (elems[:, : len(shape.frame)] == shape.frame_arr).all():
                return checked, False
            if shape.tail and not (elems[:, stride - len(shape.tail) :] == shape.tail_arr).all():
                return checked, False
        part = bytes(buf[done:got])
        framed = len(shape.frame) + shape.body
        if part[: len(shape.frame)] != shape.frame[: len(part)]:
            return done, False
        if len(part) > framed and part[framed:] != shape.tail[: len(part) - framed]:
            return done, False
        return done, True

    def _slow(self, got: int, replies: int) -> list:
        """Hand what arrived to hiredis and read the rest of the ``replies`` replies with it."""
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
