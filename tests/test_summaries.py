"""Summary tokens for skipped pages (kvhead.core.summaries) and the bound-weighted page score."""

import pytest
import torch

from kvhead.core.attention import dense_decode_attention, sparse_decode_attention
from kvhead.core.pages import PageBounds, score_pages, select_top_k
from kvhead.core.policy import SelectionPolicy
from kvhead.core.summaries import PageValueSums, compensate, summary_attention
from kvhead.eval.runner import ReferenceRunner
from kvhead.models.tiny import build_tiny_llama

PAGE, HKV, GROUP, DIM = 4, 2, 3, 8


def _pool(keys: torch.Tensor, values: torch.Tensor, num_blocks: int, seed: int):
    """A vLLM-layout pool holding ``keys/values [T, Hkv, D]`` in shuffled blocks, with metadata."""
    tokens = keys.shape[0]
    order = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed))
    table = order[: -(-tokens // PAGE)].unsqueeze(0)
    slots = (table[0].repeat_interleave(PAGE) * PAGE + torch.arange(PAGE).repeat(table.shape[1]))[
        :tokens
    ]
    k_cache = torch.zeros(num_blocks * PAGE, HKV, DIM)
    v_cache = torch.zeros(num_blocks * PAGE, HKV, DIM)
    k_cache[slots], v_cache[slots] = keys, values
    bounds = PageBounds.empty(num_blocks, HKV, DIM)
    bounds.update(keys, slots, PAGE)
    sums = PageValueSums.empty(num_blocks, HKV, DIM)
    sums.update(values, slots, PAGE)
    shape = (num_blocks, PAGE, HKV, DIM)
    return k_cache.view(shape), v_cache.view(shape), table, slots, bounds, sums


def test_value_sums_are_page_sums_and_a_reused_block_starts_afresh():
    g = torch.Generator().manual_seed(0)
    values = torch.randn(10, HKV, DIM, generator=g)
    *_, table, _slots, _, sums = _pool(torch.randn(10, HKV, DIM, generator=g), values, 6, seed=1)
    for page in range(3):
        want = values[page * PAGE : (page + 1) * PAGE].sum(0)
        assert torch.allclose(sums.sums[table[0, page]], want, atol=1e-6)
    # a new sequence writes block table[0, 0] from offset 0: the old sum must not leak in
    fresh = torch.randn(2, HKV, DIM, generator=g)
    block = int(table[0, 0])
    sums.update(fresh, torch.tensor([block * PAGE, block * PAGE + 1]), PAGE)
    assert torch.allclose(sums.sums[block], fresh.sum(0), atol=1e-6)


def test_compensation_is_exact_when_each_page_holds_one_key_and_value():
    """A page of identical tokens is exactly its summary token: sparse + summaries == dense."""
    g = torch.Generator().manual_seed(2)
    pages, tokens = 7, 7 * PAGE - 2  # the newest page is partial (2 of 4 tokens)
    keys = (
        torch.randn(pages, 1, HKV, DIM, generator=g)
        .expand(-1, PAGE, -1, -1)
        .reshape(-1, HKV, DIM)[:tokens]
    )
    values = (
        torch.randn(pages, 1, HKV, DIM, generator=g)
        .expand(-1, PAGE, -1, -1)
        .reshape(-1, HKV, DIM)[:tokens]
    )
    k_cache, v_cache, table, _, bounds, sums = _pool(keys, values, 10, seed=3)
    seq_lens = torch.tensor([tokens])
    query = torch.randn(1, HKV * GROUP, DIM, generator=g)
    scale = DIM**-0.5
    ids = torch.tensor([[[0, 3, 6], [1, 6, -1]]])  # heads read different pages
    out, lse = sparse_decode_attention(query, k_cache, v_cache, table, seq_lens, ids, scale)
    dense, _ = dense_decode_attention(query, k_cache, v_cache, table, seq_lens, scale)
    fixed = compensate(out, lse, query, bounds, sums, table, seq_lens, ids, PAGE, scale)
    assert (out - dense).abs().max() > 1e-2  # the skipped pages matter
    assert (fixed - dense).abs().max() <= 1e-5


def test_a_head_that_reads_every_page_gets_no_summary():
    g = torch.Generator().manual_seed(4)
    tokens = 5 * PAGE
    k_cache, v_cache, table, _, bounds, sums = _pool(
        torch.randn(tokens, HKV, DIM, generator=g),
        torch.randn(tokens, HKV, DIM, generator=g),
        8,
        seed=5,
    )
    seq_lens, scale = torch.tensor([tokens]), DIM**-0.5
    query = torch.randn(1, HKV * GROUP, DIM, generator=g)
    ids = torch.tensor([[[0, 1, 2, 3, 4], [0, 2, 4, -1, -1]]])
    extra, extra_lse = summary_attention(query, bounds, sums, table, seq_lens, ids, PAGE, scale)
    assert torch.isinf(extra_lse[0, :GROUP]).all() and (extra[0, :GROUP] == 0).all()
    assert torch.isfinite(extra_lse[0, GROUP:]).all()  # head 1 skipped pages 1 and 3
    out, lse = sparse_decode_attention(query, k_cache, v_cache, table, seq_lens, ids, scale)
    fixed = compensate(out, lse, query, bounds, sums, table, seq_lens, ids, PAGE, scale)
    assert torch.equal(fixed[0, :GROUP], out[0, :GROUP])


def test_bound_weight_spans_centre_logit_to_upper_bound():
    g = torch.Generator().manual_seed(6)
    tokens = 6 * PAGE
    keys = torch.randn(tokens, HKV, DIM, generator=g)
    *_, table, _, bounds, _ = _pool(keys, keys, 8, seed=7)
    query = torch.randn(1, HKV * GROUP, DIM, generator=g)
    num_pages = torch.tensor([6])
    upper = score_pages(query, bounds, table, num_pages)
    assert torch.allclose(score_pages(query, bounds, table, num_pages, bound_weight=1.0), upper)
    centre = (bounds.kmax[table[0]] + bounds.kmin[table[0]]) / 2  # [N, Hkv, D]
    q = query[0].view(HKV, GROUP, DIM)
    want = torch.einsum("hgd,nhd->hgn", q, centre).amax(1)
    assert torch.allclose(
        score_pages(query, bounds, table, num_pages, bound_weight=0.0)[0], want, atol=1e-5
    )
    half = score_pages(query, bounds, table, num_pages, bound_weight=0.5)
    assert (half <= upper + 1e-5).all() and not torch.allclose(half, upper)
    with pytest.raises(ValueError, match="bound_weight"):
        score_pages(query, bounds, table, num_pages, bound_weight=1.5)


def test_policy_checks_bound_weight_and_carries_the_compensation_flag():
    with pytest.raises(ValueError, match="bound_weight"):
        SelectionPolicy(mode="quest", num_layers=1, num_kv_heads=HKV, bound_weight=-0.1)
    g = torch.Generator().manual_seed(8)
    tokens = 20 * PAGE
    keys = torch.randn(tokens, HKV, DIM, generator=g)
    *_, table, _, bounds, _ = _pool(keys, keys, 24, seed=9)
    query = torch.randn(1, HKV * GROUP, DIM, generator=g)
    seq_lens = torch.tensor([tokens])
    plain = SelectionPolicy(mode="quest", num_layers=1, num_kv_heads=HKV, page_size=PAGE, top_k=4)
    weighted = SelectionPolicy(
        mode="quest",
        num_layers=1,
        num_kv_heads=HKV,
        page_size=PAGE,
        top_k=4,
        bound_weight=0.0,
        compensate=True,
    )
    a = plain.select(0, query, bounds, table, seq_lens)
    b = weighted.select(0, query, bounds, table, seq_lens)
    assert not a.compensate and b.compensate
    scores = score_pages(query, bounds, table, torch.tensor([20]), bound_weight=0.0)
    assert torch.equal(b.page_ids, select_top_k(scores, 4, torch.tensor([20])))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), num_layers=2, num_q_heads=4, num_kv_heads=2
    )


def test_runner_compensation_moves_sparse_logits_and_is_inert_when_nothing_is_skipped(tiny_dir):
    ids = torch.randint(3, 500, (110,), generator=torch.Generator().manual_seed(10))
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = runner.new_cache(120)
    runner.forward(cache, ids[:100])
    sums_after_prefill = [s.sums[:13].clone() for s in cache.value_sums]

    def decode(**kw):
        cache.rewind(100)
        policy = runner.policy("quest", **kw)
        return torch.stack(
            [runner.forward(cache, ids[t : t + 1], policy=policy)[0] for t in range(100, 110)]
        )

    dense = decode(top_k=64)
    assert (decode(top_k=64, compensate=True) - dense).abs().max() <= 1e-5
    sparse, fixed = decode(top_k=3), decode(top_k=3, compensate=True)
    assert (fixed - sparse).abs().max() > 1e-4
    cache.rewind(100)  # the partial page's value sum is rebuilt from what it keeps
    assert all(
        torch.allclose(s.sums[:13], a, atol=1e-5)
        for a, s in zip(sums_after_prefill, cache.value_sums)
    )
