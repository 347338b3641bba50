"""Triton kernels against the torch reference (the oracle), on fresh random inputs.

On a machine without CUDA these run through Triton's interpreter on small sizes (conftest.py
turns it on); on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import pytest
import torch

from kvhead import kernels
from kvhead.core.attention import dense_decode_attention
from kvhead.core.attention import sparse_decode_attention as ref_attention
from kvhead.core.combine import combine_partials as ref_combine
from kvhead.core.pages import PageBounds, all_pages, score_pages, select_top_k
from kvhead.kernels.triton.attention import sparse_decode_attention as kernel_attention

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REL_TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in fp64; NaN anywhere in ``out`` makes it NaN, which fails any bound."""
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def paged_problem(gen, batch, num_q, num_kv, dim, page, max_len, dtype, spare_blocks=3):
    """Random paged KV cache with shuffled block tables and ragged lengths (newest page partial)."""
    seq_lens = torch.randint(1, max_len + 1, (batch,), generator=gen)
    seq_lens[0] = max_len
    max_pages = -(-max_len // page)
    num_blocks = batch * max_pages + spare_blocks
    perm = torch.randperm(num_blocks, generator=gen)[: batch * max_pages]
    block_table = perm.view(batch, max_pages).int()
    k_cache = torch.randn(num_blocks, page, num_kv, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, page, num_kv, dim, generator=gen).to(dtype)
    query = torch.randn(batch, num_q, dim, generator=gen).to(dtype)
    to = lambda t: t.to(DEVICE)
    return to(query), to(k_cache), to(v_cache), to(block_table), to(seq_lens)


def random_page_lists(gen, seq_lens, page, num_kv, width):
    """Per-head lists of distinct valid pages with -1 holes anywhere, not only at the end."""
    batch = seq_lens.shape[0]
    ids = torch.full((batch, num_kv, width), -1, dtype=torch.int64)
    for b in range(batch):
        pages = -(-int(seq_lens[b]) // page)
        for h in range(num_kv):
            count = int(torch.randint(0, min(width, pages) + 1, (1,), generator=gen))
            chosen = torch.randperm(pages, generator=gen)[:count]
            slots = torch.randperm(width, generator=gen)[:count]
            ids[b, h, slots] = chosen
    return ids.to(DEVICE)


@pytest.mark.parametrize(
    "seed,dtype,page,dim,group",
    [
        (1, torch.float32, 16, 32, 4),
        (2, torch.bfloat16, 16, 64, 4),
        (3, torch.float16, 8, 40, 2),
        (4, torch.bfloat16, 5, 32, 1),
    ],
)
def test_sparse_attention_matches_reference(seed, dtype, page, dim, group):
    gen = torch.Generator().manual_seed(seed)
    num_kv = 2
    query, k_cache, v_cache, table, seq_lens = paged_problem(
        gen, 3, num_kv * group, num_kv, dim, page, 150, dtype
    )
    ids = random_page_lists(gen, seq_lens.cpu(), page, num_kv, 7)
    ids[1, 0] = -1  # a head that attends to nothing: out 0, lse -inf
    scale = dim**-0.5
    ref_out, ref_lse = ref_attention(query, k_cache, v_cache, table, seq_lens, ids, scale)
    out, lse = kernels.sparse_decode_attention(query, k_cache, v_cache, table, seq_lens, ids, scale)
    assert out.dtype == dtype and out.shape == ref_out.shape and lse.dtype == torch.float32
    assert rel_err(out, ref_out) < REL_TOL[dtype]
    empty = ref_lse == float("-inf")
    assert empty[1, :group].all() and (lse[empty] == float("-inf")).all()
    assert (out[1, :group] == 0).all()
    assert torch.allclose(lse[~empty], ref_lse[~empty], atol=1e-3, rtol=0)


def test_split_count_changes_nothing_but_rounding():
    gen = torch.Generator().manual_seed(7)
    query, k_cache, v_cache, table, seq_lens = paged_problem(
        gen, 2, 8, 2, 32, 16, 400, torch.float32
    )
    ids = all_pages((seq_lens + 15) // 16, 2, table.shape[1])
    results = [
        kernel_attention(query, k_cache, v_cache, table, seq_lens, ids, 0.2, num_splits=s)
        for s in (1, 2, 7)
    ]
    for out, lse in results[1:]:
        assert rel_err(out, results[0][0]) < 1e-5
        assert torch.allclose(lse, results[0][1], atol=1e-5, rtol=0)


def test_dense_mode_matches_dense_reference():
    gen = torch.Generator().manual_seed(11)
    query, k_cache, v_cache, table, seq_lens = paged_problem(
        gen, 2, 8, 2, 64, 16, 300, torch.bfloat16
    )
    ids = all_pages((seq_lens + 15) // 16, 2, table.shape[1])
    out, lse = kernels.sparse_decode_attention(query, k_cache, v_cache, table, seq_lens, ids, 0.125)
    ref_out, ref_lse = dense_decode_attention(query, k_cache, v_cache, table, seq_lens, 0.125)
    assert rel_err(out, ref_out) < REL_TOL[torch.bfloat16]
    assert torch.allclose(lse, ref_lse, atol=1e-3, rtol=0)
    # Lengths as a broadcast view (stride 0), as a caller may pass them: every row still its own.
    same = seq_lens[:1].expand(2)
    out, _ = kernels.sparse_decode_attention(query, k_cache, v_cache, table, same, ids, 0.125)
    ref_out, _ = ref_attention(query, k_cache, v_cache, table, same.contiguous(), ids, 0.125)
    assert rel_err(out, ref_out) < REL_TOL[torch.bfloat16]


def test_attention_rejects_mismatched_shapes():
    gen = torch.Generator().manual_seed(3)
    query, k_cache, v_cache, table, seq_lens = paged_problem(
        gen, 2, 8, 2, 32, 16, 64, torch.float32
    )
    bad_ids = torch.zeros(2, 3, 4, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="page_ids must be"):
        kernel_attention(query, k_cache, v_cache, table, seq_lens, bad_ids, 1.0)
    with pytest.raises(ValueError, match="query heads"):
        kernel_attention(query[:, :7], k_cache, v_cache, table, seq_lens, bad_ids, 1.0)


def bounds_problem(gen, batch, num_q, num_kv, dim, max_pages, quantize):
    num_blocks = batch * max_pages + 2
    lo = torch.randn(num_blocks, num_kv, dim, generator=gen)
    hi = lo + torch.rand(num_blocks, num_kv, dim, generator=gen)
    if quantize:  # coarse values make many exactly tied scores
        lo, hi = lo.round(), lo.round() + 1
    bounds = PageBounds(kmin=lo.to(DEVICE), kmax=hi.to(DEVICE))
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_pages].view(batch, max_pages)
    num_pages = torch.randint(0, max_pages + 1, (batch,), generator=gen)
    num_pages[0] = max_pages
    query = torch.randn(batch, num_q, dim, generator=gen)
    if quantize:
        query = query.sign()
    return query.to(DEVICE), bounds, table.int().to(DEVICE), num_pages.to(DEVICE)


@pytest.mark.parametrize("top_k,quantize", [(4, False), (9, True), (200, False)])
def test_score_and_select_picks_the_reference_score_set(top_k, quantize):
    gen = torch.Generator().manual_seed(top_k)
    query, bounds, table, num_pages = bounds_problem(gen, 3, 8, 2, 32, 50, quantize)
    scores = score_pages(query, bounds, table, num_pages)
    newest = (num_pages - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 2, 1)
    scores = scores.scatter(2, newest, float("inf"))  # the reference forces the newest page
    ref_ids = select_top_k(score_pages(query, bounds, table, num_pages), top_k, num_pages)
    ids = kernels.score_and_select(query, bounds, table, num_pages, top_k)
    assert ids.shape == ref_ids.shape and ids.dtype == ref_ids.dtype
    assert ((ids >= 0).sum(2) == (ref_ids >= 0).sum(2)).all()
    for b in range(ids.shape[0]):
        for h in range(ids.shape[1]):
            got, want = ids[b, h][ids[b, h] >= 0], ref_ids[b, h][ref_ids[b, h] >= 0]
            assert (got[1:] > got[:-1]).all(), "ids must be ascending and distinct"
            if int(num_pages[b]) > 0:  # an empty sequence has no newest page to force
                assert int(newest[b, h, 0]) in got.tolist()
            picked = scores[b, h, got].sort().values
            wanted = scores[b, h, want].sort().values
            assert torch.allclose(picked, wanted, rtol=1e-5, atol=1e-5)


def test_update_bounds_matches_reference_on_reused_blocks():
    gen = torch.Generator().manual_seed(5)
    num_blocks, num_kv, dim, page = 6, 2, 24, 4
    stale_lo = torch.randn(num_blocks, num_kv, dim, generator=gen)
    stale = PageBounds(kmin=stale_lo, kmax=stale_lo + 1)
    # Block 2 restarts at offset 0 (a reused block: its stale bounds must go); block 4 continues.
    slots = torch.tensor([8, 9, -1, 10, 17, 18, 11, 19])
    keys = torch.randn(slots.numel(), num_kv, dim, generator=gen).to(torch.bfloat16)
    ref = PageBounds(kmin=stale.kmin.clone(), kmax=stale.kmax.clone())
    ref.update(keys, slots, page)
    got = PageBounds(kmin=stale.kmin.clone().to(DEVICE), kmax=stale.kmax.clone().to(DEVICE))
    kernels.update_bounds(got, keys.to(DEVICE), slots.to(DEVICE), page)
    assert torch.equal(got.kmin.cpu(), ref.kmin) and torch.equal(got.kmax.cpu(), ref.kmax)
    assert not torch.equal(ref.kmin[2], stale.kmin[2])  # the reset really happened


@pytest.mark.parametrize("shards", [1, 3, 37])
def test_combine_matches_reference(shards):
    gen = torch.Generator().manual_seed(shards)
    outs = torch.randn(shards, 2, 5, 48, generator=gen).to(torch.bfloat16)
    lses = torch.randn(shards, 2, 5, generator=gen) * 4
    lses[torch.rand(shards, 2, 5, generator=gen) < 0.3] = float("-inf")
    lses[:, 1, 2] = float("-inf")  # no shard covers this row
    ref_out, ref_lse = ref_combine(outs, lses)
    out, lse = kernels.combine_partials(outs.to(DEVICE), lses.to(DEVICE))
    assert out.dtype == torch.bfloat16 and out.shape == ref_out.shape
    assert rel_err(out.cpu(), ref_out) < REL_TOL[torch.bfloat16]
    assert torch.equal(lse.cpu().isinf(), ref_lse.isinf())
    finite = ref_lse.isfinite()
    assert torch.allclose(lse.cpu()[finite], ref_lse[finite], atol=1e-5, rtol=0)
    assert (out[1, 2] == 0).all()


@pytest.mark.parametrize("gather", ["device", "host"])
def test_copy_pages_lands_pages_in_pool_rows(gather):
    gen = torch.Generator().manual_seed(2)
    arena = torch.randn(80, 2, 4, 8, generator=gen).to(torch.bfloat16)
    if DEVICE.type == "cuda":
        arena = arena.pin_memory()
    pool = torch.zeros(50, 2, 4, 8, dtype=torch.bfloat16, device=DEVICE)
    # More pages than the gather kernel has programs, so programs loop over several pages.
    src, dst = torch.randperm(80, generator=gen)[:45], torch.randperm(50, generator=gen)[:45]
    event = kernels.copy_pages_async(arena, src, pool, dst, gather=gather)
    if DEVICE.type == "cuda":
        torch.cuda.current_stream().wait_event(event)
    else:
        assert event is None
    pool = pool.cpu()
    assert torch.equal(pool[dst], arena[src])
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[dst] = False
    assert (pool[untouched] == 0).all()


def test_copy_pages_rejects_mismatched_pages():
    arena = torch.zeros(4, 3, 8)
    pool = torch.zeros(4, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="do not match"):
        kernels.copy_pages_async(arena, torch.tensor([0]), pool, torch.tensor([1]))
    with pytest.raises(ValueError, match="gather must be"):
        kernels.copy_pages_async(
            arena, torch.tensor([0]), arena.clone(), torch.tensor([1]), gather="dma"
        )
