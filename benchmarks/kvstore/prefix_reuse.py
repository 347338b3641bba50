"""Cross-replica prefix reuse through Redis: time to first token, cold vs a prefix another
replica served, on SmolLM2-135M-Instruct with the accurate preset.

Two replicas (each a fresh vLLM engine process with the kvhead plugin and the ``KVHeadConnector``)
share one real ``redis-server``:

1. replica A serves one request per shared document (document + question 0): cold prefill,
   and its prompt pages are saved to Redis;
2. replica B then alternates, one request at a time, a *warm* request (a document A served +
   another question: its leading pages load from Redis) and a *cold* one (the same corpus text
   under another title, which nobody served, + the same question), one generated token each,
   so the latency is the time to first token and both kinds do the same work on the same
   machine state;
3. B serves the warm requests again with 32 greedy tokens, and replica C (no connector, cold
   prefill) serves the same prompts: the tokens must be identical.

Documents are titled cuts of the bundled licence corpus; questions are its last 48-token
tails. Writes ``benchmarks/results/kvstore/prefix_reuse.json`` and ``.md``.
Run: ``python benchmarks/kvstore/prefix_reuse.py main [--contexts 4096,8000] [--pairs 3]``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer

from benchmarks.common import CORPUS, KVSTORE_RESULTS, MODEL, PAGE, ROOT, kvhead_settings

sys.path.insert(0, str(ROOT / "tests"))  # the suite's real redis-server helper
from redis_server import RedisServer  # noqa: E402

app = typer.Typer(add_completion=False)
QUESTION = 48  # tokens after the shared document
GEN = 32  # greedy tokens of the identity check
KV_BYTES = 2**30


def _plan(model_dir: Path, contexts: list[int], pairs: int) -> dict:
    """Per context and pair one corpus body under two titles: the document A serves ("Document
    A<n>") and one nobody serves ("Document B<n>"), so warm and cold requests do the same work
    and differ only in whether their prefix is stored; and two questions."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = "\n".join(p.read_text() for p in sorted(CORPUS.glob("*.txt")))
    ids = tokenizer(text)["input_ids"]
    plan: dict = {"contexts": {}}
    for context in contexts:
        served, fresh = [], []
        for i in range(pairs):
            titles = [tokenizer(f"Document {kind}{context}-{i}:\n")["input_ids"] for kind in "AB"]
            body = context - QUESTION - len(titles[0])
            start = (7919 * (i + 1) * context) % (len(ids) - body)  # spread over the corpus
            served.append(titles[0] + ids[start : start + body])
            fresh.append(titles[1] + ids[start : start + body])
        questions = [ids[-QUESTION * (q + 1) : len(ids) - QUESTION * q] for q in range(2)]
        plan["contexts"][str(context)] = {"served": served, "fresh": fresh, "questions": questions}
    return plan


@app.command()
def replica(
    model: Path,
    steps: Path,
    out: Path,
    redis_url: str = typer.Option(None),
    preset: str = "accurate",
) -> None:
    """One engine: run ``steps`` (a JSON list of {name, prompt, max_tokens}) one at a time."""
    from vllm import LLM, SamplingParams

    from kvhead.vllm.config import ConnectorSettings
    from kvhead.vllm.generate import engine_kwargs

    transfer = None
    if redis_url:
        transfer = ConnectorSettings.on(redis_url).transfer_config()
    llm = LLM(
        **engine_kwargs(
            str(model),
            kvhead_settings(preset),
            block_size=PAGE,
            max_model_len=8192,
            max_num_seqs=4,
            kv_cache_bytes=KV_BYTES,
            in_process=True,
            kv_transfer=transfer,
        )
    )
    results = []
    for step in json.loads(steps.read_text()):
        params = SamplingParams(temperature=0.0, max_tokens=step["max_tokens"], ignore_eos=True)
        start = time.perf_counter()
        (output,) = llm.generate([{"prompt_token_ids": step["prompt"]}], params, use_tqdm=False)
        seconds = time.perf_counter() - start
        results.append(
            {"name": step["name"], "seconds": seconds, "tokens": list(output.outputs[0].token_ids)}
        )
    from kvhead.vllm.runtime import current

    runtime = current()
    connector = runtime.connector if runtime is not None else None
    report = {"steps": results, "connector": None}
    if connector is not None:
        connector.flush()
        report["connector"] = vars(connector.counters) | {"redis": vars(connector.tier.stats())}
    out.write_text(json.dumps(report, default=str))
    os._exit(0)  # vLLM's engine threads can hold the interpreter at exit


def _run_replica(
    model: Path, tmp: Path, name: str, steps: list[dict], redis_url: str | None
) -> dict:
    path = tmp / f"{name}-steps.json"
    path.write_text(json.dumps(steps))
    out = tmp / f"{name}.json"
    cmd = [sys.executable, __file__, "replica", str(model), str(path), str(out)]
    if redis_url:
        cmd += ["--redis-url", redis_url]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
    env |= {"TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0 or not out.exists():
        raise RuntimeError(f"replica {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


@app.command()
def main(
    contexts: str = typer.Option("4096,8000", help="Prompt lengths (document + question)."),
    pairs: int = typer.Option(3, help="Warm/cold pairs per context."),
    out_name: str = typer.Option("prefix_reuse"),
) -> None:
    from kvhead.models import resolve_model

    model = resolve_model(MODEL)
    lengths = [int(c) for c in contexts.split(",")]
    plan = _plan(model, lengths, pairs)
    a_steps, b_steps, check = [], [], []
    for context, p in plan["contexts"].items():
        q0, q1 = p["questions"]
        for i, doc in enumerate(p["served"]):
            a_steps.append({"name": f"{context}/served{i}", "prompt": doc + q0, "max_tokens": 1})
        for i, (doc, fresh) in enumerate(zip(p["served"], p["fresh"], strict=True)):
            pair = [
                {"name": f"{context}/warm{i}", "prompt": doc + q1, "max_tokens": 1},
                {"name": f"{context}/cold{i}", "prompt": fresh + q1, "max_tokens": 1},
            ]
            b_steps += pair if i % 2 == 0 else pair[::-1]  # who goes first alternates
            check.append({"name": f"{context}/check{i}", "prompt": doc + q1, "max_tokens": GEN})
    server = RedisServer("--maxmemory", "6gb").start()
    started = time.time()
    try:
        with tempfile.TemporaryDirectory() as tmp_dir:
            tmp = Path(tmp_dir)
            a = _run_replica(model, tmp, "A", a_steps, server.url)
            b = _run_replica(model, tmp, "B", b_steps + check, server.url)
            c = _run_replica(model, tmp, "C", check, None)
    finally:
        server.stop()
    seconds = {s["name"]: s["seconds"] for s in b["steps"]}
    rows = []
    for context in plan["contexts"]:
        warm = [seconds[f"{context}/warm{i}"] for i in range(pairs)]
        cold = [seconds[f"{context}/cold{i}"] for i in range(pairs)]
        rows.append(
            {
                "context": int(context),
                "warm_ttft_s": warm,
                "cold_ttft_s": cold,
                "median_warm_s": statistics.median(warm),
                "median_cold_s": statistics.median(cold),
                "speedup": statistics.median(cold) / statistics.median(warm),
            }
        )
    b_tokens = {s["name"]: s["tokens"] for s in b["steps"] if "check" in s["name"]}
    c_tokens = {s["name"]: s["tokens"] for s in c["steps"]}
    identical = [b_tokens[n] == c_tokens[n] for n in c_tokens]
    first_divergence = {
        n: next((i for i, (x, y) in enumerate(zip(b_tokens[n], t)) if x != y), None)
        for n, t in c_tokens.items()
    }
    result = {
        "model": MODEL,
        "preset": "accurate",
        "pairs": pairs,
        "question_tokens": QUESTION,
        "rows": rows,
        "greedy_identical": identical,
        "first_divergence": first_divergence,
        "tokens_warm": b_tokens,
        "tokens_cold": c_tokens,
        "replica_a": a["connector"],
        "replica_b": b["connector"],
        "wall_s": time.time() - started,
    }
    KVSTORE_RESULTS.mkdir(parents=True, exist_ok=True)
    (KVSTORE_RESULTS / f"{out_name}.json").write_text(json.dumps(result, indent=1, default=str))
    lines = [
        "| context | cold TTFT (median) | warm TTFT (median) | speedup |",
        "|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['context']} | {r['median_cold_s']:.2f} s | {r['median_warm_s']:.2f} s "
            f"| {r['speedup']:.1f}x |"
        )
    lines.append(
        f"\ngreedy {GEN} tokens identical to a cold replica: {sum(identical)}/{len(identical)}"
    )
    (KVSTORE_RESULTS / f"{out_name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    app()
