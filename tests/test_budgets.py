"""Head-adaptive budgets: per-head top-K, the allocation, and the coverage calibration."""

import pytest
import torch

from kvhead.core.budgets import PageCoverage, allocate_budgets, allocate_residency, missed_mass
from kvhead.core.pages import PageBounds, select_top_k
from kvhead.core.policy import SelectionPolicy


def _coverage(curves, step=8, **kw) -> PageCoverage:
    grid = [step * (i + 1) for i in range(len(curves[0][0]))]
    meta = {
        "context": 1024,
        "offsets": [0],
        "steps": 1,
        "group_score": "max",
        "sink_pages": 0,
        "recent_pages": 1,
    }
    return PageCoverage(pages=grid, mass=curves, **(meta | kw))


def test_per_head_top_k_keeps_each_heads_best_pages():
    scores = torch.tensor([[[5.0, 1, 4, 3, 2, 0], [0, 1, 2, 3, 4, 5]]])
    ids = select_top_k(
        scores, torch.tensor([2, 4]), torch.tensor([6]), sink_pages=0, recent_pages=1
    )
    # head 0: newest page forced + best other (page 0); head 1: newest + pages 4, 3, 2
    assert ids.tolist() == [[[0, 5, -1, -1], [2, 3, 4, 5]]]
    same = select_top_k(scores, torch.tensor([3, 3]), torch.tensor([6]))
    assert torch.equal(same, select_top_k(scores, 3, torch.tensor([6])))
    with pytest.raises(ValueError, match="shape"):
        select_top_k(scores, torch.tensor([2, 2, 2]), torch.tensor([6]))
    with pytest.raises(ValueError, match="sum"):
        select_top_k(scores, torch.tensor([1, 4]), torch.tensor([6]), sink_pages=1)


def _bounds(seed=0, blocks=16, heads=2, dim=4, page=4):
    g = torch.Generator().manual_seed(seed)
    bounds = PageBounds.empty(blocks, heads, dim)
    keys = torch.randn(blocks * page, heads, dim, generator=g)
    bounds.update(keys, torch.arange(blocks * page), page)
    return bounds, torch.randn(1, heads * 2, dim, generator=g)


def test_policy_head_budgets_set_each_heads_page_count():
    bounds, q = _bounds()
    table, lens = torch.arange(16).unsqueeze(0), torch.tensor([64])
    budgets = torch.tensor([[3, 7]])
    for mode, extra in (
        ("quest", {}),
        ("flexicache", {"unstable": torch.tensor([[False, False]])}),
    ):
        policy = SelectionPolicy(
            mode, num_layers=1, num_kv_heads=2, page_size=4, top_k=5, head_top_k=budgets, **extra
        )
        sel = policy.select(0, q, bounds, table, lens)
        assert (sel.page_ids[0] >= 0).sum(-1).tolist() == [3, 7]
    uniform = SelectionPolicy(
        "quest",
        num_layers=1,
        num_kv_heads=2,
        page_size=4,
        top_k=5,
        head_top_k=torch.tensor([[5, 5]]),
    )
    plain = SelectionPolicy("quest", num_layers=1, num_kv_heads=2, page_size=4, top_k=5)
    assert torch.equal(
        uniform.select(0, q, bounds, table, lens).page_ids,
        plain.select(0, q, bounds, table, lens).page_ids,
    )


def test_policy_rejects_bad_head_budgets():
    kw = {"num_layers": 1, "num_kv_heads": 2, "page_size": 4, "top_k": 5}
    with pytest.raises(ValueError, match="shape"):
        SelectionPolicy("quest", head_top_k=torch.tensor([[4, 4, 4]]), **kw)
    with pytest.raises(ValueError, match="sink"):
        SelectionPolicy("quest", head_top_k=torch.tensor([[1, 4]]), sink_pages=1, **kw)


def test_allocation_keeps_the_pool_and_feeds_broad_heads():
    steps = torch.arange(1, 9, dtype=torch.float64)
    sharp = (1 - 0.5**steps).tolist()  # half of the rest per step: saturates fast
    broad = (steps / 10).tolist()  # linear: every step adds 0.1
    cov = _coverage([[sharp, broad, sharp]])
    eligible = torch.tensor([[True, True, False]])
    budgets = allocate_budgets(cov, eligible, top_k=32)
    assert budgets[0, 2] == 32  # not eligible: untouched
    # 64 pages: 8 each to start, then gains 0.25, 0.125 (sharp) and 0.1 x 4 (broad)
    assert budgets[0, :2].tolist() == [24, 40]
    flat = allocate_budgets(
        _coverage([[broad, broad, broad]]), torch.ones(1, 3, dtype=torch.bool), top_k=24
    )
    assert flat.sum() == 72 and flat.max() - flat.min() <= 8


def test_allocation_rejects_a_sparse_grid_and_too_small_top_k():
    cov = PageCoverage(
        context=64,
        offsets=[0],
        steps=1,
        group_score="max",
        sink_pages=0,
        recent_pages=1,
        pages=[8, 24],
        mass=[[[0.5, 1.0]]],
    )
    with pytest.raises(ValueError, match="multiple"):
        allocate_budgets(cov, torch.ones(1, 1, dtype=torch.bool), top_k=8)
    with pytest.raises(ValueError, match="minimum"):
        allocate_budgets(
            _coverage([[[0.5, 1.0]]], sink_pages=4, recent_pages=8),
            torch.ones(1, 1, dtype=torch.bool),
            top_k=8,
        )


def test_residency_crosses_a_convex_curve_that_marginal_gains_never_cross():
    steps = torch.arange(1, 9, dtype=torch.float64)
    sharp = (1 - 0.5**steps).tolist()  # half of the rest per step
    drifting = ((steps / 8) ** 2).tolist()  # little covered until nearly every page is kept
    cov = _coverage([[sharp, drifting, sharp]])
    everyone = torch.ones(1, 3, dtype=torch.bool)
    spread = allocate_budgets(cov, everyone, 0, pool=112)
    assert spread.tolist() == [[32, 48, 32]]  # marginal gains: missed 0.0625 x 2 + 0.4375
    dense, budgets = allocate_residency(cov, pool=112)
    assert dense.tolist() == [[False, True, False]] and budgets.tolist() == [[24, 64, 24]]
    assert missed_mass(cov, ~dense, budgets)[0].tolist() == pytest.approx([0.125, 0.0, 0.125])
    assert float(missed_mass(cov, everyone, spread).sum()) == pytest.approx(0.5625)
    # too few pages for a dense head beside the others' minimum: all sparse, marginal spread
    dense, budgets = allocate_residency(cov, pool=72)
    assert not dense.any() and budgets.tolist() == [[32, 8, 32]]
    # a budget of every page is a dense head; a pool of everything makes every head dense
    assert allocate_residency(cov, pool=128)[0].tolist() == [[False, True, False]]
    assert allocate_residency(cov, pool=192)[0].all()
    with pytest.raises(ValueError, match="minimum budget"):
        allocate_residency(cov, pool=16)
