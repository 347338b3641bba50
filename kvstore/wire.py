"""The Redis tier's per-page loops, compiled with numba: commands out, replies in, one pass each.

Why compiled: at redis-benchmark's rate a page has two to three microseconds of client CPU in
total. Profiling the numpy version showed half of the tier's client time in the Python
interpreter and numpy's per-call dispatch (a few dozen array operations per 64-page chunk), and
most of the rest in touching the payload three times (copy into the command, checksum, copy
out). Here one call builds a whole chunk of ``SET`` or ``MGET`` commands, one call scans a
whole reply's framing, and one call verifies a whole chunk of pages; each page's bytes are read
once into an aligned 8-byte-word scratch (in L1), summed there and copied on. ``nogil`` lets the
write-behind thread and a decode thread build and verify at the same time.

The checksum is exactly :mod:`kvstore.codec`'s (format version 1): ``sum_i w_i * c_i mod 2**64``
over the value's little-endian uint64 words, weights from :func:`kvstore.codec.checksum_weights`.
The codec's numpy code stays the reference (and the path for replies this module does not
recognise); tests check that both produce the same bytes.

Key text is ``{fingerprint}:{prefix hex}:{layer}:{head}:{page}``, byte for byte what
``RedisTier.key_names`` formats.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from numba.core import cgutils, types
from numba.extending import intrinsic

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8).copy()
_MGET = np.frombuffer(b"$4\r\nMGET\r\n", dtype=np.uint8).copy()
_HEAD_FIELD, _PAGE_FIELD, _PREFIX_FIELD = 40, 44, 52  # byte offsets in codec.HEADER
_CHECKED = 72  # header bytes the reader compares with the key it asked for
SCAN_INCOMPLETE, SCAN_DONE, SCAN_OTHER, SCAN_EXTRA = 0, 1, 2, 3

_jit = nb.njit(cache=True, nogil=True, boundscheck=False)


@intrinsic
def _memcpy(typingctx, dst, dst_off, src, src_off, n):  # type: ignore[no-untyped-def]
    """``memcpy(dst.data + dst_off, src.data + src_off, n)`` as LLVM's memcpy intrinsic."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        d = context.make_array(signature.args[0])(context, builder, args[0])
        s = context.make_array(signature.args[2])(context, builder, args[2])
        cgutils.raw_memcpy(
            builder, builder.gep(d.data, [args[1]]), builder.gep(s.data, [args[3]]), args[4], 1
        )
        return context.get_dummy_value()

    return types.void(dst, dst_off, src, src_off, n), codegen


@_jit
def _copy(dst: np.ndarray, dst_off: int, src: np.ndarray, src_off: int, n: int) -> None:
    """``n`` bytes by libc ``memcpy`` (contiguous uint8 arrays), bounds checked.

    numba's own byte loops were not reliably vectorized (slice assignment and offset-indexed
    loops ran at under 1 GB/s, several times slower than the numpy code they replace).
    """
    if dst_off < 0 or src_off < 0 or dst_off + n > dst.shape[0] or src_off + n > src.shape[0]:
        raise IndexError("kvstore.wire: copy out of bounds")
    _memcpy(dst, dst_off, src, src_off, n)


@_jit
def _put(dst: np.ndarray, off: int, src: np.ndarray) -> int:
    _copy(dst, off, src, 0, src.shape[0])
    return off + src.shape[0]


@_jit
def _digits(x: int) -> int:
    """Characters of ``str(x)``."""
    n = 1 if x >= 0 else 2
    x = abs(x)
    while x >= 10:
        x //= 10
        n += 1
    return n


@_jit
def _put_int(dst: np.ndarray, off: int, x: int) -> int:
    end = off + _digits(x)
    if x < 0:
        dst[off] = 45  # "-"
    x = abs(x)
    p = end - 1
    while True:
        dst[p] = 48 + x % 10
        x //= 10
        p -= 1
        if x == 0:
            return end


@_jit
def _key_len(stem: np.ndarray, mid: np.ndarray, head: int, page: int) -> int:
    return stem.shape[0] + 32 + mid.shape[0] + _digits(head) + 1 + _digits(page)


@_jit
def _put_key(
    dst: np.ndarray,
    off: int,
    stem: np.ndarray,
    prefix: np.ndarray,
    mid: np.ndarray,
    head: int,
    page: int,
) -> int:
    """``stem`` is ``{fingerprint}:``, ``mid`` is ``:{layer}:``, ``prefix`` the 16 hash bytes."""
    off = _put(dst, off, stem)
    for j in range(16):
        dst[off] = _HEX[prefix[j] >> 4]
        dst[off + 1] = _HEX[prefix[j] & 15]
        off += 2
    off = _put(dst, off, mid)
    off = _put_int(dst, off, head)
    dst[off] = 58  # ":"
    return _put_int(dst, off + 1, page)


@_jit
def _put_crlf(dst: np.ndarray, off: int) -> int:
    dst[off] = 13
    dst[off + 1] = 10
    return off + 2


@_jit
def _checksum(words: np.ndarray, weights: np.ndarray, first: int) -> np.uint64:
    """``sum_j words[j] * weights[first + j]`` mod 2**64 (the checksum word has weight 0)."""
    s, w = np.uint64(0), weights[first : first + words.shape[0]]
    for j in range(words.shape[0]):
        s += words[j] * w[j]
    return s


@_jit
def write_sets(
    dst: np.ndarray,
    lo: int,
    hi: int,
    stem: np.ndarray,
    mid: np.ndarray,
    prefix: np.ndarray,
    heads: np.ndarray,
    pages: np.ndarray,
    template: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    k_words: np.ndarray,
    v_words: np.ndarray,
    weights: np.ndarray,
    cmd: np.ndarray,
    value_head: np.ndarray,
    tail: np.ndarray,
) -> int:
    """``SET key value …`` commands of rows ``[lo, hi)`` into ``dst``; returns bytes written.

    Per row: ``cmd`` (``*5\\r\\n$3\\r\\nSET\\r\\n$``), the key length, the key,
    ``value_head`` (``\\r\\n$<value bytes>\\r\\n``), the value (``template`` header with head,
    page and prefix filled in and the checksum set, then the payload ``k | v``), ``tail``
    (``\\r\\n`` or the ``PX`` arguments). ``prefix [n, 16]`` uint8; ``k, v [n, *]`` uint8 and
    ``k_words, v_words`` the same bytes as uint64 (``v`` may have no columns: then ``k`` holds the
    whole payload). The checksum is summed where the bytes already are: staging a page in a
    scratch buffer first made the copies several times slower (4 KiB load/store aliasing).
    """
    words = np.empty(template.shape[0] // 8, dtype=np.uint64)
    header = words.view(np.uint8)
    kw = k_words.shape[1]
    off = 0
    for r in range(lo, hi):
        _put(header, 0, template)
        head, page = heads[r], pages[r]
        for b in range(4):
            header[_HEAD_FIELD + b] = (head >> (8 * b)) & 0xFF
        for b in range(8):
            header[_PAGE_FIELD + b] = (page >> (8 * b)) & 0xFF
        _put(header, _PREFIX_FIELD, prefix[r])
        total = _checksum(words, weights, 0)
        total += _checksum(k_words[r], weights, words.shape[0])
        total += _checksum(v_words[r], weights, words.shape[0] + kw)
        words[_CHECKED // 8] = total
        off = _put(dst, off, cmd)
        off = _put_crlf(dst, _put_int(dst, off, _key_len(stem, mid, head, page)))
        off = _put_key(dst, off, stem, prefix[r], mid, head, page)
        off = _put(dst, off, value_head)
        off = _put(dst, _put(dst, _put(dst, off, header), k[r]), v[r])
        off = _put(dst, off, tail)
    return off


@_jit
def write_mget(
    dst: np.ndarray,
    lo: int,
    hi: int,
    stem: np.ndarray,
    mid: np.ndarray,
    prefix: np.ndarray,
    heads: np.ndarray,
    pages: np.ndarray,
) -> int:
    """One ``MGET`` of the keys of rows ``[lo, hi)`` into ``dst``; returns bytes written."""
    dst[0] = 42  # "*"
    off = _put(dst, _put_crlf(dst, _put_int(dst, 1, hi - lo + 1)), _MGET)
    for r in range(lo, hi):
        dst[off] = 36  # "$"
        off = _put_crlf(dst, _put_int(dst, off + 1, _key_len(stem, mid, heads[r], pages[r])))
        off = _put_crlf(dst, _put_key(dst, off, stem, prefix[r], mid, heads[r], pages[r]))
    return off


@_jit
def _line_int(buf: np.ndarray, p: int, end: int) -> tuple[int, int]:
    """The integer of a RESP header line starting at ``p``: ``(value, next)``; ``next`` is -1
    when the line is not complete yet and -2 when it is not a decimal number."""
    neg = p < end and buf[p] == 45
    p += 1 if neg else 0
    value, start = 0, p
    while p < end and buf[p] != 13:
        c = buf[p]
        if c < 48 or c > 57 or p - start > 18:
            return 0, -2
        value = value * 10 + (c - 48)
        p += 1
    if p + 1 >= end:
        return 0, -1
    if buf[p + 1] != 10 or p == start:
        return 0, -2
    return (-value if neg else value), p + 2


@_jit
def _bulk(buf: np.ndarray, p: int, end: int, starts: np.ndarray, lens: np.ndarray, i: int) -> int:
    """Scan one bulk string or nil (``$n``, ``$-1``, RESP3's ``_``) at ``p`` into element
    ``i``: the position after it, which lies beyond ``end`` while its body is still arriving;
    -1 while its header line is incomplete, -2 when it is something else."""
    if p >= end:
        return -1
    if buf[p] == 95:  # "_"
        if p + 3 > end:
            return -1
        if buf[p + 1] != 13 or buf[p + 2] != 10:
            return -2
        starts[i], lens[i] = -1, -1
        return p + 3
    if buf[p] != 36:  # "$"
        return -2
    n, p = _line_int(buf, p + 1, end)
    if p < 0:
        return p
    if n < 0:
        starts[i], lens[i] = -1, -1
        return p if n == -1 else -2
    if p + n + 2 > end:
        return p + n + 2
    if buf[p + n] != 13 or buf[p + n + 1] != 10:
        return -2
    starts[i], lens[i] = p, n
    return p + n + 2


@_jit
def scan(
    buf: np.ndarray, end: int, replies: int, starts: np.ndarray, lens: np.ndarray
) -> tuple[int, int, int]:
    """Framing of ``replies`` replies in ``buf[:end]``: ``(status, elements, need)``.

    Recognised: ``+OK`` (no element), bulk strings and nils, and arrays of those (an ``MGET``
    reply, RESP2 or RESP3), whose offsets and lengths (-1 = nil) go to ``starts``/``lens``.
    ``SCAN_OTHER`` for anything else (an error reply such as OOM, another type, bad framing):
    the caller hands the bytes to hiredis. ``SCAN_EXTRA`` when bytes follow the last reply (a
    protocol violation).

    ``need`` (``SCAN_INCOMPLETE`` only): the fewest bytes still to come if the rest has the
    shape begun -- the rest of a value whose length is known, 3 per array element behind it
    (``_\\r\\n``), 5 per reply not begun; the reader sleeps until that many have arrived
    (``SO_RCVLOWAT``). Every reply Redis sends to ``SET`` (``+OK``, an error with its message)
    or to an ``MGET`` of at least one key is at least that long, so a wait can never stall.
    """
    p, count = 0, 0
    for r in range(replies):
        after = replies - r - 1
        if p >= end:
            return SCAN_INCOMPLETE, count, 5 * (after + 1)
        t = buf[p]
        if t == 43:  # "+"
            if p + 5 > end:
                return SCAN_INCOMPLETE, count, p + 5 - end + 5 * after
            if buf[p + 1] != 79 or buf[p + 2] != 75 or buf[p + 3] != 13 or buf[p + 4] != 10:
                return SCAN_OTHER, count, 0
            p += 5
            continue
        if t == 42:  # "*"
            n, q = _line_int(buf, p + 1, end)
            if q == -1:  # at least its "\r\n" is missing
                return SCAN_INCOMPLETE, count, 1 + 5 * after
            if q < 0 or n < 0:
                return SCAN_OTHER, count, 0
            p = q
        elif t == 36:  # "$": one bulk string, scanned as an array of one
            n = 1
        else:
            return SCAN_OTHER, count, 0
        if count + n > starts.shape[0]:
            return SCAN_OTHER, count, 0
        for e in range(n):
            q = _bulk(buf, p, end, starts, lens, count)
            behind = 3 * (n - e - 1) + 5 * after
            if q == -1:
                return SCAN_INCOMPLETE, count, (3 if p >= end else 1) + behind
            if q < 0:
                return SCAN_OTHER, count, 0
            if q > end:
                return SCAN_INCOMPLETE, count, q - end + behind
            p = q
            count += 1
    return (SCAN_DONE if p == end else SCAN_EXTRA), count, 0


@_jit
def verify_pages(
    buf: np.ndarray,
    starts: np.ndarray,
    lens: np.ndarray,
    count: int,
    row0: int,
    placed: bool,
    want: np.ndarray,
    weights: np.ndarray,
    out: np.ndarray,
    out_words: np.ndarray,
    ok: np.ndarray,
    corrupt: np.ndarray,
) -> None:
    """Check elements ``[0, count)`` of a scanned reply as pages of rows ``row0 + i``.

    A nil is a miss; a value of the wrong size, a header that differs from ``want [n, 9]``
    (uint64 words: the 72 header bytes of the key asked for) or a wrong checksum marks the row
    corrupt; a good page's payload goes to ``out [n, payload]`` (``out_words``: the same rows as
    uint64, summed right after the copy, from L1). ``placed``: the payloads were received
    straight into ``out`` and ``buf`` holds only the headers. Rows that are not ok are left for
    ``PageCodec.finish`` to zero.
    """
    hw = weights.shape[0] - out_words.shape[1]
    words = np.empty(hw, dtype=np.uint64)
    header = words.view(np.uint8)
    hb, pb = header.shape[0], out.shape[1]
    for i in range(count):
        r, n, s = row0 + i, lens[i], starts[i]
        if n == -1:
            continue
        if n != hb + pb:
            corrupt[r] = True
            continue
        _copy(header, 0, buf, s, hb)
        good = True
        for j in range(_CHECKED // 8):
            good &= words[j] == want[r, j]
        if good:
            if not placed:
                _copy(out[r], 0, buf, s + hb, pb)
            total = _checksum(words, weights, 0) + _checksum(out_words[r], weights, hw)
            good = total == words[_CHECKED // 8]
        if good:
            ok[r] = True
        else:
            corrupt[r] = True
