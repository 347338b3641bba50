"""Redis tier against a real redis-server: round trip, naming, TTL, auth, TLS, memory budget."""

from __future__ import annotations

import logging

import pytest
import redis
import torch
from redis_server import RedisServer, running_redis

from kvhead.core.spec import HeadPageSpec
from kvstore import PageKeys, RedisTier, RedisTierConfig, prefix_hashes, prefix_hex

SPEC = HeadPageSpec(num_q_heads=4, num_kv_heads=2, head_dim=16, page_size=4)
FP = "feedfacecafe0001"


def batch(n: int, layer: int = 1, seed: int = 0) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    pages = torch.arange(n) // 2
    keys = PageKeys(
        layer,
        torch.arange(n),
        torch.arange(n) % 2,
        prefix_hashes(torch.arange(4 * n) + seed, 4)[pages],
        pages,
    )
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
    want = sorted(
        f"{FP}:{h}:3:{head}:{page}"
        for h, head, page in zip(prefix_hex(keys.prefix), keys.heads.tolist(), keys.pages.tolist())
    )
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

        KVStoreConfig(
            host=HostArenaConfig(capacity_pages=1, num_layers=1, num_blocks=1),
            redis=RedisTierConfig(url="http://localhost"),
        )


def test_any_key_order_and_width_gives_exact_names_values_and_misses(redis_srv):
    """Commands are built per key text width and sent in width order: names, values, duplicate
    writes and partial hits must be exactly what one command per page in batch order gives."""
    spec = HeadPageSpec(num_q_heads=16, num_kv_heads=16, head_dim=16, page_size=4)
    t = RedisTier(spec, RedisTierConfig(url=redis_srv.url, pipeline_depth=5), FP)
    g = torch.Generator().manual_seed(7)
    n = 37
    perm = torch.randperm(n, generator=g)
    pages = torch.tensor([12345, -3, 0, 9, 10, 99, 100, 7, 1000, 55] * 4)[:n]
    keys = PageKeys(
        11,
        torch.arange(n),
        torch.randint(0, 16, (n,), generator=g)[perm],
        prefix_hashes(torch.arange(4 * n), 4)[perm],
        pages[perm],
    )
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    assert t.put(keys, k, v).all()
    raw = redis.Redis.from_url(redis_srv.url)
    assert sorted(x.decode() for x in raw.keys("*")) == sorted(t.key_names(keys))
    got = t.get(keys)
    assert got.found.all() and torch.equal(got.k, k) and torch.equal(got.v, v)

    twice = keys.select(torch.tensor([3, 3]))  # one key written twice in one batch: last wins
    assert t.put(twice, torch.stack([k[0], k[1]]), torch.stack([v[0], v[1]])).all()
    assert torch.equal(t.get(keys.select(torch.tensor([3]))).k[0], k[1])

    gone = torch.tensor([0, 4, 5, 9, n - 1])
    assert t.delete(keys.select(gone)) == len(gone)
    got = t.get(keys)
    present = ~torch.isin(torch.arange(n), gone)
    present[3] = False  # rewritten above with other K/V: compared separately
    assert torch.equal(got.found, ~torch.isin(torch.arange(n), gone))
    assert torch.equal(got.k[present], k[present]) and torch.equal(got.v[present], v[present])
    assert not got.k[gone].any() and t.stats().corrupt == 0


def test_a_miss_at_the_end_of_a_pipelined_chunk_is_not_waited_for(redis_srv):
    """A nil as the last reply of an MGET makes the reply shorter than a full one: the reader
    must notice from the framing instead of waiting for bytes that never come (a timeout
    would turn the whole call into misses)."""
    t = tier(redis_srv)  # depth 7
    keys, k, v = batch(14)
    assert t.put(keys, k, v).all()
    gone = torch.tensor([6, 13])  # last key of each chunk
    assert t.delete(keys.select(gone)) == 2
    got = t.get(keys)
    want = ~torch.isin(torch.arange(14), gone)
    assert torch.equal(got.found, want) and torch.equal(got.k[want], k[want])
    assert not t.is_down and t.stats().errors == 0


def numbered(n: int) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    """``n`` pages numbered 0..n-1 (one-digit page numbers end their key names)."""
    g = torch.Generator().manual_seed(n)
    k = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    v = torch.randn(n, 4, 16, generator=g).to(torch.bfloat16)
    pages = torch.arange(n)
    return (
        PageKeys(
            0, pages, torch.zeros(n, dtype=torch.long), prefix_hashes(torch.arange(4 * n), 4), pages
        ),
        k,
        v,
    )


def test_unexpected_replies_mid_batch_cost_their_chunk_only(redis_srv):
    """Replies the compiled loop does not know stop it before the next chunk is sent; hiredis
    and the numpy codec take that chunk and the loop resumes with the next. Chunk 1 of 3 here:
    a user who may not write pages 3-5 gets NOPERM for them, and a value of another size
    there is a corrupt page; chunks 0 and 2 are exact both ways."""
    raw = redis.Redis.from_url(redis_srv.url)
    raw.execute_command("ACL", "SETUSER", "writer", "on", ">pw", "+@all", "%R~*", "%W~*:[012678]")
    t = RedisTier(
        SPEC,
        RedisTierConfig(url=redis_srv.url, pipeline_depth=3, username="writer", password="pw"),
        FP,
    )
    keys, k, v = numbered(9)
    middle = torch.isin(torch.arange(9), torch.tensor([3, 4, 5]))
    assert torch.equal(t.put(keys, k, v), ~middle)
    assert not t.is_down and t.stats().put_failures == 3
    got = t.get(keys)
    assert torch.equal(got.found, ~middle) and torch.equal(got.k[~middle], k[~middle])

    raw.execute_command("ACL", "SETUSER", "writer", "%W~*")
    assert t.put(keys, k, v).all()
    raw.set(t.key_names(keys)[4], b"another size")
    got = t.get(keys)
    assert got.found.tolist() == [True] * 4 + [False] + [True] * 4
    assert torch.equal(got.v[4 != torch.arange(9)], v[4 != torch.arange(9)])
    assert t.stats().corrupt == 1 and t.stats().errors == 0
