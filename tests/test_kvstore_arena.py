"""Host arena: batched put/get, LRU eviction with spill, address checks, bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvhead.core.spec import HeadPageSpec
from kvstore import HostArena, HostArenaConfig, PageKeys, prefix_hashes

SPEC = HeadPageSpec(num_q_heads=8, num_kv_heads=2, head_dim=8, page_size=4)


def arena(capacity: int = 8, spill=None, evict_fraction: float = 1 / 64) -> HostArena:
    cfg = HostArenaConfig(
        capacity_pages=capacity, num_layers=3, num_blocks=32, evict_fraction=evict_fraction
    )
    return HostArena(SPEC, cfg, spill=spill)


def pages(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, 4, 8, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 8, generator=g).to(torch.bfloat16)
    return k, v


def keys(layer: int, blocks: list[int], heads: list[int]) -> PageKeys:
    return PageKeys(layer, torch.tensor(blocks), torch.tensor(heads))


def test_put_get_round_trip_and_misses_are_zero():
    a = arena()
    k, v = pages(4)
    a.put(keys(1, [3, 3, 7, 9], [0, 1, 0, 1]), k, v)
    got = a.get(keys(1, [7, 3, 5, 3], [0, 1, 0, 0]))
    assert got.found.tolist() == [True, True, False, True]
    assert torch.equal(got.k[0], k[2]) and torch.equal(got.v[1], v[1])
    assert torch.equal(got.k[3], k[0])
    assert not got.k[2].any() and not got.v[2].any()
    assert not a.contains(keys(0, [3], [0])).item()  # another layer
    s = a.stats()
    assert (s.hits, s.misses, s.resident_pages) == (3, 1, 4)
    assert s.bytes_out == 3 * SPEC.head_page_bytes


def test_duplicate_keys_in_one_batch_last_write_wins():
    a = arena()
    k, v = pages(3)
    a.put(keys(0, [1, 1, 1], [0, 0, 0]), k, v)
    got = a.get(keys(0, [1], [0]))
    assert torch.equal(got.k[0], k[2]) and a.stats().resident_pages == 1


def test_lru_eviction_spills_the_least_recently_used_pages_with_their_data():
    spilled: list = []
    a = arena(capacity=4, spill=lambda kk, k, v: spilled.append((kk, k, v)))
    k, v = pages(6)
    a.put(keys(0, [0, 1], [0, 0]), k[:2], v[:2])
    a.put(keys(2, [2], [1]), k[2:3], v[2:3])
    a.put(keys(2, [3], [1]), k[3:4], v[3:4])  # LRU is per call: separate calls, distinct ages
    a.get(keys(0, [0], [0]))  # page (0, 0, 0) is now the most recent
    a.put(keys(1, [4, 5], [0, 1]), k[4:], v[4:])
    evicted = {
        (kk.layer, b, h)
        for kk, _, _ in spilled
        for b, h in zip(kk.block_ids.tolist(), kk.heads.tolist())
    }
    assert evicted == {(0, 1, 0), (2, 2, 1)}
    for kk, sk, sv in spilled:  # spilled bytes are the pages that were stored there
        src = {(0, 1, 0): 1, (2, 2, 1): 2}[(kk.layer, int(kk.block_ids[0]), int(kk.heads[0]))]
        assert torch.equal(sk[0], k[src]) and torch.equal(sv[0], v[src])
    assert a.contains(keys(0, [0, 1], [0, 0])).tolist() == [True, False]
    s = a.stats()
    assert (s.evictions, s.spilled, s.resident_pages) == (2, 2, 4)


def test_eviction_frees_a_batch_and_never_evicts_pages_being_overwritten():
    a = arena(capacity=8, evict_fraction=0.5)
    k, v = pages(9)
    a.put(keys(0, list(range(8)), [0] * 8), k[:8], v[:8])
    # overwrite block 0 and add block 8: only block 8 needs a slot, 4 LRU pages go at once
    a.put(keys(0, [0, 8], [0, 0]), k[7:9], v[7:9])
    assert a.stats().evictions == 4
    got = a.get(keys(0, [0, 8], [0, 0]))
    assert got.found.all() and torch.equal(got.k[0], k[7]) and torch.equal(got.k[1], k[8])


def test_prefix_mismatch_is_a_miss_so_a_reused_block_never_serves_old_data():
    a = arena()
    k, v = pages(1)
    old = prefix_hashes(torch.arange(4), 4)
    new = prefix_hashes(torch.arange(4) + 100, 4)
    a.put(PageKeys(0, torch.tensor([5]), torch.tensor([0]), old, torch.tensor([0])), k, v)
    asked_new = PageKeys(0, torch.tensor([5]), torch.tensor([0]), new, torch.tensor([0]))
    asked_old = PageKeys(0, torch.tensor([5]), torch.tensor([0]), old, torch.tensor([0]))
    assert not a.get(asked_new).found.item()
    assert a.get(asked_old).found.item()
    assert a.get(keys(0, [5], [0])).found.item()  # unnamed requests trust the block id


def test_delete_frees_slots_for_reuse():
    a = arena(capacity=2)
    k, v = pages(4)
    a.put(keys(0, [1, 2], [0, 0]), k[:2], v[:2])
    assert a.delete(keys(0, [1, 2, 3], [0, 0, 0])) == 2
    a.put(keys(0, [3, 4], [1, 1]), k[2:], v[2:])
    assert a.stats().evictions == 0 and a.get(keys(0, [3, 4], [1, 1])).found.all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda a, k, v: a.put(keys(3, [0], [0]), k[:1], v[:1]), "layer 3"),
        (lambda a, k, v: a.put(keys(0, [32], [0]), k[:1], v[:1]), "block ids"),
        (lambda a, k, v: a.get(keys(0, [0], [2])), "heads"),
        (lambda a, k, v: a.put(keys(0, [0], [0]), k[:1].float(), v[:1]), "bfloat16"),
        (lambda a, k, v: a.put(keys(0, [0, 1], [0, 0]), k[:1], v[:1]), r"\[2, 4, 8\]"),
        (
            lambda a, k, v: a.put(keys(0, list(range(9)), [0] * 9), *pages(9)),
            "exceeds the capacity",
        ),
    ],
)
def test_bad_input_raises_a_clear_value_error(bad, message):
    a = arena()
    k, v = pages(2)
    with pytest.raises(ValueError, match=message):
        bad(a, k, v)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "del"]), st.integers(0, 5), st.integers(0, 1)),
        min_size=1,
        max_size=40,
    )
)
def test_arena_agrees_with_a_dict_model(ops):
    """Whatever the arena keeps, it returns exactly what was last written there."""
    spilled: dict = {}
    a = arena(
        capacity=4,
        spill=lambda kk, k, v: spilled.update(
            {
                (kk.layer, b, h): (k[i], v[i])
                for i, (b, h) in enumerate(zip(kk.block_ids.tolist(), kk.heads.tolist()))
            }
        ),
    )
    model: dict = {}
    for step, (op, block, head) in enumerate(ops):
        key = keys(0, [block], [head])
        if op == "put":
            k, v = pages(1, seed=step)
            a.put(key, k, v)
            model[(0, block, head)] = (k[0], v[0])
        elif op == "del":
            a.delete(key)
            model.pop((0, block, head), None)
        else:
            got = a.get(key)
            if got.found.item():
                assert torch.equal(got.k[0], model[(0, block, head)][0])
    # everything written and not deleted is either resident or was spilled with its data
    for key, (k, v) in model.items():
        got = a.get(keys(*key[:1], [key[1]], [key[2]]))
        if got.found.item():
            assert torch.equal(got.k[0], k) and torch.equal(got.v[0], v)
        else:
            assert torch.equal(spilled[key][0], k)
    assert a.stats().resident_pages <= 4
