"""Redis tier against a real redis-server: round trip, naming, TTL, auth, TLS, memory budget."""

from __future__ import annotations

import logging

import pytest
import redis
import torch
from redis_server import RedisServer, redis_srv, running_redis  # noqa: F401  (fixture)

from kvhead.spec import HeadPageSpec
from kvstore import PageKeys, RedisTier, RedisTierConfig, prefix_hashes, prefix_hex

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "feedfacecafe0001"


def batch(n: int, layer: int = 1, seed: int = 0) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    pages = torch.arange(n) // 2
    keys = PageKeys(layer, torch.arange(n), torch.arange(n) % 2,
                    prefix_hashes(torch.arange(4 * n) + seed, 4)[pages], pages)
    return keys, k, v


def tier(server: RedisServer, **kw) -> RedisTier:
    return RedisTier(SPEC, RedisTierConfig(url=server.url, pipeline_depth=7, **kw), FP)


def test_round_trip_in_pipelined_batches(redis_srv):
    t = tier(redis_srv)
    keys, k, v = batch(50)
    assert t.put(keys, k, v).all()
    got = t.get(keys)
    assert got.found.all() and torch.equal(got.k, k) and torch.equal(got.v, v)
    assert t.contains(keys).all()
    assert t.delete(keys.select(torch.arange(10))) == 10
    assert t.contains(keys).sum() == 40
    s = t.stats()
    assert (s.puts, s.hits, s.corrupt, s.errors) == (50, 50, 0, 0)
    assert s.bytes_in == 50 * SPEC.head_page_bytes and s.mean_latency("get") > 0


def test_keys_are_namespaced_by_model_prefix_layer_head_page_and_expire(redis_srv):
    t = tier(redis_srv, ttl_seconds=120)
    keys, k, v = batch(4, layer=3)
    t.put(keys, k, v)
    raw = redis.Redis.from_url(redis_srv.url)
    names = sorted(x.decode() for x in raw.keys("*"))
    want = sorted(f"{FP}:{h}:3:{head}:{page}" for h, head, page in
                  zip(prefix_hex(keys.prefix), keys.heads.tolist(), keys.pages.tolist()))
    assert names == want
    assert 0 < raw.pttl(names[0]) <= 120_000
    assert not raw.get(names[0]).startswith(b"\x80")  # not a pickle: our magic instead
    assert raw.get(names[0])[:4] == b"KVHP"


def test_rows_without_a_content_address_are_not_stored(redis_srv):
    t = tier(redis_srv)
    keys, k, v = batch(3)
    local = PageKeys(1, keys.block_ids, keys.heads)
    assert not t.put(local, k, v).any()
    assert not t.get(local).found.any() and not t.contains(local).any()
    assert redis.Redis.from_url(redis_srv.url).dbsize() == 0


def test_password_protected_server(caplog):
    with running_redis(password="s3cret") as server:
        keys, k, v = batch(4)
        assert tier(server).put(keys, k, v).all()  # password in the URL
        url_without = f"redis://127.0.0.1:{server.port}/0"
        with_field = RedisTier(SPEC, RedisTierConfig(url=url_without, password="s3cret"), FP)
        assert with_field.get(keys).found.all()
        with caplog.at_level(logging.WARNING):
            wrong = RedisTier(SPEC, RedisTierConfig(url=url_without, password="nope"), FP)
        assert not wrong.available and not wrong.get(keys).found.any()
        assert wrong.stats().errors >= 1


def test_tls_server():
    with running_redis(tls=True) as server:
        t = tier(server, ssl_ca_certs=server.ca_file)
        assert t.available
        keys, k, v = batch(6)
        assert t.put(keys, k, v).all()
        got = t.get(keys)
        assert got.found.all() and torch.equal(got.v, v)


def test_memory_budget_is_applied_at_connect(redis_srv):
    tier(redis_srv, memory_budget_bytes=64 * 2**20)
    raw = redis.Redis.from_url(redis_srv.url)
    assert int(raw.config_get("maxmemory")["maxmemory"]) == 64 * 2**20
    assert raw.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"


def test_bad_config_is_a_clear_error():
    with pytest.raises(ValueError, match="redis url must start"):
        from kvstore import HostArenaConfig, KVStoreConfig
        KVStoreConfig(host=HostArenaConfig(capacity_pages=1, num_layers=1, num_blocks=1),
                      redis=RedisTierConfig(url="http://localhost"))
