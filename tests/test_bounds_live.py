"""int8 bounds kept current on append (:mod:`kvhead.core.bounds.live`): reference and Triton kernel
against a build from scratch.

The kernel runs through Triton's interpreter on a CPU-only machine and compiled on a GPU.
"""

from __future__ import annotations

import pytest
import torch

from kvhead import kernels
from kvhead.core.bounds.compact import CompactBounds, build_super_bounds, hier_select
from kvhead.core.bounds.live import PAGE, SUPER, LiveBounds
from kvhead.core.pages import PageBounds

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _decode(
    seed: int,
    *,
    group: int | None = 3,
    use_kernel: bool = True,
    batch=3,
    heads=2,
    dim=16,
    page=4,
    max_pages=11,
    prefill=(0, 7, 12),
    steps=26,
):
    """Prefill ragged sequences, then append one token per row per step (row 1 idles at odd
    steps). Returns the live bounds, exact fp32 bounds of every key, table and lengths."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = batch * max_pages + 4
    rand = lambda *shape, s=3.0: (torch.randn(*shape, generator=gen) * s).bfloat16().float()
    table = torch.randperm(num_blocks, generator=gen)[: batch * max_pages].view(batch, max_pages)
    stale = rand(num_blocks, heads, dim, s=9.0)  # an earlier request's boxes in the blocks
    exact = PageBounds(kmin=stale.clone(), kmax=stale + 1)
    seq_lens = torch.tensor(prefill)
    for b, n in enumerate(prefill):
        pos = torch.arange(n)
        exact.update(rand(n, heads, dim), table[b, pos // page] * page + pos % page, page)
    ref = LiveBounds.from_bounds(exact, table, seq_lens, page, group)
    live = LiveBounds(
        _to(ref.pages), _to(ref.supers), _to(ref.open_min), _to(ref.open_max), page, ref.group
    )
    rows = torch.arange(batch)
    for t in range(steps):
        keys = rand(batch, heads, dim, s=1.0 + t % 5)
        dtype = torch.bfloat16
        if t == 3:  # a subnormal key: the fp64 rounding must still match. Passed as fp32:
            keys[0, 0, 0] = 2.0**-130  # Triton 3.9's interpreter flushes bf16 subnormals
            dtype = torch.float32
        active = (rows != 1) | (t % 2 == 0)
        pos = seq_lens.clone()
        slots = torch.where(active, table[rows, pos // page] * page + pos % page, -1)
        exact.update(keys[active], slots[active], page)
        if use_kernel:
            kernels.append_bounds(live, _to(keys.to(dtype)), _to(slots), _to(pos))
        else:
            live.append(_to(keys.to(dtype)), _to(slots), _to(pos))
        seq_lens += active.long()
    return live, exact, table, seq_lens


def _to(x):
    if isinstance(x, CompactBounds):
        return CompactBounds(*(_to(t) for t in (x.qmin, x.qmax, x.scale)))
    return None if x is None else x.to(DEVICE)


def _cpu(c: CompactBounds) -> CompactBounds:
    return CompactBounds(c.qmin.cpu(), c.qmax.cpu(), c.scale.cpu())


def _equal(a: CompactBounds | None, b: CompactBounds | None) -> bool:
    if a is None or b is None:
        return a is b
    return all(
        torch.equal(x.cpu(), y.cpu())
        for x, y in ((a.qmin, b.qmin), (a.qmax, b.qmax), (a.scale, b.scale))
    )


@pytest.mark.parametrize("group", [3, None])
def test_kernel_equals_reference_bit_for_bit(group):
    got, *_ = _decode(1, group=group)
    ref, *_ = _decode(1, group=group, use_kernel=False)
    assert _equal(got.pages, ref.pages) and _equal(got.supers, ref.supers)
    assert torch.equal(got.open_min.cpu(), ref.open_min.cpu())
    assert torch.equal(got.open_max.cpu(), ref.open_max.cpu())


@pytest.mark.parametrize("seed", [2, 3])
def test_closed_pages_and_groups_equal_a_build_from_scratch(seed):
    page, group = 4, 3
    live, exact, table, seq_lens = _decode(seed, group=group, page=page)
    num_pages = (seq_lens + page - 1) // page
    scratch = CompactBounds.from_pages(exact)
    supers = build_super_bounds(exact, table, num_pages, group)
    pages = _cpu(live.pages)
    checked = 0
    for b, n in enumerate(seq_lens.tolist()):
        for p in range(n // page):  # closed pages: bit for bit
            blk = int(table[b, p])
            assert torch.equal(pages.qmin[blk], scratch.qmin[blk])
            assert torch.equal(pages.qmax[blk], scratch.qmax[blk])
            assert torch.equal(pages.scale[blk], scratch.scale[blk])
            checked += 1
        for g in range(n // (page * group)):  # closed groups
            for name in ("qmin", "qmax", "scale"):
                assert torch.equal(
                    getattr(live.supers, name)[b, :, g].cpu(), getattr(supers, name)[b, :, g]
                )
        newest = int(table[b, (n - 1) // page])  # open boxes: exact
        assert torch.equal(live.open_min[b, PAGE].cpu(), exact.kmin[newest])
        assert torch.equal(live.open_max[b, PAGE].cpu(), exact.kmax[newest])
        first = (n - 1) // page // group * group
        blocks = table[b, first : (n - 1) // page + 1]
        assert torch.equal(live.open_min[b, SUPER].cpu(), exact.kmin[blocks].amin(0))
        assert torch.equal(live.open_max[b, SUPER].cpu(), exact.kmax[blocks].amax(0))
    assert checked >= 10


def test_selection_from_live_bounds_equals_selection_from_scratch():
    """Stale int8 boxes of open pages and groups are never ranked (newest forced)."""
    page, group = 4, 3
    live, exact, table, seq_lens = _decode(4, group=group, page=page, steps=31)
    num_pages = (seq_lens + page - 1) // page
    query = torch.randn(3, 4, 16, generator=torch.Generator().manual_seed(0))
    pages, supers = _cpu(live.pages), _cpu(live.supers)
    scratch = CompactBounds.from_pages(exact)
    scratch_supers = build_super_bounds(exact, table, num_pages, group)
    assert not _equal(pages, scratch)  # open pages differ from a scratch build...
    for top_k, num_super in ((2, 1), (4, 2), (6, 3)):
        got = hier_select(query, pages, supers, table, num_pages, top_k, group, num_super)
        ref = hier_select(query, scratch, scratch_supers, table, num_pages, top_k, group, num_super)
        assert torch.equal(got, ref)  # ...but select the same pages


def test_append_rejects_mismatched_shapes():
    live, *_ = _decode(5, steps=0)
    with pytest.raises(ValueError, match="do not fit"):
        kernels.append_bounds(
            live,
            torch.zeros(2, 2, 16, device=DEVICE),
            torch.zeros(2, dtype=torch.int64, device=DEVICE),
            torch.zeros(2, dtype=torch.int64, device=DEVICE),
        )
