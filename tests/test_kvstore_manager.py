"""Tier manager over a real Redis: spill, promote, write-behind, prefetch, prefix matching."""

from __future__ import annotations

import signal

import torch

from kvhead.core.spec import HeadPageSpec
from kvstore import (
    HostArena,
    HostArenaConfig,
    KVStoreConfig,
    PageKeys,
    RedisTierConfig,
    TierManager,
    TierManagerConfig,
    build_store,
    prefix_hashes,
)

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "5eed5eed5eed5eed"


def request(seed: int, num_pages: int, layer: int = 0, first_block: int = 0):
    """All heads of ``num_pages`` pages of one prompt: keys, k, v (rows page-major)."""
    g = torch.Generator().manual_seed(seed)
    n = num_pages * SPEC.num_kv_heads
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    pages = torch.arange(num_pages).repeat_interleave(SPEC.num_kv_heads)
    tokens = torch.arange(4 * num_pages) + 10_000 * seed
    keys = PageKeys(
        layer,
        pages + first_block,
        torch.arange(SPEC.num_kv_heads).repeat(num_pages),
        prefix_hashes(tokens, 4)[pages],
        pages,
    )
    return keys, k, v


def make(url: str, capacity: int, **manager) -> TierManager:
    cfg = KVStoreConfig(
        host=HostArenaConfig(capacity_pages=capacity, num_layers=2, num_blocks=256),
        redis=RedisTierConfig(url=url, retry_after_s=0.2),
        manager=TierManagerConfig(**manager),
    )
    return build_store(cfg, SPEC, FP)


def test_full_arena_spills_to_redis_and_lookups_promote_back(redis_srv):
    s = make(redis_srv.url, capacity=16, publish_on_put=False)
    try:
        first = request(1, 8)  # 16 pages: fills the arena
        s.put(*first)
        second = request(2, 8, first_block=8)
        s.put(*second)  # evicts the first request's pages into Redis
        assert s.flush(10)
        assert s.arena.contains(first[0]).sum() < 16
        got = s.get(first[0])
        assert got.found.all() and torch.equal(got.k, first[1]) and torch.equal(got.v, first[2])
        assert s.arena.contains(first[0]).all()  # promoted, spilling the second request
        assert s.flush(10)
        host, shared = s.tier_stats()
        assert host.spilled > 0 and shared.puts == host.spilled and shared.hits > 0
        assert s.stats().hits == 16
    finally:
        s.close()


def test_unnamed_pages_evicted_without_an_address_are_counted_as_lost(redis_srv):
    s = make(redis_srv.url, capacity=4)
    try:
        keys, k, v = request(3, 4)
        local = PageKeys(0, keys.block_ids, keys.heads)
        half = torch.arange(4)
        s.put(local.select(half), k[:4], v[:4])
        s.put(local.select(half + 4), k[4:], v[4:])
        assert s.stats().put_failures == 4  # 8 pages into 4 slots: 4 had nowhere to go
        assert s.get(local).found.sum() == 4
    finally:
        s.close()


def test_write_behind_drops_instead_of_blocking_when_the_queue_is_full(redis_srv):
    s = make(redis_srv.url, capacity=256, write_queue_pages=8)
    try:
        # Freeze Redis while putting, so the writer is stuck on its first batch however fast the
        # machine is: the 8-page queue then must overflow (only for milliseconds, far below any
        # socket timeout, so nothing else changes).
        redis_srv.proc.send_signal(signal.SIGSTOP)
        try:
            for seed in range(20):
                s.put(*request(seed, 4))  # 8 pages per put, a queue of 8: some must drop
        finally:
            redis_srv.proc.send_signal(signal.SIGCONT)
        assert s.flush(10)
        dropped = s.stats().put_failures
        assert dropped > 0
        assert s.tier_stats()[1].puts + dropped == 20 * 8
    finally:
        s.close()


def test_second_replica_matches_prefix_and_prefetches_pages(redis_srv):
    a = make(redis_srv.url, capacity=64)
    b = make(redis_srv.url, capacity=64)
    try:
        for layer in range(2):
            a.put(*request(7, 6, layer=layer))
        assert a.flush(10)
        prefix = prefix_hashes(torch.arange(4 * 6) + 70_000, 4)
        assert b.match_prefix(prefix, num_layers=2) == 6
        other = prefix.clone()
        other[4] += 1  # a prompt that diverges in page 4
        assert b.match_prefix(other, num_layers=2) == 4
        assert b.match_prefix(prefix, num_layers=3) == 0  # layer 2 was never written
        keys, k, v = request(7, 6, layer=1, first_block=100)  # b's own block ids
        assert b.prefetch(keys).result(timeout=10).all()
        assert b.arena.contains(keys).all()
        got = b.arena.get(keys)
        assert torch.equal(got.k, k) and torch.equal(got.v, v)
    finally:
        a.close()
        b.close()


def test_host_only_manager_needs_no_redis():
    arena = HostArena(SPEC, HostArenaConfig(capacity_pages=8, num_layers=1, num_blocks=16))
    s = TierManager(arena, None)
    keys, k, v = request(4, 2)
    s.put(keys, k, v)
    assert s.get(keys).found.all() and s.prefetch(keys).result().all()
    assert s.match_prefix(keys.prefix, 1) == 0 and not s.supports_shared_keys()
    assert s.delete(keys) == 4 and not s.contains(keys).any()
    s.close()
