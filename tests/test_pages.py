"""Page bounds, scoring and top-K selection."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvhead.core.pages import (
    PageBounds,
    all_pages,
    mask_to_page_ids,
    page_mask,
    page_sums,
    rerank_diff,
    score_pages,
    select_top_k,
)


def _filled(seed: int, num_blocks=12, page=4, heads=2, dim=8, tokens=37):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(tokens, heads, dim, generator=g)
    order = torch.randperm(num_blocks, generator=g)
    table = order[: -(-tokens // page)].unsqueeze(0)
    slots = table[0].repeat_interleave(page) * page + torch.arange(page).repeat(table.shape[1])
    bounds = PageBounds.empty(num_blocks, heads, dim)
    bounds.update(keys, slots[:tokens], page)
    return keys, table, slots[:tokens], bounds


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), group=st.integers(1, 4), scale=st.floats(0.01, 100.0))
def test_bound_upper_bounds_every_key_in_the_page(seed, group, scale):
    page, heads, dim = 4, 2, 8
    keys, table, slots, bounds = _filled(seed, page=page, heads=heads, dim=dim)
    keys = keys * scale
    bounds = PageBounds.empty(12, heads, dim)
    bounds.update(keys, slots, page)
    g = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(1, heads * group, dim, generator=g) * scale
    num_pages = torch.tensor([table.shape[1]])
    scores = score_pages(q, bounds, table, num_pages)  # [1, H, N]
    dots = torch.einsum("hgd,thd->hgt", q.view(heads, group, dim), keys)
    best = dots.amax(dim=1)  # max over the GQA group, [H, T]
    for t in range(keys.shape[0]):
        tol = 1e-4 * (1 + abs(best[:, t]).max())
        assert torch.all(scores[0, :, t // page] >= best[:, t] - tol)


def test_reused_block_bounds_reset_at_page_start():
    bounds = PageBounds.empty(2, 1, 2)
    bounds.update(torch.tensor([[[5.0, -5.0]]]), torch.tensor([4]), 4)
    bounds.update(torch.tensor([[[1.0, 1.0]]]), torch.tensor([4]), 4)  # block reused
    assert bounds.kmax[1, 0].tolist() == [1.0, 1.0]
    assert bounds.kmin[1, 0].tolist() == [1.0, 1.0]
    bounds.update(torch.tensor([[[2.0, 0.0]]]), torch.tensor([5]), 4)
    assert bounds.kmax[1, 0].tolist() == [2.0, 1.0] and bounds.kmin[1, 0].tolist() == [1.0, 0.0]


def test_padded_slots_are_ignored():
    bounds = PageBounds.empty(2, 1, 2)
    bounds.update(torch.ones(2, 1, 2), torch.tensor([0, -1]), 4)
    assert torch.isinf(bounds.kmax[1]).all()


def test_top_k_keeps_newest_page_and_pads():
    scores = torch.tensor([[[9.0, 8.0, 7.0, -1.0, float("-inf")]]])
    ids = select_top_k(scores, 2, torch.tensor([4]))
    assert ids.tolist() == [[[0, 3]]]  # page 3 is the newest: forced in despite its score
    ids = select_top_k(scores, 8, torch.tensor([4]))
    assert ids.tolist() == [[[0, 1, 2, 3, -1]]]


def test_top_k_rejects_nonpositive_k():
    import pytest

    with pytest.raises(ValueError, match="top_k"):
        select_top_k(torch.zeros(1, 1, 3), 0, torch.tensor([3]))


def test_mask_round_trip_and_all_pages():
    ids = torch.tensor([[[0, 3, -1], [1, 2, 4]]])
    mask = page_mask(ids, 5)
    assert mask.sum().item() == 5
    assert mask_to_page_ids(mask).tolist() == ids.tolist()
    assert all_pages(torch.tensor([2, 3]), 1, 4).tolist() == [[[0, 1, -1, -1]], [[0, 1, 2, -1]]]


def test_rerank_diff_promoted_and_demoted():
    before = page_mask(torch.tensor([[[0, 1, 2]]]), 6)
    after = page_mask(torch.tensor([[[1, 4, 5]]]), 6)
    diff = rerank_diff(before, after)
    assert mask_to_page_ids(diff.promoted).tolist() == [[[4, 5]]]
    assert mask_to_page_ids(diff.demoted).tolist() == [[[0, 2]]]
    assert diff.num_promoted.tolist() == [[2]] and diff.num_demoted.tolist() == [[2]]


def test_sink_and_recent_pages_are_forced_inside_the_budget():
    scores = torch.arange(10.0).flip(0).view(1, 1, 10)  # page 0 best ... page 9 worst
    scores = torch.cat([scores, -scores], dim=1)  # head 1 prefers the newest pages
    scores[..., 9] = float("-inf")  # page 9 does not exist (score_pages marks it so)
    num_pages = torch.tensor([9])
    ids = select_top_k(scores, 4, num_pages, sink_pages=1, recent_pages=2)
    assert ids[0, 0].tolist() == [0, 1, 7, 8]  # sink 0, window 7-8, best other: 1
    assert ids[0, 1].tolist() == [0, 6, 7, 8]  # window 7-8 and sink 0 despite its low score
    default = select_top_k(scores, 4, num_pages)
    assert default[0, 0].tolist() == [0, 1, 2, 8]  # only the newest page is forced


def test_forced_pages_must_fit_the_budget():
    scores = torch.zeros(1, 1, 8)
    for sink, recent in ((3, 2), (0, 0), (-1, 1)):
        try:
            select_top_k(scores, 4, torch.tensor([8]), sink_pages=sink, recent_pages=recent)
        except ValueError:
            continue
        raise AssertionError(f"sink={sink} recent={recent} was accepted")


def _point_pages(keys: torch.Tensor) -> tuple[PageBounds, torch.Tensor]:
    """One key per page (kmin = kmax), so a page's bound is exactly q . key."""
    bounds = PageBounds(kmin=keys.unsqueeze(1).clone(), kmax=keys.unsqueeze(1).clone())
    return bounds, torch.arange(keys.shape[0]).unsqueeze(0)


def test_softmax_group_score_gives_each_query_head_a_say():
    keys = torch.tensor([[20.0, 0.0], [19.5, 0.0], [0.0, 8.0], [0.0, 0.0], [0.0, 0.0]])
    bounds, table = _point_pages(keys)
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # one KV head, a group of two query heads
    num_pages = torch.tensor([5])
    by_max = select_top_k(score_pages(query, bounds, table, num_pages), 2, num_pages)
    by_softmax = select_top_k(
        score_pages(query, bounds, table, num_pages, group_score="softmax"), 2, num_pages
    )
    assert by_max[0, 0].tolist() == [0, 4]  # head 0's large logits decide alone
    assert by_softmax[0, 0].tolist() == [2, 4]  # head 1's only page beats head 0's split mass
    assert (
        score_pages(query, bounds, table, torch.tensor([3]), group_score="softmax")[0, 0, 3:]
        .isinf()
        .all()
    )


def test_softmax_group_score_of_one_query_head_ranks_like_max():
    _, table, _, bounds = _filled(7)
    q = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(3))  # group of one
    num_pages = torch.tensor([table.shape[1]])
    a = select_top_k(score_pages(q, bounds, table, num_pages), 4, num_pages)
    b = select_top_k(score_pages(q, bounds, table, num_pages, group_score="softmax"), 4, num_pages)
    assert torch.equal(a, b)


def test_page_sums_add_each_pages_tokens_and_a_partial_last_page():
    weights = torch.arange(1.0, 11.0).expand(2, 3, 10)  # 10 tokens, pages of 4
    sums = page_sums(weights, 4)
    assert sums.shape == (2, 3, 3)
    assert sums[0, 0].tolist() == [1 + 2 + 3 + 4, 5 + 6 + 7 + 8, 9 + 10]
