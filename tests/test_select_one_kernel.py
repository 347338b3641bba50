"""One-launch int8 selection (``kvhead.kernels.triton.select_one``) against the torch reference.

Runs through Triton's interpreter without CUDA (conftest.py turns it on), compiled on a
GPU. Random keys give distinct scores, so the selections must equal the reference's exactly;
ties are checked separately (lower ids win, as in the multi-launch kernels).
"""

from __future__ import annotations

import pytest
import torch

from kvhead import kernels
from kvhead.core.bounds.compact import (
    CompactBounds,
    build_super_bounds,
    flat_select,
    select_in_super_pages,
    select_super_pages,
)
from kvhead.core.pages import PageBounds
from kvhead.kernels.triton import select_hier
from kvhead.kernels.triton.select_hier import ONE_MAX_ROWS, Plan, auto_layout, hier_select_stages
from kvhead.kernels.triton.select_one import OneShape, row_counters

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _problem(
    seed: int,
    batch: int,
    max_pages: int,
    heads: int = 2,
    group_q: int = 2,
    dim: int = 64,
    page: int = 4,
):
    """Random keys in shuffled blocks with ragged page counts (row 0 full, the last empty
    when ``batch`` > 2), their fp32 bounds, int8 bounds, block table and page counts."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = batch * max_pages + 3
    keys = torch.randn(num_blocks * page, heads, dim, generator=gen)
    keys += torch.randn(num_blocks, heads, dim, generator=gen).repeat_interleave(page, 0)
    bounds = PageBounds.empty(num_blocks, heads, dim)
    bounds.update(keys, torch.arange(num_blocks * page), page)
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_pages].view(batch, max_pages)
    num_pages = torch.randint(1, max_pages + 1, (batch,), generator=gen)
    num_pages[0] = max_pages
    if batch > 2:
        num_pages[-1] = 0
    query = torch.randn(batch, heads * group_q, dim, generator=gen)
    return query, bounds, CompactBounds.from_pages(bounds), table, num_pages


def _dev(c: CompactBounds) -> CompactBounds:
    return CompactBounds(*(t.to(DEVICE) for t in (c.qmin, c.qmax, c.scale)))


SHAPES = {
    "fp32 t16 steps16": OneShape(tile=16, tile_c=16),
    "mma t32 one step": OneShape(tile=32, tile_c=None, mma=True),
    "mma t64 steps32": OneShape(tile=64, tile_c=32, mma=True, warps=4),
    "radix merges": OneShape(tile=16, tile_c=32, rank=False),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "seed,batch,max_pages,group,num_super,top_k",
    [
        (1, 1, 300, 8, 6, 20),  # batch 1, several tiles per row
        (2, 4, 130, 8, 4, 16),  # ragged, one empty sequence, partial last group
        (3, 8, 40, 4, 3, 12),  # batch 8, short rows
        (4, 2, 9, 2, 5, 9),  # K = every page of a full row
    ],
)
def test_two_level_matches_reference_levels(shape, seed, batch, max_pages, group, num_super, top_k):
    query, bounds, pages, table, num_pages = _problem(seed, batch, max_pages)
    supers = build_super_bounds(bounds, table, num_pages, group)
    ids, sup = hier_select_stages(
        query.to(DEVICE),
        _dev(pages),
        _dev(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        top_k,
        group,
        num_super,
        plan=Plan("one", one=SHAPES[shape]),
    )
    ref_sup = select_super_pages(query, supers, num_pages, group, num_super)
    # An empty sequence: the reference forces super-page 0 (which holds no page), the kernels
    # choose none; the pages selected are the same (none).
    held = num_pages > 0
    assert torch.equal(sup.cpu()[held], ref_sup[held])
    assert bool((sup.cpu()[~held] == -1).all())
    ref = select_in_super_pages(query, pages, ref_sup, table, num_pages, top_k, group)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ref)


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize(
    "seed,batch,max_pages,top_k",
    [
        (5, 1, 200, 24),  # batch 1
        (6, 5, 64, 16),  # ragged, one empty sequence
        (7, 2, 10, 40),  # K > pages: width min(K, pages), -1 padded
        (8, 1, 600, 40),  # merge of 38 tiles' winners (> 512 lanes with 16-page tiles: radix)
    ],
)
def test_flat_matches_reference(shape, seed, batch, max_pages, top_k):
    query, _, pages, table, num_pages = _problem(seed, batch, max_pages)
    got = kernels.flat_select(
        query.to(DEVICE), _dev(pages), table.to(DEVICE), num_pages.to(DEVICE), top_k
    )  # auto: one launch at this size
    plan_got = select_hier.flat_select(
        query.to(DEVICE),
        _dev(pages),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        top_k,
        plan=Plan("one", one=SHAPES[shape]),
    )
    ref = flat_select(query, pages, table, num_pages, top_k)
    assert torch.equal(plan_got.cpu(), ref)
    assert torch.equal(got.cpu(), ref)


def test_ties_go_to_lower_pages_and_newest_is_forced():
    """Every page has the same box: the top-K is the K - 1 lowest pages plus the newest."""
    query, bounds, _, table, _ = _problem(9, 1, 200)
    same = PageBounds(
        kmin=bounds.kmin[:1].expand_as(bounds.kmin).clone(),
        kmax=bounds.kmax[:1].expand_as(bounds.kmax).clone(),
    )
    pages = CompactBounds.from_pages(same)
    num_pages = torch.tensor([150])
    want = torch.cat([torch.arange(9), torch.tensor([149])]).expand(1, 2, 10)
    for shape in SHAPES.values():
        flat = select_hier.flat_select(
            query.to(DEVICE),
            _dev(pages),
            table.to(DEVICE),
            num_pages.to(DEVICE),
            10,
            plan=Plan("one", one=shape),
        )
        assert torch.equal(flat.cpu(), want)


def test_counters_return_to_zero_and_repeated_calls_agree():
    query, bounds, pages, table, num_pages = _problem(10, 3, 120)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    args = (
        query.to(DEVICE),
        _dev(pages),
        _dev(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        16,
        8,
        4,
    )
    first = kernels.hier_select(*args)
    second = kernels.hier_select(*args)
    assert torch.equal(first, second)
    assert int(row_counters(DEVICE, 6)[:6].abs().sum()) == 0


def test_auto_layout_takes_one_launch_only_where_it_won_on_the_h200():
    # flat: long rows taken flat for a small batch, K below the tile (local top-K prunes)
    assert auto_layout(8, 64, flat=True, first_boxes=2048, top_k=64) == "one"
    assert auto_layout(8, 64, flat=True, first_boxes=2048, top_k=128) == "split"  # 512 tiles
    assert auto_layout(8, 16, flat=True, first_boxes=512, top_k=32) == "fused"  # 8k: 2 launches
    # two levels: at most ONE_MAX_SUPERS super-pages per row, at most ONE_MAX_ROWS rows
    assert auto_layout(ONE_MAX_ROWS, 4, flat=False, first_boxes=256, top_k=32) == "one"
    assert auto_layout(8, 8, flat=False, first_boxes=1024, top_k=64) == "fused"  # 128k
    assert auto_layout(ONE_MAX_ROWS + 1, 2, flat=False, first_boxes=256, top_k=32) == "fused"
    assert auto_layout(512, 32, flat=False, first_boxes=1024, top_k=64) == "split"


def test_small_batches_of_long_rows_select_flat():
    """32k tokens (2048 pages) at batch 1 (8 rows) go flat, at batch 8 two-level."""
    from kvhead.core.bounds.compact import FLAT_MAX_BOXES, plan_selection

    assert plan_selection(2048, 64) == 32  # by width alone: two levels
    assert plan_selection(2048, 64, rows=FLAT_MAX_BOXES // 2048) is None
    assert plan_selection(2048, 64, rows=64) == 32
    assert plan_selection(8192, 64, rows=8) == 32


def test_default_shape_ranks_only_register_sized_candidate_sets():
    from kvhead.kernels.triton.select_one import default_shape

    assert default_shape(128).rank and not default_shape(256).rank
    assert default_shape(2048) == OneShape(128, 256, mma=True, rank=False)


def test_bad_tile_is_refused():
    with pytest.raises(ValueError, match="power of two"):
        OneShape(tile=48)


def test_auto_pdl_only_where_it_won_on_the_h200():
    from kvhead.kernels.triton.select_hier import auto_pdl

    assert auto_pdl(64, "fused", flat=True, max_pages=512)  # 8k, batch 8
    assert not auto_pdl(8, "split", flat=True, max_pages=2048)  # 32k, batch 1, flat
    assert auto_pdl(64, "split", flat=False, max_pages=8192)  # 128k, batch 8, K >= 64
    assert not auto_pdl(64, "fused", flat=False, max_pages=8192)  # first level fused
    assert not auto_pdl(512, "split", flat=False, max_pages=2048)  # batch 64


@pytest.mark.parametrize("layout", ["fused", "split"])
def test_dependent_launches_select_the_same_pages(layout):
    """Programmatic dependent launches change only when kernels start (on sm_90+; elsewhere
    the flag is ignored): selections with and without them are equal."""
    query, bounds, pages, table, num_pages = _problem(13, 3, 200)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    args = (
        query.to(DEVICE),
        _dev(pages),
        _dev(supers),
        table.to(DEVICE),
        num_pages.to(DEVICE),
        16,
        8,
        4,
    )
    on = hier_select_stages(*args, plan=Plan(layout, pdl=True))
    off = hier_select_stages(*args, plan=Plan(layout, pdl=False))
    assert torch.equal(on[0], off[0]) and torch.equal(on[1], off[1])
    flat_on = select_hier.flat_select(*args[:2], *args[3:6], plan=Plan(layout, pdl=True))
    flat_off = select_hier.flat_select(*args[:2], *args[3:6], plan=Plan(layout, pdl=False))
    assert torch.equal(flat_on, flat_off)
    assert torch.equal(flat_on.cpu(), flat_select(query, pages, table, num_pages, 16))
