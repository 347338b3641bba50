"""Ordinary traffic through the real engine: no request mix may fail a request or the engine.

A seeded mix (kvhead.vllm.request_mix) of SmolLM2 requests from 1 token to the engine's
limit (page edges included), chat and completion prompts, 1 to 48 new tokens, stop strings,
n = 2, clients that hang up mid-stream, bursts of arrivals, chunked prefill and a block count
small enough that vLLM preempts, plus one prompt beyond the limit. With every page selected
kvhead's tokens equal stock vLLM's request by request (both recomputing preempted requests); with
the paper's and the accurate settings every request is served; and a request's greedy output is
its own, whether it runs beside the mix (preempted or not: the KV connector swaps a preempted
request's context out and back) or alone on a fresh engine.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from dataclasses import asdict
from pathlib import Path

import pytest
from redis_server import RedisServer
from vllm_tiny import ENGINE_ENV, free_port, wait_ready

from kvhead.vllm.request_mix import (
    TOO_LONG,
    MixRequest,
    build_mix,
    compare,
    replay_in_subprocess,
    served,
)

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
# the presets as served (the server test) and with K scaled to the mix's 512-token context
# (32 pages), so that stable heads skip pages there
PRESETS = {"paper": {"preset": "paper"}, "accurate": {"preset": "accurate"}}
MIX_TOP_K = {"paper": 8, "accurate": 16}
MAX_LEN = 512
COUNT = 120


def replay(
    tmp: Path, name: str, model: Path, mix: list[MixRequest], kvhead: dict | None, **options
) -> dict:
    """Replay ``mix`` in a fresh engine process; fails the test if the engine died."""
    workdir = tmp / name
    workdir.mkdir(exist_ok=True)
    report = replay_in_subprocess(
        model, mix, kvhead, workdir, env=ENGINE_ENV, timeout=1800, max_model_len=MAX_LEN, **options
    )
    assert report["error"] is None, report["error"]
    return report


@pytest.fixture(scope="module")
def mix(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from transformers import AutoTokenizer

    from kvhead.models.resolve import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    requests = build_mix(AutoTokenizer.from_pretrained(model), COUNT, MAX_LEN, seed=7)
    return {"tmp": tmp_path_factory.mktemp("mix"), "model": model, "mix": requests}


def _check_served(mix: list[MixRequest], report: dict) -> None:
    """Every client got what it asked for, and the block count made vLLM preempt."""
    assert report["preemptions"] > 0
    assert [r.id for r, res in zip(mix, report["results"], strict=True) if not served(r, res)] == []


def test_every_page_selected_matches_stock_request_by_request(mix: dict) -> None:
    """Same blocks (32 tokens: stock's CPU size), same schedule, same preemptions: every
    request's tokens equal stock's (fp32), near ties excepted."""
    args = {"block_size": 32, "num_blocks": 24, "dtype": "float32"}
    stock = replay(mix["tmp"], "stock", mix["model"], mix["mix"], None, **args)
    dense = replay(
        mix["tmp"], "dense", mix["model"], mix["mix"], PRESETS["paper"] | {"top_k": 1000}, **args
    )
    _check_served(mix["mix"], stock)
    _check_served(mix["mix"], dense)
    assert compare(mix["mix"], stock["results"], dense["results"]) == []
    assert dense["preemptions"] == stock["preemptions"]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_serve_the_mix_and_keep_requests_apart(
    mix: dict, preset: str, redis_srv: RedisServer
) -> None:
    """The engine serves the whole mix with 16-token pages; then greedy probes from it, run
    one at a time on a fresh engine, give the tokens they got beside the mix.

    The mix runs with the KV connector, so a request vLLM preempts swaps its context out and
    resumes where it stopped (without it, vLLM recomputes the context as a dense prefill, which
    is not what the request decoded): up to half the probes are requests vLLM preempted."""
    args = {"block_size": 16, "num_blocks": 48, "dtype": "float32"}
    settings = PRESETS[preset] | {"top_k": MIX_TOP_K[preset]}
    served = replay(
        mix["tmp"], preset, mix["model"], mix["mix"], settings, redis_url=redis_srv.url, **args
    )
    _check_served(mix["mix"], served)
    report = served["kvhead"]
    assert report["promoted_pages"] > 0 and report["resident_page_fraction"] < 1
    assert report["connector"]["loads"] > 0 and report["connector"]["load_failures"] == 0

    eligible = [
        r
        for r in mix["mix"]
        if r.n == 1
        and r.abort_after is None
        and r.stop is None
        and r.id != TOO_LONG
        and r.max_tokens >= 8
    ]
    preempted = [r for r in eligible if r.id in served["preempted"]][:3]
    probes = (
        preempted + [r for r in eligible if r.id not in served["preempted"]][: 6 - len(preempted)]
    )
    assert preempted and len(probes) == 6
    alone = [MixRequest(**(asdict(r) | {"arrive": 2000 * i})) for i, r in enumerate(probes)]
    by_id = {r.id: res for r, res in zip(mix["mix"], served["results"], strict=True)}
    beside = [by_id[r.id] for r in probes]
    run = replay(mix["tmp"], f"{preset}-alone", mix["model"], alone, settings, **args)
    assert compare(alone, run["results"], beside) == []


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_openai_server_survives_a_short_request_then_a_long_chat(
    mix: dict, preset: str, tmp_path: Path
) -> None:
    """The sequence that killed the engine: a 4-token completion, then a chat completion of
    ~440 tokens (it got the first block of the finished request), then more of both."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(mix["model"]),
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--max-model-len",
        "8192",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--block-size",
        "16",
        "--kv-cache-memory-bytes",
        str(2**30),
        "--attention-backend",
        "CUSTOM",
        "--additional-config",
        json.dumps({"kvhead": PRESETS[preset]}),
    ]
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=ENGINE_ENV)
    try:
        wait_ready(port, server, log)
        model = str(mix["model"])
        story = {"prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}
        reply = _post(port, model, "/v1/completions", story)
        assert reply["usage"]["prompt_tokens"] == 4
        text = (ROOT / "kvhead" / "data" / "python_docs" / "tutorial-classes.txt").read_text()
        words = text.split()
        for start in (0, 300, 600):
            chat = {
                "messages": [{"role": "user", "content": " ".join(words[start : start + 330])}],
                "max_tokens": 12,
                "temperature": 0,
            }
            reply = _post(port, model, "/v1/chat/completions", chat)
            assert 380 <= reply["usage"]["prompt_tokens"] <= 520
            assert reply["usage"]["completion_tokens"] >= 1
            reply = _post(port, model, "/v1/completions", story)
            assert reply["choices"][0]["text"]
        health = urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status == 200
        # Read before stopping: vLLM's own shutdown (abort, timeout 0) kills the engine core
        # and logs EngineDeadError from its output handler, which says nothing about serving.
        served_log = log.read_text()
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "Traceback" not in served_log


def _post(port: int, model: str, path: str, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        json.dumps({"model": model} | body).encode(),
        {"Content-Type": "application/json"},
    )
    return json.loads(urllib.request.urlopen(request, timeout=600).read())
