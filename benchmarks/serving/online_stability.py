"""Online head stability in the vLLM engine vs the offline profile, and the drift guard's effect.

Runs SmolLM2 in vLLM with the plugin on disjoint windows of the shipped corpora (the ``paper``
preset by default: K = 64 pages and R = 16 for every stable head, the settings the shipped
profile was measured with, so online and offline RCO compare like with like). The engine
publishes its ``kvhead_*`` metrics into a folder, read back as the node exporter would: per
stable head, the mean RCO between consecutive reranks (``kvhead_head_rco``) and the drift
guard's events. Reports the Spearman correlation of online instability with the profile's, the
gap between them (the guard's margin must sit above the gap of normal traffic), and the same for
random-token prompts (traffic unlike the calibration text).

    python benchmarks/serving/online_stability.py [--windows 6 --prompt-tokens 2048 ...]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import typer  # noqa: E402

from benchmarks.common import CORPUS, MODEL, PROFILE, RESULTS, kvhead_settings  # noqa: E402
from kvhead.core.online import DriftGuard  # noqa: E402
from kvhead.core.stability import HeadProfile  # noqa: E402
from kvhead.models.resolve import resolve_model  # noqa: E402
from kvstore.metrics import (
    METRICS_DIR_ENV,  # noqa: E402
    NodeCollector,  # noqa: E402
)

OUT = RESULTS / "serving" / "online_stability.json"


def _windows(model_dir: Path, count: int, tokens: int) -> list[list[int]]:
    """``count`` disjoint windows of ``tokens`` tokens, taken round-robin over the corpora."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    texts = sorted(p for p in CORPUS.glob("*.txt"))
    streams = [tok(p.read_text()).input_ids for p in texts]
    out = []
    for i in range(count):
        stream = streams[i % len(streams)]
        start = (i // len(streams)) * tokens
        if start + tokens > len(stream):
            raise ValueError(f"{texts[i % len(texts)].name} holds no window {i // len(texts)}")
        out.append(stream[start : start + tokens])
    return out


def _run(
    model_dir: Path, prompts: list[list[int]], max_tokens: int, preset: str, tmp: Path, name: str
) -> dict:
    """One engine run; returns per (layer, head) online RCO count/sum and drift events."""
    prompt_file = tmp / f"{name}-prompts.json"
    prompt_file.write_text(json.dumps(prompts))
    settings = tmp / f"{name}-settings.json"
    settings.write_text(json.dumps(kvhead_settings(preset)))
    metrics = tmp / f"{name}-metrics"
    cmd = [
        sys.executable,
        "-m",
        "kvhead.vllm.generate",
        str(model_dir),
        str(prompt_file),
        str(tmp / f"{name}-out.json"),
        "--kvhead",
        str(settings),
        "--max-tokens",
        str(max_tokens),
        "--max-model-len",
        str(len(prompts[0]) + max_tokens + 16),
        "--max-num-seqs",
        str(len(prompts)),
        "--kv-cache-bytes",
        str(2**30),
    ]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    subprocess.run(cmd, check=True, env=env | {METRICS_DIR_ENV: str(metrics)})
    heads: dict[tuple[int, int], dict] = {}
    for family in NodeCollector(metrics).collect():
        for s in family.samples:
            if "head" not in s.labels:
                continue
            key = (int(s.labels["layer"]), int(s.labels["head"]))
            heads.setdefault(key, {})[s.name] = s.value
    return heads


def _spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    ra = a.argsort().argsort().double()
    rb = b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def _summary(heads: dict, profile: HeadProfile) -> dict:
    expected = profile.instability_tensor()
    rows = []
    for (layer, head), m in sorted(heads.items()):
        count = m.get("kvhead_head_rco_count", 0)
        if not count:
            continue
        online = 1 - m["kvhead_head_rco_sum"] / count
        rows.append((layer, head, float(expected[layer, head]), online, int(count)))
    prof = torch.tensor([r[2] for r in rows])
    online = torch.tensor([r[3] for r in rows])
    gap = online - prof  # how much less stable a head looks at lag R in the engine
    drifts = sum(int(m.get("kvhead_head_drift_events_total", 0)) for m in heads.values())
    return {
        "stable_heads_measured": len(rows),
        "spearman_rho": _spearman(prof, online),
        "reranks_per_head_median": int(torch.tensor([r[4] for r in rows]).median()),
        "gap_median": float(gap.median()),
        "gap_p90": float(gap.quantile(0.9)),
        "gap_max": float(gap.max()),
        "heads_past_margin": int((gap > DriftGuard().margin).sum()),
        "drift_events": drifts,
        "heads": [
            {"layer": r[0], "head": r[1], "profile": r[2], "online": r[3], "reranks": r[4]}
            for r in rows
        ],
    }


def main(
    windows: int = typer.Option(6, help="Disjoint corpus windows (one request each)."),
    prompt_tokens: int = typer.Option(2048, help="Tokens per prompt."),
    max_tokens: int = typer.Option(256, help="Tokens generated per request (greedy)."),
    preset: str = typer.Option("paper", help="kvhead preset the engine runs."),
    out: Path = typer.Option(OUT, help="Result JSON."),
) -> None:
    model_dir = resolve_model(MODEL)
    profile = HeadProfile.load(PROFILE)
    text = _windows(model_dir, windows, prompt_tokens)
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randint(100, 40000, (prompt_tokens,), generator=gen).tolist() for _ in text]
    with tempfile.TemporaryDirectory() as tmp:
        result = {
            "model": MODEL,
            "preset": preset,
            "windows": windows,
            "prompt_tokens": prompt_tokens,
            "max_tokens": max_tokens,
            "guard": DriftGuard().__dict__,
            "text": _summary(_run(model_dir, text, max_tokens, preset, Path(tmp), "text"), profile),
            "random_tokens": _summary(
                _run(model_dir, noise, max_tokens, preset, Path(tmp), "noise"), profile
            ),
        }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name in ("text", "random_tokens"):
        r = result[name]
        print(
            f"{name}: rho {r['spearman_rho']:.2f} over {r['stable_heads_measured']} heads, gap "
            f"median {r['gap_median']:.2f} p90 {r['gap_p90']:.2f} max {r['gap_max']:.2f}, "
            f"drift events {r['drift_events']}"
        )


if __name__ == "__main__":
    typer.run(main)
