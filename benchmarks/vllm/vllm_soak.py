"""Soak: thousands of ordinary requests through the real engine with kvhead, zero failures.

The suite's request-mix test (tests/test_vllm_request_mix.py) replays a bounded mix; this one
replays ``--count`` requests of the same generator (kvhead.vllm.request_mix.build_mix:
page-edge and near-limit prompts, chat and completion, stop strings, n = 2, clients hanging up,
bursts and solo requests taking over finished requests' blocks, chunked prefill, a block count
that makes vLLM preempt) through one engine per named setting, in chunks of ``--chunk``
requests per engine process, and records what a server operator counts: requests, failed
requests, engine deaths, preemptions, tokens. K is scaled to the mix's context (``--top-k``)
so that stable heads really skip pages.

Run: ``python benchmarks/vllm/vllm_soak.py --config accurate --count 2000``; writes
``benchmarks/results/vllm/vllm_soak_<config>.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer

from benchmarks.common import MODEL, VLLM_RESULTS
from kvhead.presets import get_preset
from kvhead.vllm.request_mix import build_mix, replay_in_subprocess, served


def main(
    config: str = typer.Option("accurate", help="Preset: paper, balanced or accurate."),
    count: int = typer.Option(2000),
    chunk: int = typer.Option(250),
    max_model_len: int = typer.Option(192),
    top_k: int = typer.Option(8, help="Pages per stable head (the budgets' floor; 12 exist)."),
    num_blocks: int = typer.Option(48, help="KV blocks of 16 tokens (small: vLLM preempts)."),
    solo_share: float = typer.Option(0.05, help="Share of requests that arrive one at a time."),
    dtype: str = typer.Option(
        "float32", help="Model dtype (bf16 runs several times slower on CPUs without bf16 units)."
    ),
    max_tokens: int = typer.Option(16, help="Most tokens a request asks for."),
    workers: int = typer.Option(
        1, help="Engine processes replaying parts at once (one core each)."
    ),
    seed: int = typer.Option(11),
) -> None:
    from transformers import AutoTokenizer

    from kvhead.models.resolve import resolve_model

    get_preset(config)  # an unknown name stops here
    model = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model)
    settings = {"preset": config, "top_k": top_k}
    totals = {
        "requests": 0,
        "failed_requests": 0,
        "engine_deaths": 0,
        "preemptions": 0,
        "generated_tokens": 0,
        "prompt_tokens": 0,
        "rejected_too_long": 0,
        "aborted_by_client": 0,
        "promoted_pages": 0,
        "seconds": 0.0,
    }
    failed: list[str] = []
    parts = [
        build_mix(
            tokenizer,
            min(chunk, count - part * chunk),
            max_model_len,
            seed=seed + part,
            solo_share=solo_share,
            max_tokens=max_tokens,
        )
        for part in range(-(-count // chunk))
    ]

    def replay(mix: list) -> tuple[dict, float]:
        """One part in its own engine process and folder."""
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            report = replay_in_subprocess(
                model,
                mix,
                settings,
                Path(tmp),
                max_model_len=max_model_len,
                num_blocks=num_blocks,
                block_size=16,
                dtype=dtype,
            )
        return report, time.perf_counter() - start

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for part, (mix, (report, seconds)) in enumerate(zip(parts, pool.map(replay, parts))):
            totals["seconds"] += seconds
            totals["requests"] += len(mix)
            if report["error"]:
                totals["engine_deaths"] += 1
                failed.append(f"part {part}: {report['error'][-2000:]}")
                continue
            totals["preemptions"] += report["preemptions"]
            totals["promoted_pages"] += report["kvhead"]["promoted_pages"]
            for req, res in zip(mix, report["results"], strict=True):
                totals["prompt_tokens"] += len(req.prompt)
                totals["generated_tokens"] += sum(len(s) for s in res.samples)
                totals["rejected_too_long"] += res.rejected is not None
                totals["aborted_by_client"] += res.aborted
                if not served(req, res):
                    totals["failed_requests"] += 1
                    failed.append(req.id)
            print(f"[soak] part {part}: {totals}", flush=True)
    totals["wall_seconds"] = time.perf_counter() - started
    result = {
        "config": config,
        "settings": settings,
        "max_model_len": max_model_len,
        "num_blocks": num_blocks,
        "solo_share": solo_share,
        "dtype": dtype,
        "max_tokens": max_tokens,
        "workers": workers,
        "seed": seed,
        "totals": totals,
        "failures": failed,
    }
    VLLM_RESULTS.mkdir(parents=True, exist_ok=True)
    (VLLM_RESULTS / f"vllm_soak_{config}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(totals))


if __name__ == "__main__":
    typer.run(main)
