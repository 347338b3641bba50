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

from kvhead.spec import HeadPageSpec
from kvstore.base import PageKeys

MAGIC = b"KVHP"
VERSION = 1
HEADER = np.dtype([
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
])
HEADER_BYTES = HEADER.itemsize
_CHECKED = HEADER.fields["checksum"][1]  # header bytes before the checksum
_CHECKSUM_WORD = _CHECKED // 8

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5, torch.int8: 6, torch.uint8: 7,
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
            raise ValueError(f"page payload must be a multiple of 8 bytes, got {self.payload_bytes}")
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

    def _headers(self, keys: PageKeys) -> np.ndarray:
        """Headers of ``keys`` (checksum 0), built with numpy only (no torch threads)."""
        if keys.prefix is None or keys.pages is None:
            raise ValueError("shared tiers need content-addressed keys (prefix and pages)")
        headers = np.repeat(self._template[None], len(keys))
        headers["layer"] = keys.layer
        headers["head"] = keys.heads.numpy()
        headers["page"] = keys.pages.numpy()
        headers["prefix"] = keys.prefix.numpy()
        return headers

    def expected(self, keys: PageKeys) -> np.ndarray:
        """``[n, 72]`` uint8: the header bytes (all but the checksum) a valid page must carry."""
        raw = self._headers(keys).view(np.uint8).reshape(len(keys), HEADER_BYTES)
        return raw[:, :_CHECKED]

    def encode(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> list[memoryview]:
        """One value per page (zero-copy views into one buffer)."""
        n = len(keys)
        buf = np.empty((n, self.value_bytes), dtype=np.uint8)
        buf[:, :HEADER_BYTES] = self._headers(keys).view(np.uint8).reshape(n, HEADER_BYTES)
        half = self.payload_bytes // 2
        buf[:, HEADER_BYTES : HEADER_BYTES + half] = _as_bytes(k, n)
        buf[:, HEADER_BYTES + half :] = _as_bytes(v, n)
        buf.view(np.uint64)[:, _CHECKSUM_WORD] = self._checksum(buf)
        view, size = memoryview(buf).cast("B"), self.value_bytes
        return [view[i * size : (i + 1) * size] for i in range(n)]

    def _checksum(self, values: np.ndarray) -> np.ndarray:
        """``[n]`` uint64 checksums of ``[n, value_bytes]`` uint8 values (see module docstring)."""
        return np.einsum("ij,j->i", values.view("<u8"), self._weights)  # wraps mod 2**64

    def decode(self, keys: PageKeys, values: list[bytes | None]) -> Decoded:
        """Verify values read for ``keys``; anything that does not match exactly is corrupt."""
        out = np.empty((len(keys), self.payload_bytes), dtype=np.uint8)
        ok, corrupt = self.decode_into(values, self.expected(keys), out)
        return self.finish(out, ok, corrupt)

    def decode_into(self, values: list[bytes | None], want: np.ndarray, out: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Check ``values`` against expected headers ``want`` and copy good payloads to ``out``.

        Returns ``(ok, corrupt)`` bool arrays; rows of ``out`` that are not ok are left as they
        were (:meth:`finish` zeroes them). Works on any slice of a batch, so a reader can verify
        one pipelined chunk while the server works on the next.
        """
        m, size = len(values), self.value_bytes
        ok, corrupt = np.zeros(m, dtype=bool), np.zeros(m, dtype=bool)
        sized = [i for i, v in enumerate(values) if v is not None and len(v) == size]
        if len(sized) < m:
            corrupt[[i for i, v in enumerate(values) if v is not None and len(v) != size]] = True
        if not sized:
            return ok, corrupt
        arr = np.frombuffer(b"".join(values[i] for i in sized),  # type: ignore[misc]
                            dtype=np.uint8).reshape(len(sized), size)
        idx = np.asarray(sized, dtype=np.int64)
        good = (arr[:, :_CHECKED] == want[idx]).all(axis=1)
        good &= self._checksum(arr) == arr[:, _CHECKED:HEADER_BYTES].copy().view("<u8")[:, 0]
        ok[idx[good]] = True
        corrupt[idx[~good]] = True
        if len(sized) == m and bool(good.all()):  # the common case: one copy, no scatter
            out[:] = arr[:, HEADER_BYTES:]
        else:
            out[idx[good]] = arr[good, HEADER_BYTES:]
        return ok, corrupt

    def finish(self, out: np.ndarray, ok: np.ndarray, corrupt: np.ndarray) -> Decoded:
        """Pages tensor from decoded payloads; rows that are not ok become zero."""
        if not bool(ok.all()):
            out[~ok] = 0
        pages = torch.from_numpy(out).view(self.spec.dtype)
        pages = pages.reshape(len(out), 2, self.spec.page_size, self.spec.head_dim)
        return Decoded(pages, torch.from_numpy(ok), torch.from_numpy(corrupt))


def _as_bytes(t: torch.Tensor, n: int) -> np.ndarray:
    """``[n, P, D]`` tensor as ``[n, P * D * itemsize]`` uint8 without a copy when contiguous."""
    return t.contiguous().view(torch.uint8).reshape(n, -1).numpy()
