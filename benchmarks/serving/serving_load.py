"""Served load: kvhead's Ray Serve app against stock vLLM's OpenAI server, same model and KV budget.

Both servers run at once on 127.0.0.1 (stock vLLM's ``api_server`` without the plugin, and
``kvhead serve`` with a preset); load goes to one at a time, alternating in rounds so that both
see the same machine state. A seeded workload mixes long prompts (``--long``, token ids from the
shipped corpora) and short ones, streamed by ``--concurrency`` clients with the official
``openai`` client. Recorded per server: failures, p50/p99 time to first token (TTFT) and
inter-token latency (ITL), requests/s and generated tokens/s; then the capacity probe: ``c``
concurrent ``--capacity-len``-token requests for c = 1, 2, 4, ..., and whether all ``c`` decode
together (the most requests seen between their first and last token at once equals ``c``) or
vLLM queued some. The probe only shows queueing when each request's decode outlasts the others'
prefills (``--capacity-tokens``); on a 2-core CPU an 8k prefill takes about 30 s, so there it
under-counts, and the planned KV capacity (docs/serving.md) is the number to read.

Run: ``python benchmarks/serving/serving_load.py`` (about 30 minutes on 2 cores with the
defaults); writes ``benchmarks/results/serving/serving_load.json`` and ``serving_load.png``.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer

from benchmarks.common import MODEL, RESULTS

SERVING_RESULTS = RESULTS / "serving"
MODEL_ID = "smollm2"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, log: Path, timeout: float = 1500) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(3)
    raise RuntimeError(f"{url} did not become ready")


def start_stock(model: Path, tmp: Path, args: dict) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", MODEL_ID,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(args["max_model_len"]), "--dtype", args["dtype"],
        "--max-num-seqs", str(args["max_num_seqs"]), "--enforce-eager",
        "--no-enable-prefix-caching", "--block-size", "32",
        "--kv-cache-memory-bytes", str(int(args["kv_cache_gib"] * 2**30)),
    ]  # fmt: skip
    log = tmp / "stock.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, log)
    return url, proc


def start_kvhead(tmp: Path, args: dict, preset: str) -> tuple[str, subprocess.Popen]:
    port = _free_port()
    config = tmp / "serve.yaml"
    config.write_text(
        json.dumps(
            {
                "model_id": MODEL_ID,
                "preset": preset,
                "max_model_len": args["max_model_len"],
                "dtype": args["dtype"],
                "max_num_seqs": args["max_num_seqs"],
                "kv_cache_gib": args["kv_cache_gib"],
                "port": port,
                "replicas": {"max_ongoing_requests": 64, "max_queued_requests": 256},
            }
        )
    )  # JSON is YAML
    log = tmp / "kvhead.log"
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvhead.cli", "serve", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    _wait(url, proc, log)
    return url, proc


def workload(
    count: int, long: tuple[int, int], short: tuple[int, int], max_tokens: int, seed: int
) -> list[dict]:
    """Seeded requests: half long, half short prompts cut from the corpora's token ids."""
    from transformers import AutoTokenizer

    from kvhead.models.resolve import resolve_model
    from kvhead.vllm.request_mix import corpus_tokens

    tokens = corpus_tokens(AutoTokenizer.from_pretrained(resolve_model(MODEL)))
    rng = random.Random(seed)
    out = []
    for i in range(count):
        low, high = long if i % 2 == 0 else short
        n = rng.randint(low, high)
        start = rng.randrange(len(tokens) - n)
        out.append({"prompt": tokens[start : start + n], "max_tokens": max_tokens})
    rng.shuffle(out)
    return out


async def _one(client, req: dict) -> dict:
    sent = time.perf_counter()
    stamps: list[float] = []
    try:
        stream = await client.completions.create(
            model=MODEL_ID,
            prompt=req["prompt"],
            max_tokens=req["max_tokens"],
            temperature=0,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
    except Exception as err:  # noqa: BLE001 - every failure is counted, the run goes on
        return {"ok": False, "error": f"{type(err).__name__}: {err}"[:300], "sent": sent}
    return {"ok": bool(stamps), "sent": sent, "stamps": stamps, "prompt": len(req["prompt"])}


async def drive(url: str, requests: list[dict], concurrency: int) -> list[dict]:
    import openai

    gate = asyncio.Semaphore(concurrency)
    async with openai.AsyncOpenAI(
        base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=3600
    ) as client:

        async def limited(req: dict) -> dict:
            async with gate:
                return await _one(client, req)

        return await asyncio.gather(*(limited(r) for r in requests))


def summarise(results: list[dict], seconds: float) -> dict:
    done = [r for r in results if r["ok"]]
    ttft = [r["stamps"][0] - r["sent"] for r in done]
    itl = [b - a for r in done for a, b in zip(r["stamps"], r["stamps"][1:])]
    tokens = sum(len(r["stamps"]) for r in done)

    def pct(values: list[float], q: float) -> float | None:
        if not values:
            return None
        return (
            statistics.quantiles(values, n=100, method="inclusive")[q - 1]
            if len(values) > 1
            else values[0]
        )

    return {
        "requests": len(results),
        "failures": len(results) - len(done),
        "errors": sorted({r["error"] for r in results if not r["ok"] and "error" in r})[:5],
        "ttft_p50_s": pct(ttft, 50),
        "ttft_p99_s": pct(ttft, 99),
        "itl_p50_s": pct(itl, 50),
        "itl_p99_s": pct(itl, 99),
        "requests_per_s": len(done) / seconds,
        "tokens_per_s": tokens / seconds,
        "seconds": seconds,
    }


def decoding_together(results: list[dict]) -> int:
    """The most requests between their first and last token at one moment."""
    events = []
    for r in results:
        if r["ok"]:
            events += [(r["stamps"][0], 1), (r["stamps"][-1], -1)]
    live = best = 0
    for _, step in sorted(events, key=lambda e: (e[0], -e[1])):
        live += step
        best = max(best, live)
    return best


def main(
    preset: str = typer.Option("accurate", help="kvhead preset of the served app."),
    requests: int = typer.Option(64, help="Requests per server (split over the rounds)."),
    rounds: int = typer.Option(2, help="Alternating rounds (stock, kvhead, kvhead, stock, ...)."),
    concurrency: int = typer.Option(16, help="Concurrent streams."),
    long: str = typer.Option("4096,7936", help="Long prompt lengths, min,max tokens."),
    short: str = typer.Option("32,512", help="Short prompt lengths, min,max tokens."),
    max_tokens: int = typer.Option(32, help="Tokens each request generates."),
    kv_cache_gib: float = typer.Option(
        2.0, help="KV budget of each server (the same; fp32 SmolLM2: stock holds 5.7 8k requests)."
    ),
    max_model_len: int = typer.Option(8192),
    max_num_seqs: int = typer.Option(16),
    dtype: str = typer.Option("float32", help="bf16 is several times slower on CPUs without it."),
    capacity_len: int = typer.Option(7936, help="Prompt tokens of the capacity probe."),
    capacity_max: int = typer.Option(16, help="Largest concurrency the probe tries."),
    capacity_tokens: int = typer.Option(
        16,
        help="Tokens each probe request generates: its decode must outlast the other probes' "
        "prefills, or requests that were all admitted never decode at the same moment.",
    ),
    seed: int = typer.Option(0),
) -> None:
    from kvhead.models.resolve import resolve_model

    args = {
        "max_model_len": max_model_len,
        "dtype": dtype,
        "max_num_seqs": max_num_seqs,
        "kv_cache_gib": kv_cache_gib,
    }
    bounds = [tuple(int(x) for x in text.split(",")) for text in (long, short)]
    work = workload(requests, bounds[0], bounds[1], max_tokens, seed)
    per_round = -(-requests // rounds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stock_url, stock_proc = start_stock(resolve_model(MODEL), tmp, args)
        kv_url, kv_proc = start_kvhead(tmp, args, preset)
        urls = {"stock": stock_url, "kvhead": kv_url}
        try:
            raw: dict[str, list] = {"stock": [], "kvhead": []}
            seconds = {"stock": 0.0, "kvhead": 0.0}
            for i in range(rounds):
                part = work[i * per_round : (i + 1) * per_round]
                order = ["stock", "kvhead"] if i % 2 == 0 else ["kvhead", "stock"]
                for name in order:
                    began = time.perf_counter()
                    raw[name] += asyncio.run(drive(urls[name], part, concurrency))
                    seconds[name] += time.perf_counter() - began
                    print(f"[load] round {i} {name}: {summarise(raw[name], seconds[name])}")
            load = {name: summarise(raw[name], seconds[name]) for name in raw}
            capacity: dict[str, list] = {"stock": [], "kvhead": []}
            probe = workload(
                capacity_max, (capacity_len,) * 2, (capacity_len,) * 2, capacity_tokens, 1
            )
            c = 1
            while c <= capacity_max:
                for name in ["stock", "kvhead"] if c % 2 else ["kvhead", "stock"]:
                    got = asyncio.run(drive(urls[name], probe[:c], c))
                    together = decoding_together(got)
                    capacity[name].append({"concurrency": c, "decoding_together": together,
                                           "failures": sum(not r["ok"] for r in got)})  # fmt: skip
                    print(f"[capacity] {name} c={c}: {together} decoding together")
                c *= 2
        finally:
            for proc in (kv_proc, stock_proc):
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=300)
    sustained = {
        name: max([p["concurrency"] for p in points if p["decoding_together"] == p["concurrency"]
                   and not p["failures"]] or [0])
        for name, points in capacity.items()
    }  # fmt: skip
    result = {
        "preset": preset,
        "settings": args | {"requests": requests, "rounds": rounds, "concurrency": concurrency,
                            "long": bounds[0], "short": bounds[1], "max_tokens": max_tokens,
                            "capacity_len": capacity_len, "capacity_tokens": capacity_tokens,
                            "seed": seed},
        "load": load,
        "ratios_kvhead_over_stock": {
            key: load["kvhead"][key] / load["stock"][key]
            for key in ("tokens_per_s", "requests_per_s", "ttft_p50_s", "itl_p50_s")
            if load["stock"][key] and load["kvhead"][key]
        },
        "capacity": capacity,
        "sustained_concurrency": sustained,
    }  # fmt: skip
    SERVING_RESULTS.mkdir(parents=True, exist_ok=True)
    out = SERVING_RESULTS / "serving_load.json"
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(
        json.dumps(
            {k: result[k] for k in ("load", "ratios_kvhead_over_stock", "sustained_concurrency")},
            indent=1,
        )
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    names = ["stock", "kvhead"]
    keys = ["ttft_p50_s", "ttft_p99_s", "itl_p50_s", "itl_p99_s"]
    width = 0.35
    for i, name in enumerate(names):
        values = [result["load"][name][k] or 0 for k in keys]
        left.bar([x + i * width for x in range(len(keys))], values, width, label=name)
    left.set_xticks([x + width / 2 for x in range(len(keys))], keys, rotation=20)
    left.set_yscale("log")
    left.set_ylabel("seconds")
    left.set_title("latency under the mixed load")
    left.legend()
    for name in names:
        points = result["capacity"][name]
        right.plot([p["concurrency"] for p in points], [p["decoding_together"] for p in points],
                   marker="o", label=name)  # fmt: skip
    top = max(p["concurrency"] for p in points)
    right.plot([1, top], [1, top], "k:", label="no queueing")
    right.set_xlabel(f"concurrent {result['settings']['capacity_len']}-token requests")
    right.set_ylabel("decoding together")
    right.set_xscale("log", base=2)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    typer.run(main)
