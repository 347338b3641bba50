"""Prometheus export of the kvstore tiers (kvstore/metrics.py), scraped over real HTTP while a
small workload runs against a real redis-server; every number is checked against the workload."""

from __future__ import annotations

import urllib.request

import redis
import torch
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from redis_server import running_redis

from kvhead.core.spec import HeadPageSpec
from kvstore import (
    HostArenaConfig,
    KVStoreConfig,
    PageKeys,
    RedisTierConfig,
    TierManagerConfig,
    build_store,
    prefix_hashes,
)
from kvstore.metrics import KVStoreCollector, serve_metrics

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "3e7e3e7e3e7e3e7e"


def request(
    seed: int, num_pages: int, first_block: int = 0
) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = num_pages * SPEC.num_kv_heads
    pages = torch.arange(num_pages).repeat_interleave(SPEC.num_kv_heads)
    keys = PageKeys(
        0,
        pages + first_block,
        torch.arange(SPEC.num_kv_heads).repeat(num_pages),
        prefix_hashes(torch.arange(4 * num_pages) + 1000 * seed, 4)[pages],
        pages,
    )
    return (
        keys,
        torch.randn(n, 4, 16, generator=g).to(torch.bfloat16),
        torch.randn(n, 4, 16, generator=g).to(torch.bfloat16),
    )


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: dict, name: str, tier: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"tier": tier, **labels}.items())))]


def test_scraped_metrics_match_a_real_redis_workload():
    with running_redis() as server:
        store = build_store(
            KVStoreConfig(
                host=HostArenaConfig(capacity_pages=64, num_layers=1, num_blocks=64),
                redis=RedisTierConfig(url=server.url, retry_after_s=30),
                manager=TierManagerConfig(publish_on_put=True),
            ),
            SPEC,
            FP,
        )
        registry = CollectorRegistry()
        registry.register(KVStoreCollector.for_manager(store))
        http = serve_metrics(registry, "127.0.0.1", 0)
        try:
            keys, k, v = request(1, 8)  # 16 pages
            store.put(keys, k, v)
            assert store.flush(10)
            assert store.get(keys).found.all()  # 16 host hits
            unknown = request(2, 3, first_block=8)[0]  # 6 pages nobody wrote
            assert not store.get(unknown).found.any()  # host and Redis misses
            page_bytes = SPEC.head_page_bytes
            raw = redis.Redis.from_url(server.url)
            name = store.shared.key_names(keys)[5]
            raw.set(name, b"KVHP" + b"\0" * 100)  # a foreign value under one of our names
            got = store.shared.get(keys)  # straight from Redis: 15 good, 1 dropped
            assert int(got.found.sum()) == 15

            up = scrape(http.port)
            assert value(up, "kvhead_kvstore_puts_total", "host") == 16
            assert value(up, "kvhead_kvstore_puts_total", "redis") == 16
            assert value(up, "kvhead_kvstore_stored_bytes_total", "redis") == 16 * page_bytes
            assert value(up, "kvhead_kvstore_spilled_pages_total", "manager") == 16
            assert value(up, "kvhead_kvstore_hits_total", "host") == 16
            assert value(up, "kvhead_kvstore_hits_total", "manager") == 16
            assert value(up, "kvhead_kvstore_misses_total", "manager") == 6
            assert value(up, "kvhead_kvstore_hits_total", "redis") == 15
            assert value(up, "kvhead_kvstore_misses_total", "redis") == 6 + 1
            assert value(up, "kvhead_kvstore_served_bytes_total", "redis") == 15 * page_bytes
            assert value(up, "kvhead_kvstore_corrupt_pages_total", "redis") == 1
            assert value(up, "kvhead_kvstore_capacity_pages", "host") == 64
            assert value(up, "kvhead_kvstore_resident_pages", "host") == 16
            assert value(up, "kvhead_kvstore_up", "redis") == 1
            assert value(up, "kvhead_kvstore_operation_seconds_count", "host", op="get") == 2
            assert value(up, "kvhead_kvstore_operation_seconds_count", "redis", op="get") == 2
            assert value(up, "kvhead_kvstore_operation_seconds_sum", "redis", op="get") > 0
            assert value(up, "kvhead_kvstore_errors_total", "redis") == 0
            assert not raw.exists(name)  # the corrupt page was deleted

            server.kill()
            assert not store.shared.get(keys).found.any()  # nothing raises: misses
            down = scrape(http.port)
            assert value(down, "kvhead_kvstore_up", "redis") == 0
            assert value(down, "kvhead_kvstore_up", "host") == 1
            assert value(down, "kvhead_kvstore_errors_total", "redis") == 1
            assert value(down, "kvhead_kvstore_misses_total", "redis") == 7 + 16
        finally:
            http.close()
            store.close()
