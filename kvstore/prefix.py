"""Content addresses for pages: chained hashes of the token prefix.

Page i's hash covers every token up to the end of page i (it folds in page i-1's hash), so two
sequences share page i's hash exactly when their first ``(i + 1) * page_size`` tokens agree --
the condition under which their K/V for that page are identical. This is what makes a page
written by one replica safe to serve to another. Only full pages get a hash: a partial page's
content still changes.

Hashes are 128-bit BLAKE2b digests carried as two int64 words so batches stay tensors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch


def prefix_hashes(
    token_ids: Sequence[int] | torch.Tensor, page_size: int, salt: bytes = b""
) -> torch.Tensor:
    """``[full_pages, 2]`` int64 chained hashes of ``token_ids``.

    ``salt`` separates contexts that change K/V for the same tokens (a LoRA adapter, a
    multimodal input hash); the model itself is separated by the store's fingerprint.
    """
    if page_size <= 0:
        raise ValueError(f"page_size must be positive, got {page_size}")
    tokens = torch.as_tensor(token_ids, dtype=torch.int64).flatten().numpy()
    full = len(tokens) // page_size
    out = np.empty((full, 16), dtype=np.uint8)
    parent = hashlib.blake2b(salt, digest_size=16).digest()
    for i in range(full):
        chunk = tokens[i * page_size : (i + 1) * page_size].tobytes()
        parent = hashlib.blake2b(parent + chunk, digest_size=16).digest()
        out[i] = np.frombuffer(parent, dtype=np.uint8)
    return torch.from_numpy(out.view(np.int64).copy())


def hashes_from_bytes(digests: Sequence[bytes]) -> torch.Tensor:
    """``[n, 2]`` int64 from hash digests of at least 16 bytes (e.g. vLLM's block hashes)."""
    if any(len(d) < 16 for d in digests):
        raise ValueError("each digest needs at least 16 bytes for a 128-bit page address")
    raw = b"".join(bytes(d[:16]) for d in digests)
    return torch.from_numpy(np.frombuffer(raw, dtype=np.int64).reshape(-1, 2).copy())


def prefix_hex(prefix: torch.Tensor) -> list[str]:
    """32-character hex strings of ``[n, 2]`` int64 hashes (the form used in Redis keys)."""
    text = prefix.to(torch.int64).contiguous().numpy().tobytes().hex()
    return [text[i : i + 32] for i in range(0, len(text), 32)]
