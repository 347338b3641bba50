"""Binary page codec and prefix hashes: round trip, and every kind of wrong page is refused."""

from __future__ import annotations

import pytest
import torch

from kvhead.core.spec import HeadPageSpec
from kvstore import PageKeys, hashes_from_bytes, prefix_hashes, prefix_hex
from kvstore.codec import HEADER_BYTES, PageCodec

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "0123456789abcdef"


def batch(n: int = 5, layer: int = 2) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    keys = PageKeys(
        layer,
        torch.arange(n),
        torch.arange(n) % 2,
        prefix_hashes(torch.arange(4 * n), 4),
        torch.arange(n),
    )
    return keys, k, v


def test_round_trip_is_bit_exact():
    codec = PageCodec(SPEC, FP)
    keys, k, v = batch()
    values = [bytes(x) for x in codec.encode(keys, k, v)]
    assert all(len(x) == HEADER_BYTES + SPEC.head_page_bytes for x in values)
    out = codec.decode(keys, values)
    assert out.ok.all() and not out.corrupt.any()
    assert torch.equal(out.pages[:, 0], k) and torch.equal(out.pages[:, 1], v)


def test_missing_values_are_misses_not_corruption():
    codec = PageCodec(SPEC, FP)
    keys, k, v = batch(3)
    values: list = [bytes(x) for x in codec.encode(keys, k, v)]
    values[1] = None
    out = codec.decode(keys, values)
    assert out.ok.tolist() == [True, False, True] and not out.corrupt.any()
    assert not out.pages[1].any() and torch.equal(out.pages[2, 0], k[2])


@pytest.mark.parametrize("offset", [0, 5, 30, HEADER_BYTES - 1, HEADER_BYTES, -1])
def test_any_flipped_bit_is_detected(offset):
    codec = PageCodec(SPEC, FP)
    keys, k, v = batch(3)
    values = [bytearray(x) for x in codec.encode(keys, k, v)]
    values[1][offset] ^= 0x10
    out = codec.decode(keys, [bytes(x) for x in values])
    assert out.ok.tolist() == [True, False, True]
    assert out.corrupt.tolist() == [False, True, False]
    assert not out.pages[1].any()


def test_truncated_or_foreign_values_are_corrupt():
    codec = PageCodec(SPEC, FP)
    keys, k, v = batch(3)
    values = [bytes(x) for x in codec.encode(keys, k, v)]
    out = codec.decode(keys, [values[0][:-1], b"pickle? never", values[2]])
    assert out.corrupt.tolist() == [True, True, False] and out.ok.tolist() == [False, False, True]


def test_a_valid_page_under_the_wrong_key_is_refused():
    """Header fields must equal the key asked for: layer, head, page, prefix, model, geometry."""
    keys, k, v = batch(4)
    good = [bytes(x) for x in PageCodec(SPEC, FP).encode(keys, k, v)]
    other_layer = PageKeys(3, keys.block_ids, keys.heads, keys.prefix, keys.pages)
    assert PageCodec(SPEC, FP).decode(other_layer, good).corrupt.all()
    swapped = [good[1], good[0], good[3], good[2]]  # heads and pages differ pairwise
    assert PageCodec(SPEC, FP).decode(keys, swapped).corrupt.all()
    assert PageCodec(SPEC, "fedcba9876543210").decode(keys, good).corrupt.all()
    f16 = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4, dtype=torch.float16)
    assert PageCodec(f16, FP).decode(keys, good).corrupt.all()


def test_codec_refuses_unnamed_keys_and_bad_fingerprints():
    keys, k, v = batch(2)
    with pytest.raises(ValueError, match="content-addressed"):
        PageCodec(SPEC, FP).encode(PageKeys(0, keys.block_ids, keys.heads), k, v)
    with pytest.raises(ValueError, match="fingerprint"):
        PageCodec(SPEC, "x" * 17)


def test_prefix_hashes_chain_over_the_whole_prefix():
    a = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    b = prefix_hashes([1, 2, 3, 4, 5, 6, 7, 0], 4)
    c = prefix_hashes([0, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a.shape == (2, 2)  # the partial third page has no hash
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])  # page 1 differs because page 0 did
    assert not torch.equal(prefix_hashes([1, 2, 3, 4], 4, salt=b"lora"), a[:1])
    hexes = prefix_hex(a)
    assert len(hexes[0]) == 32 and hexes[0] != hexes[1]
    assert torch.equal(hashes_from_bytes([bytes.fromhex(h) + b"tail" for h in hexes]), a)
