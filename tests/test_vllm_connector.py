"""The kvhead KV connector in the real engine: one replica's prompt pages skip another's prefill,
and no Redis fault fails a request or changes a token.

Every run is a fresh engine process (``kvhead.vllm.generate``) sharing one real redis-server;
"cold" is the same engine without the connector. The tiny model has two layers whose two KV
heads split one dense, one stable, so a load must fill vLLM's cache and the host arena both.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
import torch
from redis_server import RedisServer
from vllm_tiny import ENGINE_ENV, random_profile

from kvhead.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
SHARED, PAGE = 256, 16  # a shared 256-token document, 16-token pages


def _generate(
    tmp: Path, name: str, setup: dict, redis_url: str | None, **popen
) -> subprocess.Popen | dict:
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "kvhead.vllm.generate",
        str(setup["model"]),
        str(setup["prompts"]),
        str(out),
        "--kvhead",
        str(setup["settings"]),
        "--block-size",
        str(PAGE),
        "--kv-cache-bytes",
        str(16 * 2**20),
        "--max-model-len",
        "512",
        "--dtype",
        "float32",
        "--max-tokens",
        "12",
        "--one-by-one",
        "--in-process",
        "--min-match-tokens",
        "64",
    ]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    if popen:
        return subprocess.Popen(cmd, env=ENGINE_ENV, text=True, **popen)
    proc = subprocess.run(cmd, env=ENGINE_ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny model, prompts that share a document (and one that does not), a cold run."""
    tmp = tmp_path_factory.mktemp("connector")
    model = build_tiny_llama(tmp / "tiny")
    g = torch.Generator().manual_seed(5)
    doc = torch.randint(3, 500, (SHARED,), generator=g).tolist()
    tails = [torch.randint(3, 500, (n,), generator=g).tolist() for n in (9, 40, 3)]
    other = torch.randint(3, 500, (200,), generator=g).tolist()
    prompts = [doc + tails[0], doc + tails[1], other, doc + tails[2]]
    (tmp / "prompts.json").write_text(json.dumps(prompts))
    profile = random_profile(model, tmp / "profile.json", 2, 2, fraction=0.5)
    settings = {"profile": str(profile), "top_k": 2, "rerank_interval": 4, "page_size": PAGE}
    (tmp / "settings.json").write_text(json.dumps(settings))
    s = {
        "tmp": tmp,
        "model": model,
        "prompts": tmp / "prompts.json",
        "settings": tmp / "settings.json",
    }
    s["cold"] = _generate(tmp, "cold", s, None)
    return s


def _same(run: dict, cold: dict) -> None:
    assert run["tokens"] == cold["tokens"]
    for got, want in zip(run["logprobs"], cold["logprobs"], strict=True):
        assert got == pytest.approx(want, abs=1e-4)


def test_second_replica_loads_what_the_first_served(setup: dict, redis_srv: RedisServer) -> None:
    first = _generate(setup["tmp"], "first", setup, redis_srv.url)
    second = _generate(setup["tmp"], "second", setup, redis_srv.url)
    _same(first, setup["cold"])
    _same(second, setup["cold"])
    a, b = first["kvhead"]["connector"], second["kvhead"]["connector"]
    # the first replica reuses its own document for prompts 2 and 4; the second loads all four
    # prompts' full pages but the last token's
    assert a["loads"] == 2 and a["load_failures"] == 0
    assert a["loaded_tokens"] == 2 * SHARED
    assert b["loads"] == 4 and b["load_failures"] == 0
    assert b["loaded_tokens"] == SHARED + (SHARED + 40 - 1) // PAGE * PAGE + 192 + SHARED
    assert a["saves"] == 3 and a["save_failures"] == 0  # prompt 4 has no page beyond the load
    assert b["saves"] == 0 and b["save_failures"] == 0
    # every layer x head of a page is its own key, plus one chain marker per page: the document
    # chain's 18 pages (prompt 2's) and the other prompt's 12
    keys = redis.Redis.from_url(redis_srv.url).dbsize()
    assert keys == (18 + 12) * (2 * 2 + 1)


def test_corrupt_and_foreign_pages_are_recomputed(setup: dict, redis_srv: RedisServer) -> None:
    _generate(setup["tmp"], "seed", setup, redis_srv.url)
    client = redis.Redis.from_url(redis_srv.url)
    names = sorted(n.decode() for n in client.keys("*:0:0:3"))  # layer 0, head 0, page 3
    assert names
    for name in names:  # one flipped byte in the payload, one layer-1 page under a layer-0 name
        value = bytearray(client.get(name))
        value[-7] ^= 0xFF
        client.set(name, bytes(value))
    for name in sorted(n.decode() for n in client.keys("*:0:1:5")):
        client.set(name, client.get(name.replace(":0:1:5", ":1:1:5")))
    run = _generate(setup["tmp"], "corrupt", setup, redis_srv.url)
    _same(run, setup["cold"])
    c = run["kvhead"]["connector"]
    assert c["load_failures"] >= 1  # refused by checksum or header, recomputed, then repaired


def test_redis_down_at_start_serves_cold(setup: dict, redis_srv: RedisServer) -> None:
    _generate(setup["tmp"], "before", setup, redis_srv.url)
    redis_srv.kill()
    run = _generate(setup["tmp"], "down", setup, redis_srv.url)
    _same(run, setup["cold"])
    c = run["kvhead"]["connector"]
    assert c["loads"] == 0 and c["saves"] == 0 and c["save_failures"] >= 1


@pytest.mark.parametrize("fault", ["kill", "sigstop"])
def test_redis_fault_mid_run_fails_nothing(setup: dict, redis_srv: RedisServer, fault: str) -> None:
    _generate(setup["tmp"], f"warm-{fault}", setup, redis_srv.url)
    client = redis.Redis.from_url(redis_srv.url)
    base = int(client.info("stats")["keyspace_hits"])
    proc = _generate(
        setup["tmp"],
        f"fault-{fault}",
        setup,
        redis_srv.url,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    # strike once the engine has read pages (its first load), while it still has prompts to go
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if int(client.info("stats")["keyspace_hits"]) > base:
            break
        time.sleep(0.05)
    if fault == "kill":
        redis_srv.kill()
    else:
        os.kill(redis_srv.proc.pid, signal.SIGSTOP)
        threading.Timer(5.0, os.kill, (redis_srv.proc.pid, signal.SIGCONT)).start()
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run = json.loads((setup["tmp"] / f"fault-{fault}.json").read_text())
    _same(run, setup["cold"])


def test_redis_out_of_memory_refuses_saves(setup: dict) -> None:
    server = RedisServer("--maxmemory", "1mb", "--maxmemory-policy", "noeviction").start()
    try:
        run = _generate(setup["tmp"], "oom", setup, server.url)
        _same(run, setup["cold"])
        c = run["kvhead"]["connector"]
        assert c["save_failures"] >= 1 and c["load_failures"] == 0
    finally:
        server.stop()
