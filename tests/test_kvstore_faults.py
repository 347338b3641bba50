"""Failure semantics against real redis-server processes: Redis is a cache, never a dependency.

CI runs this file three times in a row; every test starts its own servers on free ports.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

import redis
import torch
from redis_server import RedisServer, free_port, running_redis

from kvhead.core.spec import HeadPageSpec
from kvstore import (
    HostArenaConfig,
    KVStoreConfig,
    PageKeys,
    RedisTier,
    RedisTierConfig,
    TierManagerConfig,
    build_store,
    prefix_hashes,
)

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "0badc0de0badc0de"
FAST = {"retry_after_s": 0.2, "socket_timeout_s": 0.5, "connect_timeout_s": 0.2}


def step_batch(step: int, n: int = 8) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    """Pages of one request step: deterministic content, distinct addresses per step."""
    g = torch.Generator().manual_seed(step)
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    pages = torch.arange(n) // 2
    prefix = prefix_hashes(torch.arange(4 * n) + 1000 * step, 4)[pages]
    blocks = (torch.arange(n) // 2 + 4 * step) % 64
    return PageKeys(step % 2, blocks, torch.arange(n) % 2, prefix, pages), k, v


def store(url: str, capacity: int = 64):
    cfg = KVStoreConfig(
        host=HostArenaConfig(capacity_pages=capacity, num_layers=2, num_blocks=64),
        redis=RedisTierConfig(url=url, **FAST),
        manager=TierManagerConfig(),
    )
    return build_store(cfg, SPEC, FP)


def published(s, keys, k, v) -> bool:
    """Put through the manager, wait for write-behind, and check Redis has every page."""
    s.put(keys, k, v)
    return s.flush(5) and bool(s.shared.contains(keys).all())


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_unreachable_at_start_runs_on_the_host_tier_and_says_so(caplog):
    port = free_port()
    with caplog.at_level(logging.WARNING):
        s = store(f"redis://127.0.0.1:{port}/0")
    assert "host tier only" in caplog.text and f"127.0.0.1:{port}" in caplog.text
    keys, k, v = step_batch(0)
    assert s.put(keys, k, v).all()
    got = s.get(keys)
    assert got.found.all() and torch.equal(got.k, k)
    # Redis appears later: the tier reconnects and published pages land there
    server = RedisServer(port=port).start()
    try:
        keys2, k2, v2 = step_batch(1)
        assert wait_until(lambda: published(s, keys2, k2, v2))
        assert not s.shared.is_down
    finally:
        s.close()
        server.cleanup()


def test_redis_killed_mid_workload_every_request_completes_and_it_reconnects(caplog):
    server = RedisServer().start()
    s = store(server.url, capacity=16)  # small arena: spills and promotions hit Redis
    truth: dict[int, tuple] = {}
    served_wrong = 0
    try:
        with caplog.at_level(logging.WARNING):
            for step in range(60):
                if step == 20:
                    server.kill()
                if step == 40:
                    server.start()
                keys, k, v = step_batch(step)
                s.put(keys, k, v)
                truth[step] = (k, v)
                # re-read an older step: from the host, from Redis, or a miss (recompute)
                old = step // 2
                got = s.get(step_batch(old)[0])
                ok = got.found
                served_wrong += int((got.k[ok] != truth[old][0][ok]).any())
                served_wrong += int((got.v[ok] != truth[old][1][ok]).any())
        assert served_wrong == 0
        assert "unavailable" in caplog.text
        assert s.shared.stats().errors > 0
        # back up: new pages reach Redis again and a fresh replica can read them
        keys, k, v = step_batch(99)
        assert wait_until(lambda: published(s, keys, k, v))
        assert "reachable again" in caplog.text
        other = RedisTier(SPEC, RedisTierConfig(url=server.url, **FAST), FP)
        got = other.get(keys)
        assert got.found.all() and torch.equal(got.k, k)
    finally:
        s.close()
        server.cleanup()


def test_corrupt_or_foreign_pages_are_detected_dropped_counted_never_used(redis_srv):
    t = RedisTier(SPEC, RedisTierConfig(url=redis_srv.url, **FAST), FP)
    keys, k, v = step_batch(3)
    t.put(keys, k, v)
    raw = redis.Redis.from_url(redis_srv.url)
    names = t.key_names(keys)
    flipped = bytearray(raw.get(names[2]))
    flipped[len(flipped) // 2] ^= 0x01
    raw.set(names[2], bytes(flipped))
    raw.set(names[5], raw.get(names[6]))  # a valid page stored under the wrong key
    raw.set(names[7], b"\x80\x04garbage")
    got = t.get(keys)
    assert got.found.tolist() == [True, True, False, True, True, False, True, False]
    assert not got.k[2].any() and torch.equal(got.k[3], k[3])
    assert t.stats().corrupt == 3
    assert raw.exists(names[2], names[5], names[7]) == 0  # repaired: the next writer refills


def test_out_of_memory_is_refused_writes_and_misses_never_errors():
    with running_redis("--maxmemory", "2mb", "--maxmemory-policy", "noeviction") as server:
        t = RedisTier(
            SPEC, RedisTierConfig(url=server.url, ttl_seconds=None, pipeline_depth=3, **FAST), FP
        )  # refusals start mid-batch, too
        stored_all = []
        for step in range(400):  # ~8 MB of pages into 2 MB
            keys, k, v = step_batch(step, n=8)
            stored_all.append(t.put(keys, k, v))
        stored = torch.cat(stored_all)
        assert 0 < int(stored.sum()) < len(stored)
        assert t.stats().put_failures == len(stored) - int(stored.sum())
        assert not t.is_down and t.stats().errors == 0  # OOM is a refusal, not an outage
        for step in range(0, 400, 3):  # exactly the pages it took are there (noeviction)
            keys, k, _ = step_batch(step, n=8)
            got = t.get(keys)
            assert torch.equal(got.found, stored_all[step])
            assert torch.equal(got.k[got.found], k[got.found])


def test_evicting_redis_gives_misses_and_only_exact_pages():
    with running_redis("--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru") as server:
        t = RedisTier(SPEC, RedisTierConfig(url=server.url, **FAST), FP)
        for step in range(400):
            t.put(*step_batch(step, n=8))
        found = 0
        for step in range(0, 400, 7):
            keys, k, _ = step_batch(step, n=8)
            got = t.get(keys)
            assert torch.equal(got.k[got.found], k[got.found])
            found += int(got.found.sum())
        assert 0 < found < 8 * len(range(0, 400, 7))
        s = t.stats()
        assert s.misses > 0 and s.corrupt == 0 and s.errors == 0


def test_two_writers_of_one_page_readers_see_one_complete_version(redis_srv):
    keys, k_a, v_a = step_batch(5)
    _, k_b, v_b = step_batch(6)  # the same addresses, another content
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(k, v):
        t = RedisTier(SPEC, RedisTierConfig(url=redis_srv.url, **FAST), FP)
        try:
            while not stop.is_set():
                t.put(keys, k, v)
        except BaseException as exc:  # noqa: BLE001  (surfaced by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=kv) for kv in ((k_a, v_a), (k_b, v_b))]
    for th in threads:
        th.start()
    reader = RedisTier(SPEC, RedisTierConfig(url=redis_srv.url, **FAST), FP)
    seen = {"a": 0, "b": 0}
    try:
        deadline = time.monotonic() + 3.0
        while time.monotonic() < deadline:
            got = reader.get(keys)
            for i in got.found.nonzero().flatten().tolist():
                is_a = torch.equal(got.k[i], k_a[i]) and torch.equal(got.v[i], v_a[i])
                is_b = torch.equal(got.k[i], k_b[i]) and torch.equal(got.v[i], v_b[i])
                assert is_a or is_b, "a torn page was served"
                seen["a" if is_a else "b"] += 1
    finally:
        stop.set()
        for th in threads:
            th.join()
    assert not errors and reader.stats().corrupt == 0
    assert seen["a"] > 0 and seen["b"] > 0


def test_a_redis_that_stops_answering_times_out_into_misses_never_a_hang():
    """SIGSTOP: connections stay open and no reply ever comes. Each call waits at most the
    socket timeout, then the tier is down (misses at once) until Redis answers again."""
    server = RedisServer().start()
    assert server.proc is not None
    t = RedisTier(SPEC, RedisTierConfig(url=server.url, pipeline_depth=3, **FAST), FP)
    keys, k, v = step_batch(7)
    try:
        assert t.put(keys, k, v).all()
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.monotonic()
            assert not t.get(keys).found.any()
            assert not t.put(*step_batch(8)).any()
            assert time.monotonic() - start < 2 * FAST["socket_timeout_s"]
            assert t.is_down and t.stats().errors == 1
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert wait_until(lambda: bool(t.get(keys).found.all()))
        assert torch.equal(t.get(keys).k, k) and not t.is_down
    finally:
        server.cleanup()
