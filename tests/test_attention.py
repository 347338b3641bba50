"""Paged sparse decode attention against a plain softmax, and the Helix combine."""

import pytest
import torch

from kvhead.core.attention import dense_decode_attention, sparse_decode_attention
from kvhead.core.combine import combine_partials
from kvhead.core.pages import all_pages


def _setup(seed=0, batch=3, hq=6, hkv=2, dim=16, page=4, blocks=40, pages_per_seq=9):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(blocks, page, hkv, dim, generator=g)
    v = torch.randn(blocks, page, hkv, dim, generator=g)
    table = torch.stack([torch.randperm(blocks, generator=g)[:pages_per_seq] for _ in range(batch)])
    seq_lens = torch.tensor([33, 17, 36])[:batch]
    q = torch.randn(batch, hq, dim, generator=g)
    return q, k, v, table, seq_lens


def _naive(q, k, v, table, seq_lens, scale, pages=None):
    batch, hq, dim = q.shape
    hkv, page = k.shape[2], k.shape[1]
    out = torch.zeros_like(q, dtype=torch.float64)
    for b in range(batch):
        n = int(seq_lens[b])
        keys = k[table[b]].reshape(-1, hkv, dim)[:n].double()
        vals = v[table[b]].reshape(-1, hkv, dim)[:n].double()
        for h in range(hq):
            kh = h // (hq // hkv)
            keep = torch.ones(n, dtype=torch.bool)
            if pages is not None:
                chosen = [p for p in pages[b, kh].tolist() if p >= 0]
                keep = torch.tensor([t // page in chosen for t in range(n)])
            w = torch.softmax((keys[keep, kh] @ q[b, h].double()) * scale, dim=0)
            out[b, h] = w @ vals[keep, kh]
    return out


def test_dense_matches_softmax():
    q, k, v, table, lens = _setup()
    out, lse = dense_decode_attention(q, k, v, table, lens, 0.25)
    assert torch.allclose(out.double(), _naive(q, k, v, table, lens, 0.25), atol=1e-5)
    assert torch.isfinite(lse).all()


def test_sparse_with_every_page_equals_dense():
    q, k, v, table, lens = _setup(seed=3)
    num_pages = (lens + 3) // 4
    ids = all_pages(num_pages, 2, table.shape[1])
    sparse, lse_s = sparse_decode_attention(q, k, v, table, lens, ids, 0.25)
    dense, lse_d = dense_decode_attention(q, k, v, table, lens, 0.25)
    assert (sparse - dense).abs().max() <= 1e-5
    assert (lse_s - lse_d).abs().max() <= 1e-5


def test_sparse_attends_only_listed_pages_per_head():
    q, k, v, table, lens = _setup(seed=5)
    ids = torch.tensor(
        [[[0, 2, 8], [1, -1, -1]], [[4, -1, -1], [0, 3, 4]], [[8, 5, -1], [7, 6, 0]]]
    )
    out, _ = sparse_decode_attention(q, k, v, table, lens, ids, 0.3)
    assert torch.allclose(out.double(), _naive(q, k, v, table, lens, 0.3, ids), atol=1e-5)


def test_empty_page_list_gives_zero_and_neg_inf_lse():
    q, k, v, table, lens = _setup()
    ids = torch.full((3, 2, 2), -1)
    out, lse = sparse_decode_attention(q, k, v, table, lens, ids, 0.3)
    assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("shards", [2, 3])
def test_helix_combine_of_disjoint_shards_is_exact(shards):
    q, k, v, table, lens = _setup(seed=7)
    num_pages = (lens + 3) // 4
    every = all_pages(num_pages, 2, table.shape[1])
    outs, lses = [], []
    for s in range(shards):  # round-robin pages over shards, like Helix's KV placement
        ids = every.masked_fill(every % shards != s, -1)
        o, l = sparse_decode_attention(q, k, v, table, lens, ids, 0.25)
        outs.append(o)
        lses.append(l)
    out, lse = combine_partials(torch.stack(outs), torch.stack(lses))
    dense, dense_lse = dense_decode_attention(q, k, v, table, lens, 0.25)
    assert (out - dense).abs().max() <= 1e-5 and (lse - dense_lse).abs().max() <= 1e-5


def test_helix_combine_with_an_empty_shard():
    out = torch.randn(1, 2, 4)
    lse = torch.randn(1, 2)
    combined, clse = combine_partials(
        torch.stack([out, torch.zeros_like(out)]),
        torch.stack([lse, torch.full_like(lse, -torch.inf)]),
    )
    assert torch.allclose(combined, out) and torch.allclose(clse, lse)
