"""Where the policy's selection runs: the torch reference on CPU, the Triton kernels for the
spec's selection when asked (by default on CUDA), from int8 live bounds when the cache keeps
them. Without CUDA the kernel route runs through Triton's interpreter (conftest.py turns it on).
"""

from __future__ import annotations

import pytest
import torch

from kvhead import kernels
from kvhead.core.bounds.compact import DEFAULT_GROUP, flat_select, hier_select, plan_selection
from kvhead.core.bounds.live import LiveBounds
from kvhead.core.pages import PageBounds, score_pages, select_top_k
from kvhead.core.policy import SelectionPolicy, _score_and_select
from kvhead.core.spec import HeadPageSpec
from kvhead.eval.paged_cache import PagedKVCache

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HEADS, GQA, DIM, PAGE = 2, 2, 16, 4


def _problem(seed: int, max_pages: int, length: int):
    """One sequence of random keys in shuffled blocks: fp32 bounds, table, live bounds."""
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(max_pages * PAGE, HEADS, DIM, generator=gen)
    keys += torch.randn(max_pages, HEADS, DIM, generator=gen).repeat_interleave(PAGE, 0) * 2
    table = torch.randperm(max_pages, generator=gen).view(1, -1)
    bounds = PageBounds.empty(max_pages, HEADS, DIM)
    slots = table[0].repeat_interleave(PAGE) * PAGE + torch.arange(PAGE).repeat(max_pages)
    bounds.update(keys[:length], slots[:length], PAGE)
    seq_lens = torch.tensor([length])
    live = LiveBounds.from_bounds(bounds, table, seq_lens, PAGE, DEFAULT_GROUP)
    query = torch.randn(1, HEADS * GQA, DIM, generator=gen)
    return query, bounds, table, (seq_lens + PAGE - 1) // PAGE, live


def _refuse(*_args, **_kwargs):
    raise AssertionError("the kernel route was taken")


def test_cpu_default_is_the_fp32_reference(monkeypatch):
    query, bounds, table, num_pages, live = _problem(0, 300, 1100)
    monkeypatch.setattr(kernels, "select_pages", _refuse)
    monkeypatch.setattr(kernels, "score_and_select", _refuse)
    policy = SelectionPolicy(
        "quest", num_layers=1, num_kv_heads=HEADS, page_size=PAGE, top_k=16, kernels=kernels
    )
    sel = policy.select(0, query, bounds, table, num_pages * PAGE, live=live)
    want = select_top_k(score_pages(query, bounds, table, num_pages), 16, num_pages)
    assert torch.equal(sel.top_k_ids, want)


@pytest.mark.parametrize("max_pages,length,two_level", [(1100, 4300, False), (8400, 33000, True)])
def test_kernel_route_selects_from_live_int8_bounds(max_pages, length, two_level):
    """Flat for a small batch of 1100 pages, two levels once rows x pages pass FLAT_MAX_BOXES:
    the kernels' selection equals the int8 reference on the same live bounds."""
    query, bounds, table, num_pages, live = _problem(1, max_pages, length)
    top_k = 24
    num_super = plan_selection(max_pages, top_k, rows=HEADS)
    assert (num_super is not None) == two_level
    want = (
        hier_select(
            query, live.pages, live.supers, table, num_pages, top_k, DEFAULT_GROUP, num_super
        )
        if two_level
        else flat_select(query, live.pages, table, num_pages, top_k)
    )
    to = lambda t: t.to(DEVICE)
    dev_live = LiveBounds(
        *(type(c)(*(to(t) for t in (c.qmin, c.qmax, c.scale))) for c in (live.pages, live.supers)),
        to(live.open_min),
        to(live.open_max),
        live.page_size,
        live.group,
    )
    got = _score_and_select(
        to(query),
        bounds,
        to(table),
        to(num_pages),
        top_k,
        live=dev_live,
        use_kernels=True,
        kernels=kernels,
    )
    assert torch.equal(got.cpu(), want)
    blank = _score_and_select(
        to(query),
        bounds,
        to(table),
        to(num_pages),
        top_k,
        torch.tensor([1], device=DEVICE),
        live=dev_live,
        use_kernels=True,
        kernels=kernels,
    )
    assert bool((blank[:, 0] == -1).all()) and torch.equal(blank[:, 1].cpu(), want[:, 1])


def test_options_beyond_the_spec_stay_on_the_reference(monkeypatch):
    query, bounds, table, num_pages, live = _problem(2, 300, 1100)
    monkeypatch.setattr(kernels, "select_pages", _refuse)
    got = _score_and_select(
        query,
        bounds,
        table,
        num_pages,
        16,
        sink_pages=1,
        live=live,
        use_kernels=True,
        kernels=kernels,
    )
    scores = score_pages(query, bounds, table, num_pages)
    assert torch.equal(got, select_top_k(scores, 16, num_pages, sink_pages=1))


def test_paged_cache_keeps_live_bounds_as_a_rebuild_would():
    """Prefill builds the live bounds, decode appends to them, rewind rebuilds them: closed
    pages and groups equal a build from the fp32 bounds at every point."""
    spec = HeadPageSpec(
        num_q_heads=HEADS * GQA,
        num_kv_heads=HEADS,
        head_dim=DIM,
        page_size=PAGE,
        dtype=torch.float32,
    )
    cache = PagedKVCache(1, spec, max_tokens=PAGE * 1100, live_bounds=True)
    assert cache.live[0] is None
    gen = torch.Generator().manual_seed(3)
    keys = torch.randn(100, HEADS, DIM, generator=gen)

    def check(length: int) -> None:
        ref = LiveBounds.from_bounds(
            cache.bounds[0], cache.block_table, torch.tensor([length]), PAGE, DEFAULT_GROUP
        )
        live, pages, groups = cache.live[0], length // PAGE, length // PAGE // DEFAULT_GROUP
        for name in ("qmin", "qmax", "scale"):
            assert torch.equal(getattr(live.pages, name)[:pages], getattr(ref.pages, name)[:pages])
            assert torch.equal(
                getattr(live.supers, name)[:, :, :groups], getattr(ref.supers, name)[:, :, :groups]
            )

    cache.write(0, keys[:37], keys[:37])
    cache.advance(37)
    check(37)
    for pos in range(37, 100):
        cache.write(0, keys[pos : pos + 1], keys[pos : pos + 1])
        cache.advance(1)
    check(100)
    cache.rewind(70)
    check(70)
