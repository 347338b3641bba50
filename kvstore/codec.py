"""Binary page format for shared tiers: a versioned header plus raw bytes, never pickle.

One Redis value holds one page: ``HEADER`` (80 bytes, little-endian) then the K and V payload
``[2, P, D]`` as raw bytes. Header and payload travel in the *same* value on purpose: a Redis
``SET`` replaces a value atomically, so two writers of one page leave one complete version and a
reader can never see a header from one write and a payload from another.

The header names everything needed to refuse a wrong page: model fingerprint, layer, head, page
index and prefix hash (the reader compares them with the key it asked for), dtype and shape (a
replica with other geometry must not reinterpret bytes), and a checksum over header and payload
(bit rot, truncated or foreign values).

The checksum is a multilinear hash: the value read as little-endian uint64 words ``w_i``, summed
as ``sum_i w_i * c_i mod 2**64`` with fixed odd constants ``c_i`` (the checksum word itself has
weight 0). An odd constant is invertible mod 2**64, so *any* change confined to one word is
always caught; changes spread over several words slip through with probability about 2**-64.
Unlike a per-page CRC call it is one numpy expression over the whole batch, which is what keeps
the Redis tier's client cost near redis-benchmark's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from kvhead.core.spec import HeadPageSpec
from kvstore.base import PageKeys

MAGIC = b"KVHP"
VERSION = 1
HEADER = np.dtype(
    [
        ("magic", "S4"),
        ("version", "<u2"),
        ("dtype", "u1"),
        ("rank", "u1"),
        ("shape", "<u4", (3,)),
        ("fingerprint", "S16"),
        ("layer", "<u4"),
        ("head", "<u4"),
        ("page", "<i8"),
        ("prefix", "<i8", (2,)),
        ("payload_bytes", "<u4"),
        ("checksum", "<u8"),
    ]
)
HEADER_BYTES = HEADER.itemsize
_CHECKED = HEADER.fields["checksum"][1]  # header bytes before the checksum
_CHECKSUM_WORD = _CHECKED // 8

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bfloat16: 1,
    torch.float16: 2,
    torch.float32: 3,
    torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5,
    torch.int8: 6,
    torch.uint8: 7,
}


def checksum_weights(words: int) -> np.ndarray:
    """Fixed odd uint64 constants (splitmix64 of the word index): part of the format, version 1."""
    x = np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    x |= np.uint64(1)
    x[_CHECKSUM_WORD] = 0
    return x


@dataclass(frozen=True)
class Decoded:
    """A decoded batch: ``pages [n, 2, P, D]`` (zero where not ok), ``ok [n]``, ``corrupt [n]``."""

    pages: torch.Tensor
    ok: torch.Tensor
    corrupt: torch.Tensor


class PageCodec:
    """Encodes and verifies pages of one geometry for one model fingerprint."""

    def __init__(self, spec: HeadPageSpec, fingerprint: str) -> None:
        if spec.dtype not in DTYPE_CODES:
            raise ValueError(f"no page codec for dtype {spec.dtype}")
        fp = fingerprint.encode()
        if not 0 < len(fp) <= 16:
            raise ValueError(f"model fingerprint must be 1..16 ASCII bytes, got {fingerprint!r}")
        self.spec, self.fingerprint = spec, fingerprint
        self.payload_bytes = spec.head_page_bytes
        if self.payload_bytes % 8:
            raise ValueError(
                f"page payload must be a multiple of 8 bytes, got {self.payload_bytes}"
            )
        self.value_bytes = HEADER_BYTES + self.payload_bytes
        self._weights = checksum_weights(self.value_bytes // 8)
        self._template = np.zeros((), dtype=HEADER)
        self._template["magic"] = MAGIC
        self._template["version"] = VERSION
        self._template["dtype"] = DTYPE_CODES[spec.dtype]
        self._template["rank"] = 3
        self._template["shape"] = (2, spec.page_size, spec.head_dim)
        self._template["fingerprint"] = fp
        self._template["payload_bytes"] = self.payload_bytes

    @property
    def weights(self) -> np.ndarray:
        """``[value_bytes / 8]`` uint64 checksum weights (part of the format)."""
        return self._weights

    def template(self, layer: int) -> np.ndarray:
        """``[80]`` uint8 header of ``layer``'s pages with head, page, prefix and checksum zero:
        the part of every header that is the same for a whole batch."""
        zero = np.zeros(1, dtype=np.int64)
        return self._headers(layer, zero, zero, np.zeros((1, 2), np.int64)).view(np.uint8).copy()

    def _headers(
        self, layer: int, heads: np.ndarray, pages: np.ndarray, prefix: np.ndarray
    ) -> np.ndarray:
        """Headers of one batch (checksum 0), built with numpy only (no torch threads)."""
        headers = np.repeat(self._template[None], len(heads))
        headers["layer"] = layer
        headers["head"] = heads
        headers["page"] = pages
        headers["prefix"] = prefix
        return headers

    def expected(self, keys: PageKeys) -> np.ndarray:
        """``[n, 72]`` uint8: the header bytes (all but the checksum) a valid page must carry."""
        if keys.prefix is None or keys.pages is None:
            raise ValueError("shared tiers need content-addressed keys (prefix and pages)")
        headers = self._headers(
            keys.layer, keys.heads.numpy(), keys.pages.numpy(), keys.prefix.numpy()
        )
        return headers.view(np.uint8).reshape(len(keys), HEADER_BYTES)[:, :_CHECKED]

    def encode(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> list[memoryview]:
        """One value per page (zero-copy views into one buffer)."""
        if keys.prefix is None or keys.pages is None:
            raise ValueError("shared tiers need content-addressed keys (prefix and pages)")
        n = len(keys)
        buf = np.empty((n, self.value_bytes), dtype=np.uint8)
        self.encode_into(
            buf,
            keys.layer,
            keys.heads.numpy(),
            keys.pages.numpy(),
            keys.prefix.numpy(),
            page_bytes(k),
            page_bytes(v),
        )
        view, size = memoryview(buf).cast("B"), self.value_bytes
        return [view[i * size : (i + 1) * size] for i in range(n)]

    def encode_into(
        self,
        dst: np.ndarray,
        layer: int,
        heads: np.ndarray,
        pages: np.ndarray,
        prefix: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
    ) -> None:
        """Write the values of ``m`` pages into ``dst [m, value_bytes]`` (rows may be strided,
        e.g. the value slots of a RESP command buffer). ``k``, ``v``: ``[m, payload / 2]`` uint8.

        The checksum is summed from the header, K and V pieces where they already are, so the
        payload is read once for the sum and copied once, straight into ``dst``.
        """
        headers = self._headers(layer, heads, pages, prefix)
        raw = headers.view(np.uint8).reshape(len(heads), HEADER_BYTES)
        half = self.payload_bytes // 2
        if half % 8 == 0:
            hw = HEADER_BYTES // 8
            kw = half // 8
            sums = _dot(raw.view("<u8"), self._weights[:hw])
            sums += _dot(k.view("<u8"), self._weights[hw : hw + kw])
            sums += _dot(v.view("<u8"), self._weights[hw + kw :])
        else:
            sums = self._checksum(np.concatenate([raw, k, v], axis=1))
        headers["checksum"] = sums
        dst[:, :HEADER_BYTES] = raw
        dst[:, HEADER_BYTES : HEADER_BYTES + half] = k
        dst[:, HEADER_BYTES + half :] = v

    def _checksum(self, values: np.ndarray) -> np.ndarray:
        """``[n]`` uint64 checksums of ``[n, value_bytes]`` uint8 values (see module docstring)."""
        return _dot(values.view("<u8"), self._weights)

    def decode(self, keys: PageKeys, values: list[bytes | None]) -> Decoded:
        """Verify values read for ``keys``; anything that does not match exactly is corrupt."""
        out = np.empty((len(keys), self.payload_bytes), dtype=np.uint8)
        ok, corrupt = self.decode_into(values, self.expected(keys), out, slice(0, len(keys)))
        return self.finish(out, ok, corrupt)

    def decode_into(
        self,
        values: list[bytes | None],
        want: np.ndarray,
        out: np.ndarray,
        rows: slice | np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Check ``values`` (``None`` = missing) against ``want`` and copy good payloads to
        ``out[rows]``. Returns ``(ok, corrupt)`` over ``values``; rows of ``out`` that are not
        ok are left as they were (:meth:`finish` zeroes them)."""
        m, size = len(values), self.value_bytes
        ok, corrupt = np.zeros(m, dtype=bool), np.zeros(m, dtype=bool)
        sized = [i for i, v in enumerate(values) if v is not None and len(v) == size]
        if len(sized) < m:
            corrupt[[i for i, v in enumerate(values) if v is not None and len(v) != size]] = True
        if not sized:
            return ok, corrupt
        arr = np.frombuffer(
            b"".join(values[i] for i in sized),  # type: ignore[misc]
            dtype=np.uint8,
        ).reshape(len(sized), size)
        idx = np.asarray(sized, dtype=np.int64)
        targets = rows if len(sized) == m else np.arange(len(out))[rows][idx]
        good = self.verify_into(arr, want[idx], out, targets)
        ok[idx[good]] = True
        corrupt[idx[~good]] = True
        return ok, corrupt

    def verify_into(
        self, values: np.ndarray, want: np.ndarray, out: np.ndarray, rows: slice | np.ndarray
    ) -> np.ndarray:
        """Check ``values [m, value_bytes]`` (any row stride or alignment, e.g. a view into a
        receive buffer) against ``want [m, 72]``; copy payloads to ``out[rows]``. Returns good
        ``[m]``; ``out`` rows of bad values hold garbage until :meth:`finish` zeroes them.

        The payload is copied once (into ``out`` directly when ``rows`` is a slice) and summed
        there, aligned; only the 80-byte headers get a separate small copy.
        """
        direct = isinstance(rows, slice)
        dst = out[rows] if direct else np.empty((len(values), self.payload_bytes), np.uint8)
        dst[:] = values[:, HEADER_BYTES:]
        head = np.ascontiguousarray(values[:, :HEADER_BYTES])
        hw = HEADER_BYTES // 8
        sums = _dot(head.view("<u8"), self._weights[:hw])
        sums += _dot(dst.view("<u8"), self._weights[hw:])
        good = (head[:, :_CHECKED] == want).all(axis=1)
        good &= sums == head.view("<u8")[:, _CHECKSUM_WORD]
        if not direct:
            out[rows[good]] = dst[good]
        return good

    def finish(self, out: np.ndarray, ok: np.ndarray, corrupt: np.ndarray) -> Decoded:
        """Pages tensor from decoded payloads; rows that are not ok become zero."""
        if not bool(ok.all()):
            out[~ok] = 0
        pages = torch.from_numpy(out).view(self.spec.dtype)
        pages = pages.reshape(len(out), 2, self.spec.page_size, self.spec.head_dim)
        return Decoded(pages, torch.from_numpy(ok), torch.from_numpy(corrupt))


def page_bytes(t: torch.Tensor) -> np.ndarray:
    """``[n, P, D]`` tensor as ``[n, P * D * itemsize]`` uint8 without a copy when contiguous."""
    return t.contiguous().view(torch.uint8).reshape(len(t), -1).numpy()


def _dot(words: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``words [n, w] @ weights [w]`` in uint64, wrapping mod 2**64."""
    return np.einsum("ij,j->i", words, weights)
