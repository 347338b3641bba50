"""int8 page bounds and two-level (super-page) selection: reference properties and the kernel.

The kernel tests run through Triton's interpreter on a CPU-only machine (conftest.py turns it
on) and as compiled kernels on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from kvhead import kernels
from kvhead.core.bounds.compact import (
    CompactBounds,
    build_super_bounds,
    hier_select,
    num_super_pages,
    score_compact_pages,
)
from kvhead.core.pages import PageBounds, score_pages, select_top_k
from kvhead.kernels.triton.box_score import box_scores, box_scores_mma, query_digits

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _bounds_of(keys: torch.Tensor, page: int) -> PageBounds:
    """fp32 bounds of ``keys [T, H, D]`` written to blocks 0.. in order."""
    tokens, heads, dim = keys.shape
    bounds = PageBounds.empty(-(-tokens // page), heads, dim)
    bounds.update(keys, torch.arange(tokens), page)
    return bounds


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    log_scale=st.floats(-30, 30),
    group=st.integers(1, 4),
    offset=st.floats(-5, 5),
    constant_dims=st.booleans(),
)
def test_int8_bounds_contain_every_key_and_upper_bound_the_score(
    seed,
    log_scale,
    group,
    offset,
    constant_dims,
):
    gen = torch.Generator().manual_seed(seed)
    page, heads, dim, tokens = 4, 2, 8, 23
    scale = 2.0**log_scale
    keys = (torch.randn(tokens, heads, dim, generator=gen) + offset) * scale
    if constant_dims:  # a dimension equal across the page: min == max, still enclosed
        keys[:, :, 0] = keys[0, :, 0]
    bounds = _bounds_of(keys, page)
    compact = CompactBounds.from_pages(bounds)
    assert compact.qmin.dtype == torch.int8 and compact.scale.dtype == torch.float32
    assert int(compact.qmax.max()) <= 127 and int(compact.qmin.min()) >= -127
    # Exact (fp64) containment: the int8 box holds the fp32 box, hence every key of the page.
    s = compact.scale.double().unsqueeze(-1)
    assert torch.all(compact.qmax.double() * s >= bounds.kmax.double())
    assert torch.all(compact.qmin.double() * s <= bounds.kmin.double())
    # Looseness is at most two grid steps per side (one from the grid, one from the fix-up).
    assert torch.all(compact.qmax.double() * s - bounds.kmax.double() <= 2 * s)
    # The score is an upper bound of q . k for every key, max over the GQA group.
    q = torch.randn(1, heads * group, dim, generator=gen) * scale
    num_pages = torch.tensor([bounds.kmin.shape[0]])
    table = torch.arange(bounds.kmin.shape[0]).unsqueeze(0)
    scores = score_compact_pages(q, compact, table, num_pages)[0]  # [H, N]
    best = torch.einsum("hgd,thd->hgt", q.view(heads, group, dim), keys).amax(1)  # [H, T]
    for t in range(tokens):
        tol = 1e-4 * (1 + best[:, t].abs().max()) + 1e-5 * scale * scale * dim
        assert torch.all(scores[:, t // page] >= best[:, t] - tol)


def test_empty_pages_quantize_to_zero_scale():
    bounds = PageBounds.empty(3, 1, 4)
    bounds.update(torch.ones(1, 1, 4), torch.tensor([0]), 4)
    compact = CompactBounds.from_pages(bounds)
    assert compact.scale[1:].eq(0).all() and compact.qmax[1:].eq(0).all()
    assert compact.qmax[0].eq(127).all() and compact.qmin[0].ge(126).all()  # floor, 1 step
    assert compact.nbytes_per_box() == 2 * 4 + 4


def test_super_bounds_contain_member_pages():
    gen = torch.Generator().manual_seed(3)
    page, group = 4, 3
    keys = torch.randn(50, 2, 8, generator=gen)  # 13 pages, the last partial
    bounds = _bounds_of(keys, page)
    perm = torch.randperm(13, generator=gen)
    shuffled = PageBounds(kmin=bounds.kmin[perm.argsort()], kmax=bounds.kmax[perm.argsort()])
    table = perm.unsqueeze(0)  # logical page i lives in block perm[i]
    num_pages = torch.tensor([11])  # pages 11, 12 are past the sequence: left out
    supers = build_super_bounds(shuffled, table, num_pages, group)
    assert tuple(supers.qmin.shape) == (1, 2, num_super_pages(13, group), 8)
    box = supers.dequantize()
    for p in range(11):
        assert torch.all(box.kmax[0, :, p // group] >= bounds.kmax[p])
        assert torch.all(box.kmin[0, :, p // group] <= bounds.kmin[p])
    # Group 3 holds pages 9, 10 only (11 is excluded): its max equals theirs, not page 11's.
    tight = torch.maximum(bounds.kmax[9], bounds.kmax[10])
    assert torch.all(box.kmax[0, :, 3] - tight <= 2 * supers.scale[0, :, 3, None])


def _problem(seed, batch=3, heads=2, group_q=2, dim=16, page=4, max_pages=37, spare=5):
    """Random keys in shuffled blocks, ragged page counts, compact page and fp32 bounds."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = batch * max_pages + spare
    keys = torch.randn(num_blocks * page, heads, dim, generator=gen)
    keys += torch.randn(num_blocks, 1, heads, dim, generator=gen).repeat_interleave(page, 0)[:, 0]
    bounds = _bounds_of(keys, page)
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_pages].view(batch, max_pages)
    num_pages = torch.randint(1, max_pages + 1, (batch,), generator=gen)
    num_pages[0] = max_pages
    query = torch.randn(batch, heads * group_q, dim, generator=gen)
    return query, bounds, table, num_pages


def _score_set(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return scores.gather(2, ids.clamp_min(0)).masked_fill(ids < 0, float("nan")).sort(2).values


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_all_super_pages_kept_equals_flat_int8_top_k(seed):
    query, bounds, table, num_pages = _problem(seed)
    pages = CompactBounds.from_pages(bounds)
    group = 4
    supers = build_super_bounds(bounds, table, num_pages, group)
    everything = num_super_pages(table.shape[1], group)
    ids = hier_select(query, pages, supers, table, num_pages, 6, group, everything)
    scores = score_compact_pages(query, pages, table, num_pages)
    flat = select_top_k(scores, 6, num_pages)
    forced = scores.scatter(2, (num_pages - 1).view(-1, 1, 1).expand(-1, 2, 1), float("inf"))
    assert torch.equal(_score_set(forced, ids).nan_to_num(), _score_set(forced, flat).nan_to_num())


def test_hier_select_output_format_and_forced_pages():
    query, bounds, table, num_pages = _problem(5, max_pages=64)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    ids = hier_select(query, pages, supers, table, num_pages, 8, 8, 2)
    assert ids.shape == (3, 2, 8)
    for b in range(3):
        n = int(num_pages[b])
        for h in range(2):
            row = ids[b, h][ids[b, h] >= 0]
            assert torch.all(row[1:] > row[:-1]) and int(row.max()) < n
            assert n - 1 in row.tolist()  # newest page
            assert row.numel() == min(8, n)  # enough candidates in two groups of 8
            assert len({int(p) // 8 for p in row}) <= 2  # from two super-pages only
            assert torch.all(ids[b, h][row.numel() :] == -1)


def test_hier_select_finds_a_hot_page_far_from_the_end():
    """A page whose keys align with the query wins through its super-page."""
    query, bounds, table, num_pages = _problem(7, batch=1, max_pages=64)
    hot = 13
    block = int(table[0, hot])
    direction = query[0, 0].sign()
    bounds.kmax[block, 0] = torch.where(direction > 0, 50.0, -49.0)
    bounds.kmin[block, 0] = torch.where(direction > 0, 49.0, -50.0)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    # Two super-pages: the newest one (forced) and the one holding the hot page.
    ids = hier_select(query, pages, supers, table, num_pages, 4, 8, 2)
    assert hot in ids[0, 0].tolist() and 63 in ids[0, 0].tolist()


@pytest.mark.parametrize(
    "seed,group,num_super,top_k,max_pages",
    [
        (11, 4, 3, 8, 37),
        (12, 8, 2, 16, 64),
        (13, 1, 40, 16, 40),
        (14, 8, 16, 32, 100),
        (15, 16, 1, 4, 9),
    ],
)
def test_kernel_matches_reference(seed, group, num_super, top_k, max_pages):
    query, bounds, table, num_pages = _problem(seed, max_pages=max_pages)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, group)
    ref = hier_select(query, pages, supers, table, num_pages, top_k, group, num_super)
    to = lambda c: CompactBounds(*(t.to(DEVICE) for t in (c.qmin, c.qmax, c.scale)))
    got = kernels.hier_select(
        query.to(DEVICE),
        to(pages),
        to(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        top_k,
        group,
        num_super,
    ).cpu()
    assert got.shape == ref.shape and got.dtype == torch.int64
    assert torch.equal((got >= 0).sum(2), (ref >= 0).sum(2))
    scores = score_compact_pages(query, pages, table, num_pages)
    forced = scores.scatter(2, (num_pages - 1).view(-1, 1, 1).expand(-1, 2, 1), float("inf"))
    torch.testing.assert_close(
        _score_set(forced, got), _score_set(forced, ref), equal_nan=True, rtol=1e-5, atol=1e-5
    )
    valid = got >= 0
    assert torch.all(got[valid] < num_pages.view(-1, 1, 1).expand_as(got)[valid])
    assert torch.all(
        torch.where(valid[..., 1:] & valid[..., :-1], got[..., 1:] > got[..., :-1], True)
    )


def test_bad_arguments_raise_clear_errors():
    query, bounds, table, num_pages = _problem(0)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 4)
    with pytest.raises(ValueError, match="cannot hold top_k"):
        hier_select(query, pages, supers, table, num_pages, 16, 4, 3)
    with pytest.raises(ValueError, match="super bounds"):
        hier_select(query, pages, supers, table, num_pages, 4, 8, 3)
    with pytest.raises(ValueError, match="positive"):
        hier_select(query, pages, supers, table, num_pages, 0, 4, 3)
    with pytest.raises(ValueError, match="positive"):
        build_super_bounds(bounds, table, num_pages, 0)


def test_fp32_flat_selection_is_unchanged_by_int8_on_separated_pages():
    """int8 rounding moves scores by a few grid steps: well-separated pages keep their order."""
    gen = torch.Generator().manual_seed(9)
    dim, page = 16, 4
    centres = torch.arange(12, dtype=torch.float32).view(12, 1, 1, 1) * 2.0
    keys = (torch.randn(12, page, 1, dim, generator=gen) * 0.01 + centres).view(-1, 1, dim)
    bounds = _bounds_of(keys, page)
    query = torch.ones(1, 1, dim)
    table = torch.arange(12).unsqueeze(0)
    num_pages = torch.tensor([12])
    flat = select_top_k(score_pages(query, bounds, table, num_pages), 4, num_pages)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 2)
    assert torch.equal(hier_select(query, pages, supers, table, num_pages, 4, 2, 2), flat)


@pytest.mark.parametrize("layout", ["fused", "split"])
@pytest.mark.parametrize("mma", [False, True])
def test_kernel_stages_match_reference_levels(layout, mma):
    """The kernel's super-pages are the reference's first level; its pages the second level,
    in every launch layout, scored on CUDA cores or as int8 digits on tensor cores."""
    from kvhead.core.bounds.compact import select_in_super_pages, select_super_pages
    from kvhead.kernels.triton.select_hier import Plan, Scoring, hier_select_stages

    query, bounds, table, num_pages = _problem(21, max_pages=70, dim=64)  # int8 dots: D >= 32
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    to = lambda c: CompactBounds(*(t.to(DEVICE) for t in (c.qmin, c.qmax, c.scale)))
    run = lambda: hier_select_stages(
        query.to(DEVICE),
        to(pages),
        to(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        8,
        8,
        3,
        plan=Plan(layout, Scoring(mma, 16, 2, 2)),
    )
    ids, sup = run()
    ref_sup = select_super_pages(query, supers, num_pages, 8, 3)
    assert torch.equal(sup.cpu(), ref_sup)
    ref = select_in_super_pages(query, pages, ref_sup, table, num_pages, 8, 8)
    assert torch.equal(ids.cpu(), ref)


def _on_device(c: CompactBounds) -> CompactBounds:
    return CompactBounds(*(t.to(DEVICE) for t in (c.qmin, c.qmax, c.scale)))


@pytest.mark.parametrize("seed,top_k,max_pages", [(31, 6, 37), (32, 16, 64), (33, 40, 33)])
def test_flat_int8_kernel_matches_reference(seed, top_k, max_pages):
    from kvhead.core.bounds.compact import flat_select

    query, bounds, table, num_pages = _problem(seed, max_pages=max_pages)
    num_pages[1] = 0  # an empty sequence selects nothing
    pages = CompactBounds.from_pages(bounds)
    ref = flat_select(query, pages, table, num_pages, top_k)
    got = kernels.flat_select(
        query.to(DEVICE), _on_device(pages), table.to(DEVICE), num_pages.to(DEVICE), top_k
    ).cpu()
    assert got.shape == ref.shape == (3, 2, min(top_k, max_pages))
    assert torch.equal((got >= 0).sum(2), (ref >= 0).sum(2))
    assert torch.all(got[1] == -1)
    scores = score_compact_pages(query, pages, table, num_pages)
    newest = (num_pages - 1).clamp_min(0).view(-1, 1, 1).expand(-1, 2, 1)
    forced = scores.scatter(2, newest, float("inf"))
    torch.testing.assert_close(
        _score_set(forced, got), _score_set(forced, ref), equal_nan=True, rtol=1e-5, atol=1e-5
    )


def test_default_scoring_uses_tensor_cores_for_large_passes_only():
    from kvhead.kernels.triton.select_hier import MMA_MIN_BOXES, default_scoring

    assert not default_scoring(8 * 1024).mma  # batch 1 at 128k: latency-bound
    assert default_scoring(64 * 1024).mma and default_scoring(MMA_MIN_BOXES).super_steps == 2


def test_plan_selection_goes_two_level_only_where_it_saves_pages():
    from kvhead.core.bounds.compact import plan_selection

    assert plan_selection(512, 64) is None  # few pages per head: flat
    assert plan_selection(8192, 64) == 32  # 4 x 64 candidates in 32 super-pages of 8
    assert plan_selection(8192, 64, flat_max_pages=10_000) is None
    assert plan_selection(2000, 512, flat_max_pages=16) is None  # 4 K candidates cover all


@pytest.mark.parametrize("max_pages,two_level", [(40, False), (96, True)])
def test_select_pages_dispatches_by_pages_per_head(max_pages, two_level):
    from kvhead.core.bounds.compact import flat_select, plan_selection

    query, bounds, table, num_pages = _problem(41, max_pages=max_pages)
    pages = CompactBounds.from_pages(bounds)
    group, top_k, limit = 4, 4, 64
    supers = build_super_bounds(bounds, table, num_pages, group)
    num_super = plan_selection(max_pages, top_k, group, flat_max_pages=limit)
    assert (num_super is not None) == two_level
    ref = (
        hier_select(query, pages, supers, table, num_pages, top_k, group, num_super)
        if two_level
        else flat_select(query, pages, table, num_pages, top_k)
    )
    args = (
        query.to(DEVICE),
        _on_device(pages),
        _on_device(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        top_k,
        group,
        limit,
    )
    got = kernels.select_pages(*args, flat_max_boxes=0).cpu()  # by pages per head alone
    scores = score_compact_pages(query, pages, table, num_pages)
    forced = scores.scatter(2, (num_pages - 1).view(-1, 1, 1).expand(-1, 2, 1), float("inf"))
    torch.testing.assert_close(
        _score_set(forced, got), _score_set(forced, ref), equal_nan=True, rtol=1e-5, atol=1e-5
    )
    if two_level:  # the two-level path cannot run without super-page bounds
        with pytest.raises(ValueError, match="super-page bounds"):
            kernels.select_pages(args[0], args[1], None, *args[3:], flat_max_boxes=0)
    else:  # the flat path never reads super-page bounds
        assert torch.equal(
            kernels.select_pages(args[0], args[1], None, *args[3:], flat_max_boxes=0).cpu(), got
        )


@pytest.mark.parametrize("flat", [True, False])
def test_two_tiles_per_program_change_nothing(monkeypatch, flat):
    """Large grids give each candidate program two tiles; force that on a small problem."""
    from kvhead.kernels.triton import select_hier

    query, bounds, table, num_pages = _problem(51, max_pages=80)
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, 4)
    args = (query.to(DEVICE), _on_device(pages), table.to(DEVICE), num_pages.to(DEVICE))
    run = (
        (lambda: select_hier.flat_select(*args, 8))
        if flat
        else (
            lambda: select_hier.hier_select(
                args[0], args[1], _on_device(supers), *args[2:], 8, 4, 9
            )
        )
    )
    one = run()
    monkeypatch.setattr(select_hier, "LARGE_GRID", 1)
    assert select_hier._chunks(1, 2) == 2
    assert torch.equal(run(), one)


@pytest.mark.parametrize("mma", [False, True])
def test_flat_scorings_match_reference(mma):
    from kvhead.core.bounds.compact import flat_select
    from kvhead.kernels.triton.select_hier import Plan, Scoring
    from kvhead.kernels.triton.select_hier import flat_select as kernel

    query, bounds, table, num_pages = _problem(61, max_pages=45, dim=64)
    num_pages[2] = 0
    pages = CompactBounds.from_pages(bounds)
    ref = flat_select(query, pages, table, num_pages, 7)
    got = kernel(
        query.to(DEVICE),
        _on_device(pages),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        7,
        Plan(None, Scoring(mma=mma, super_tile=16)),
    ).cpu()
    assert torch.equal(got, ref)


@triton.jit
def _both_scorings(q_ptr, qmin_ptr, qmax_ptr, scale_ptr, out_ptr, D: tl.constexpr, N: tl.constexpr):
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, N)
    box = offs_n[:, None] * D + offs_d[None, :]
    qmin, qmax = tl.load(qmin_ptr + box), tl.load(qmax_ptr + box)
    scale = tl.load(scale_ptr + offs_n)
    d_mask = offs_d < D
    pos, neg, rs = query_digits(q_ptr, D, 0, offs_d, d_mask, 3, 4)
    tl.store(out_ptr + offs_n, box_scores_mma(pos, neg, rs, qmin, qmax, scale, 3, 4, N))
    tl.store(
        out_ptr + N + offs_n,
        box_scores(q_ptr, D, 0, qmin.to(tl.float32), qmax.to(tl.float32), scale, offs_d, d_mask, 3),
    )


def test_int8_digit_scores_match_fp32_scores():
    """The tensor-core scoring (three int8 digits of the query) is fp32-exact in practice."""
    gen = torch.Generator().manual_seed(71)
    query = torch.randn(3, 64, generator=gen) * torch.logspace(-3, 2, 64)  # wide magnitudes
    qmin = torch.randint(-127, 50, (32, 64), generator=gen, dtype=torch.int8)
    qmax = (qmin.int() + torch.randint(0, 77, (32, 64), generator=gen)).to(torch.int8)
    scale = torch.rand(32, generator=gen)
    out = torch.empty(64)
    args = [t.to(DEVICE) for t in (query, qmin, qmax, scale, out)]
    _both_scorings[(1,)](*args, D=64, N=32)
    mma, fp32 = args[-1].cpu().view(2, 32)
    ref = (
        query.clamp_min(0).double() @ qmax.double().T
        + query.clamp_max(0).double() @ qmin.double().T
    ).amax(0) * scale.double()
    ulp = 2.0**-23 * ref.abs().max()  # one fp32 step at the largest score
    for got in (mma, fp32):  # both within a few fp32 steps of the fp64 score
        assert (got.double() - ref).abs().max() <= 8 * ulp
