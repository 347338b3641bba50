"""Two-launch int8 selection (``kvhead.kernels.select_two``) against the torch reference.

Runs through Triton's interpreter without CUDA (conftest.py turns it on), compiled on a GPU
(where the second launch is a programmatic dependent launch on Hopper). Random keys give
distinct scores, so the selections must equal the reference's exactly; ties are checked
separately (lower ids win, as in the other layouts).
"""

from __future__ import annotations

import pytest
import torch
from test_select_one_kernel import DEVICE, _dev, _problem

from kvhead.bounds_compact import (
    CompactBounds,
    build_super_bounds,
    select_in_super_pages,
    select_super_pages,
)
from kvhead.kernels.select_hier import Plan, flat_select, hier_select_stages
from kvhead.kernels.select_one import row_counters
from kvhead.kernels.select_two import TwoShape
from kvhead.pages import PageBounds

SHAPES = {
    # several tiles per row in both launches, CUDA-core scoring, register selections
    "fp32 t16 c16": TwoShape(tile=16, tile_c=16, mma=False),
    # tensor cores, candidates wider than K: local top-K prunes
    "mma t32 c64": TwoShape(tile=32, tile_c=64, mma=True),
    # one tile per row in both launches (no counter), radix selections over 256 lanes
    "mma t256 c256": TwoShape(tile=256, tile_c=256, mma=True, warps=8, warps_c=8),
}


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("seed,batch,max_pages,group,num_super,top_k", [
    (1, 1, 300, 8, 6, 20),      # batch 1, several tiles per row
    (2, 4, 130, 8, 4, 16),      # ragged, one empty sequence, partial last group
    (3, 8, 40, 4, 3, 12),       # batch 8, short rows
    (4, 2, 9, 2, 5, 9),         # K = every page of a full row
    (11, 1, 1200, 8, 20, 30),   # merges of 160 lanes (radix) in both launches at tile 16
])
def test_two_launch_matches_reference_levels(shape, seed, batch, max_pages, group, num_super,
                                             top_k):
    query, bounds, pages, table, num_pages = _problem(seed, batch, max_pages)
    supers = build_super_bounds(bounds, table, num_pages, group)
    ids, sup = hier_select_stages(query.to(DEVICE), _dev(pages), _dev(supers), table.to(DEVICE),
                                  num_pages.to(DEVICE), top_k, group, num_super,
                                  plan=Plan("two", two=SHAPES[shape]))
    ref_sup = select_super_pages(query, supers, num_pages, group, num_super)
    # An empty sequence: the reference forces super-page 0 (which holds no page), the kernels
    # choose none; the pages selected are the same (none).
    held = num_pages > 0
    assert torch.equal(sup.cpu()[held], ref_sup[held])
    assert bool((sup.cpu()[~held] == -1).all())
    ref = select_in_super_pages(query, pages, ref_sup, table, num_pages, top_k, group)
    assert ids.dtype == torch.int64 and torch.equal(ids.cpu(), ref)


def test_ties_go_to_lower_pages_and_newest_is_forced():
    """Every page (so every super-page) has the same box: the lowest super-pages and pages
    win, plus the newest of each."""
    query, bounds, _, table, _ = _problem(9, 1, 200)
    same = PageBounds(kmin=bounds.kmin[:1].expand_as(bounds.kmin).clone(),
                      kmax=bounds.kmax[:1].expand_as(bounds.kmax).clone())
    pages = CompactBounds.from_pages(same)
    num_pages = torch.tensor([150])  # 19 groups of 8, the newest partial (pages 144-149)
    supers = build_super_bounds(same, table, num_pages, 8)
    for shape in SHAPES.values():
        ids, sup = hier_select_stages(query.to(DEVICE), _dev(pages), _dev(supers),
                                      table.to(DEVICE), num_pages.to(DEVICE), 10, 8, 3,
                                      plan=Plan("two", two=shape))
        assert torch.equal(sup.cpu(), torch.tensor([0, 1, 18]).expand(1, 2, 3))
        want = torch.cat([torch.arange(9), torch.tensor([149])]).expand(1, 2, 10)
        assert torch.equal(ids.cpu(), want)


def test_counters_return_to_zero_and_repeated_calls_agree():
    query, bounds, pages, table, num_pages = _problem(10, 3, 120)
    supers = build_super_bounds(bounds, table, num_pages, 8)
    args = (query.to(DEVICE), _dev(pages), _dev(supers), table.to(DEVICE),
            num_pages.to(DEVICE), 16, 8, 4)
    plan = Plan("two", two=SHAPES["fp32 t16 c16"])
    first = hier_select_stages(*args, plan=plan)[0]
    second = hier_select_stages(*args, plan=plan)[0]
    assert torch.equal(first, second)
    assert int(row_counters(DEVICE, 6)[:6].abs().sum()) == 0


def test_flat_and_bad_shapes_are_refused():
    query, _, pages, table, num_pages = _problem(12, 1, 40)
    with pytest.raises(ValueError, match="two-level"):
        flat_select(query.to(DEVICE), _dev(pages), table.to(DEVICE), num_pages.to(DEVICE), 8,
                    plan=Plan("two"))
    with pytest.raises(ValueError, match="power of two"):
        TwoShape(tile=512)
