"""Binary page format for shared tiers: a versioned header plus raw bytes, never pickle.

One Redis value holds one page: ``HEADER`` (76 bytes, little-endian) then the K and V payload
``[2, P, D]`` as raw bytes. Header and payload travel in the *same* value on purpose: a Redis
``SET`` replaces a value atomically, so two writers of one page leave one complete version and a
reader can never see a header from one write and a payload from another.

The header names everything needed to refuse a wrong page: model fingerprint, layer, head, page
index and prefix hash (the reader compares them with the key it asked for), dtype and shape (a
replica with other geometry must not reinterpret bytes), and a CRC32 over header and payload
(bit rot, truncated or foreign values). Batches are encoded and checked with numpy structured
arrays, so the only per-page Python is the CRC call.
"""

from __future__ import annotations

import zlib
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
    ("checksum", "<u4"),
])
HEADER_BYTES = HEADER.itemsize
_CHECKED = HEADER_BYTES - 4  # the checksum covers everything before itself, then the payload

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.bfloat16: 1, torch.float16: 2, torch.float32: 3, torch.float8_e4m3fn: 4,
    torch.float8_e5m2: 5, torch.int8: 6, torch.uint8: 7,
}


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
        self.value_bytes = HEADER_BYTES + self.payload_bytes
        self._template = np.zeros((), dtype=HEADER)
        self._template["magic"] = MAGIC
        self._template["version"] = VERSION
        self._template["dtype"] = DTYPE_CODES[spec.dtype]
        self._template["rank"] = 3
        self._template["shape"] = (2, spec.page_size, spec.head_dim)
        self._template["fingerprint"] = fp
        self._template["payload_bytes"] = self.payload_bytes

    def _headers(self, keys: PageKeys, rows: np.ndarray | None = None) -> np.ndarray:
        """Expected headers of ``keys`` (at ``rows``), built with numpy only (no torch threads)."""
        if keys.prefix is None or keys.pages is None:
            raise ValueError("shared tiers need content-addressed keys (prefix and pages)")
        heads, pages, prefix = keys.heads.numpy(), keys.pages.numpy(), keys.prefix.numpy()
        if rows is not None:
            heads, pages, prefix = heads[rows], pages[rows], prefix[rows]
        headers = np.repeat(self._template[None], len(heads))
        headers["layer"] = keys.layer
        headers["head"] = heads
        headers["page"] = pages
        headers["prefix"] = prefix
        return headers

    def encode(self, keys: PageKeys, k: torch.Tensor, v: torch.Tensor) -> list[memoryview]:
        """One value per page (zero-copy views into one buffer)."""
        n = len(keys)
        buf = np.empty((n, self.value_bytes), dtype=np.uint8)
        buf[:, :HEADER_BYTES] = self._headers(keys).view(np.uint8).reshape(n, HEADER_BYTES)
        half = self.payload_bytes // 2
        buf[:, HEADER_BYTES : HEADER_BYTES + half] = _as_bytes(k, n)
        buf[:, HEADER_BYTES + half :] = _as_bytes(v, n)
        view = memoryview(buf).cast("B")
        size = self.value_bytes
        values = [view[i * size : (i + 1) * size] for i in range(n)]
        sums = np.fromiter(
            (zlib.crc32(v[HEADER_BYTES:], zlib.crc32(v[:_CHECKED])) for v in values),
            dtype="<u4", count=n,
        )
        buf[:, _CHECKED:HEADER_BYTES] = sums.view(np.uint8).reshape(n, 4)
        return values

    def decode(self, keys: PageKeys, values: list[bytes | None]) -> Decoded:
        """Verify values read for ``keys``; anything that does not match exactly is corrupt."""
        n = len(keys)
        p, d = self.spec.page_size, self.spec.head_dim
        ok = torch.zeros(n, dtype=torch.bool)
        corrupt = torch.zeros(n, dtype=torch.bool)
        rows = [i for i, v in enumerate(values) if v is not None]
        sized = [i for i in rows if len(values[i]) == self.value_bytes]  # type: ignore[arg-type]
        corrupt[[i for i in rows if len(values[i]) != self.value_bytes]] = True  # type: ignore[arg-type]
        if not sized:
            return Decoded(torch.zeros((n, 2, p, d), dtype=self.spec.dtype), ok, corrupt)
        raw = b"".join(values[i] for i in sized)  # type: ignore[misc]
        arr = np.frombuffer(raw, dtype=np.uint8).reshape(len(sized), self.value_bytes)
        got = arr[:, :HEADER_BYTES].copy().view(HEADER).reshape(len(sized))
        sized_np = np.asarray(sized, dtype=np.int64)
        want = self._headers(keys, sized_np)
        fields = [f for f in HEADER.names if f != "checksum"]
        good = np.ones(len(sized), dtype=bool)
        for name in fields:
            eq = got[name] == want[name]
            good &= eq.reshape(len(sized), -1).all(axis=1)
        view, size = memoryview(raw), self.value_bytes
        sums = np.fromiter(
            (zlib.crc32(view[o + HEADER_BYTES : o + size], zlib.crc32(view[o : o + _CHECKED]))
             for o in range(0, len(raw), size)),
            dtype="<u4", count=len(sized),
        )
        good &= sums == got["checksum"]
        ok[torch.from_numpy(sized_np[good])] = True
        corrupt[torch.from_numpy(sized_np[~good])] = True
        if bool(good.all()) and len(sized) == n:  # the common case: one copy, no scatter
            flat = arr[:, HEADER_BYTES:].copy()
        else:
            flat = np.zeros((n, self.payload_bytes), dtype=np.uint8)
            flat[sized_np[good]] = arr[good, HEADER_BYTES:]
        pages = torch.from_numpy(flat).view(self.spec.dtype).reshape(n, 2, p, d)
        return Decoded(pages, ok, corrupt)


def _as_bytes(t: torch.Tensor, n: int) -> np.ndarray:
    """``[n, P, D]`` tensor as ``[n, P * D * itemsize]`` uint8 without a copy when contiguous."""
    return t.contiguous().view(torch.uint8).reshape(n, -1).numpy()
