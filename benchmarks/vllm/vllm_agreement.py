"""Teacher-forced greedy-token agreement of vLLM + kvhead with stock vLLM.

The reference runner's agreement (``kvhead eval``, docs/accuracy.md "How it is measured") feeds
dense's greedy continuation back and counts the steps where the sparse run's argmax equals it.
This does the same through vLLM's real decode path: stock vLLM decodes ``gen`` tokens greedily
(the reference); then each engine runs the same prompt again with :class:`ForcedTokens`, a vLLM
v1 logits processor that at every step records the model's own argmax and then masks every logit
but the reference token's, so the sequence (and every later step's KV) is the reference's.
Agreement = share of steps whose recorded argmax is the reference token. Stock's own forced run
must give 1.0: that is the check that forcing changes nothing but the sampled token.

Engines run in-process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, ``uni`` executor), so the
processor's records are read straight from the class after ``generate``. Prompts are the
reference runner's corpus windows (``corpus_window(tokenizer, context - gen, offset=0)``) and
both engines run in float32 like the runner, so the numbers sit beside ``accuracy.json``.

Run: ``python benchmarks/vllm/vllm_agreement.py main`` (``--contexts 512`` for a short run;
``--config NAME`` for another preset); writes ``benchmarks/results/vllm/vllm_agreement.json`` and
``.md`` (``vllm_agreement_<config>.*`` for a preset other than ``paper``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated, ClassVar

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from rich.console import Console
from rich.table import Table
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from benchmarks.common import (
    ACCURACY_RESULTS,
    CONFIG_NAMES,
    MODEL,
    PAGE,
    VLLM_RESULTS,
    eval_mode,
    kvhead_settings,
    preset_name,
)

app = typer.Typer(add_completion=False)
GEN = 256
KV_BUDGET = 2**29  # fp32: stock's one 8k request takes 384 MiB (block 32, 90 heads)
STOCK_BLOCK, KVHEAD_PAGE = 32, PAGE  # stock CPU kernels need multiples of 32
# fp32 stable pages of the ~2.8k blocks 512 MiB buys kvhead (79 stable heads: 2.2 GiB)
ARENA_GIB = 3.0
ARG = "kvhead_forced"  # SamplingParams.extra_args key: {"tag": str, "tokens": [int, ...]}


class ForcedTokens(LogitsProcessor):
    """Records each step's argmax, then forces the request's given token at that step.

    A request opts in through ``extra_args[ARG]``; others pass through untouched. The step is
    the number of tokens the request has produced so far (vLLM hands the processor a live
    reference to that list), so a prefill chunk that vLLM samples and discards only rewrites
    step 0 before the full prompt's row does. ``records`` is class-level because vLLM builds the
    instance inside the worker; engines here run in-process, so the caller reads it afterwards.
    """

    records: ClassVar[dict[str, dict[int, int]]] = {}

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.active: dict[int, tuple[str, list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the sampled token

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.active, batch_update, self._entry)

    @classmethod
    def _entry(cls, params, prompt_ids, output_ids: list[int]):
        spec = (params.extra_args or {}).get(ARG)
        if spec is None:
            return None
        cls.records[spec["tag"]] = {}
        return spec["tag"], list(spec["tokens"]), output_ids

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return logits
        argmax = logits.argmax(dim=-1).tolist()
        for row, (tag, tokens, output_ids) in self.active.items():
            step = len(output_ids)
            self.records[tag][step] = argmax[row]
            if step < len(tokens):
                forced = logits[row, tokens[step]].clone()
                logits[row].fill_(float("-inf"))
                logits[row, tokens[step]] = forced
        return logits


def _forced_run(llm, prompt: list[int], tokens: list[int], tag: str) -> dict:
    """Generate under forcing; the model's argmax per step and what the engine emitted."""
    from vllm import SamplingParams

    params = SamplingParams(
        temperature=0.0,
        max_tokens=len(tokens),
        ignore_eos=True,
        extra_args={ARG: {"tag": tag, "tokens": tokens}},
    )
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    record = ForcedTokens.records.pop(tag)
    argmax = [record[i] for i in range(len(tokens))]
    return {
        "argmax": argmax,
        "output": list(out.outputs[0].token_ids),
        "agreement": sum(a == t for a, t in zip(argmax, tokens)) / len(tokens),
    }


@app.command()
def worker(
    mode: str,
    model: Path,
    prompts: Path,
    out: Path,
    references: Annotated[
        Path | None, typer.Option(help="JSON token lists to force; else stock's greedy output.")
    ] = None,
    kvhead: Annotated[Path | None, typer.Option(help="JSON kvhead settings (mode kvhead).")] = None,
    gen: int = typer.Option(GEN),
    block_size: int = typer.Option(STOCK_BLOCK),
    max_model_len: int = typer.Option(8192),
    kv_cache_bytes: int = typer.Option(KV_BUDGET),
) -> None:
    """One in-process engine: per prompt, the greedy reference (unless given) and a forced run."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    from kvhead.vllm.generate import engine_kwargs

    settings = json.loads(kvhead.read_text()) if kvhead else None
    if (mode == "kvhead") != (settings is not None):
        raise typer.BadParameter("mode kvhead needs --kvhead settings, mode stock none")
    kwargs = engine_kwargs(
        str(model),
        settings,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=1,
        kv_cache_bytes=kv_cache_bytes,
        dtype="float32",
        in_process=True,
    )
    llm = LLM(**kwargs, logits_processors=[ForcedTokens])
    token_prompts = json.loads(prompts.read_text())
    refs = json.loads(references.read_text()) if references else None
    runs = []
    for i, prompt in enumerate(token_prompts):
        if refs is None:
            params = SamplingParams(temperature=0.0, max_tokens=gen, ignore_eos=True)
            result = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
            reference = list(result.outputs[0].token_ids)
        else:
            reference = refs[i]
        runs.append(
            {"prompt_tokens": len(prompt), "reference": reference}
            | _forced_run(llm, prompt, reference, f"{mode}-{i}")
        )
        print(mode, len(prompt), "agreement", runs[-1]["agreement"], flush=True)
    # imported after the engine exists, like vllm_throughput.py (vLLM's module scan at start-up)
    from kvhead.vllm.runtime import current

    runtime = current()
    report = runtime.report() if runtime is not None else None
    out.write_text(json.dumps({"mode": mode, "runs": runs, "kvhead": report}))


def _prompts(contexts: list[int], gen: int) -> list[list[int]]:
    """The reference runner's prompts: corpus windows of ``context - gen`` tokens at offset 0."""
    from transformers import AutoTokenizer

    from kvhead.eval.inputs import corpus_window
    from kvhead.models.resolve import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model(MODEL))
    return [corpus_window(tokenizer, c - gen, offset=0).tolist() for c in contexts]


RUNNER_RESULTS = {  # where the reference runner's agreement on corpus window 0 was recorded
    "paper": lambda k: "accuracy.json",
    "balanced": lambda k: f"accuracy_comp_{k}k_w0.json",
    "accurate": lambda k: (
        "accuracy_unstable11_8k_w0_gpu.json" if k == 8 else "accuracy_n11_2k4k.json"
    ),
}


def _runner_agreement(context: int, config: str) -> float | None:
    """The reference runner's token agreement at ``context`` on window 0, the window this
    script's prompts are (``RUNNER_RESULTS`` names the run that measured it)."""
    path = ACCURACY_RESULTS / RUNNER_RESULTS[preset_name(config)](context // 1024)
    mode = eval_mode(config)
    report = json.loads(path.read_text()) if path.is_file() else {"results": []}
    if report.get("config", {}).get("first_window", 0) != 0:
        return None
    for result in report["results"]:
        if result["context"] == context and mode in result["modes"]:
            m = result["modes"][mode]
            return (m.get("window_agreement") or [m["token_agreement"]])[0]
    return None


def _table(rows: list[dict], mode: str) -> Table:
    table = Table(
        title=f"Teacher-forced greedy-token agreement with stock vLLM (SmolLM2, fp32, {mode})"
    )
    for col in (
        "context",
        "gen",
        "stock self",
        "kvhead vs stock",
        f"runner {mode}",
        "difference",
        "forced = ref",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        runner = r["runner_flexicache"]
        table.add_row(
            str(r["context"]),
            str(r["gen"]),
            f"{r['stock_self']:.4f}",
            f"{r['kvhead']:.4f}",
            "-" if runner is None else f"{runner:.4f}",
            "-" if runner is None else f"{r['difference']:+.4f}",
            str(r["forced_output_is_reference"]),
        )
    return table


def _run_engines(
    ctxs: list[int], gen: int, name: str, settings_json: dict, reuse_stock: bool = False
) -> tuple[dict, dict]:
    """Stock (references + its own forced run), then kvhead forced on stock's references.
    ``reuse_stock`` takes the stock run this name left earlier (greedy and seeded, so it would
    repeat itself) when it covers the same prompts."""
    from kvhead.models.resolve import resolve_model

    model = str(resolve_model(MODEL))
    common = ["--gen", str(gen), "--max-model-len", str(max(ctxs))]
    stock_path = VLLM_RESULTS / f"{name}.stock.raw.json"
    kvhead_path = VLLM_RESULTS / f"{name}.kvhead.raw.json"
    with tempfile.TemporaryDirectory(prefix="vllm_agreement_") as tmp:
        prompts, refs, settings = (
            Path(tmp) / f for f in ("prompts.json", "refs.json", "kvhead.json")
        )
        prompts.write_text(json.dumps(_prompts(ctxs, gen)))
        reuse = reuse_stock and stock_path.is_file()
        earlier = json.loads(stock_path.read_text()) if reuse else None
        wanted = [c - gen for c in ctxs]
        if earlier is None or [r["prompt_tokens"] for r in earlier["runs"]] != wanted:
            subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "worker",
                    "stock",
                    model,
                    str(prompts),
                    str(stock_path),
                    *common,
                ],
                check=True,
            )
        stock = json.loads(stock_path.read_text())
        refs.write_text(json.dumps([r["reference"] for r in stock["runs"]]))
        settings.write_text(json.dumps(settings_json))
        subprocess.run(
            [
                sys.executable,
                __file__,
                "worker",
                "kvhead",
                model,
                str(prompts),
                str(kvhead_path),
                "--references",
                str(refs),
                "--kvhead",
                str(settings),
                "--block-size",
                str(KVHEAD_PAGE),
                *common,
            ],
            check=True,
        )
    return stock, json.loads(kvhead_path.read_text())


@app.command()
def main(
    contexts: str = typer.Option("4096,8192", help="Contexts (prompt + gen), comma-separated."),
    gen: int = typer.Option(GEN, help="Reference tokens per prompt."),
    config: str = typer.Option(
        "paper",
        help=f"kvhead settings, one of {CONFIG_NAMES}: a preset "
        "(kvhead.presets) or its record name (spec, plus, plus11).",
    ),
    reuse_stock: bool = typer.Option(
        False, help="Reuse this run's earlier stock references if present."
    ),
) -> None:
    """Stock then kvhead, each in its own process; table, JSON and Markdown to results/vllm/.

    Nothing is random: greedy decoding, engines seeded (``engine_kwargs`` passes seed 0), fixed
    corpus windows.
    """
    try:
        settings, mode = kvhead_settings(config, ARENA_GIB), eval_mode(config)
    except ValueError as err:
        raise typer.BadParameter(str(err)) from None
    ctxs = [int(c) for c in contexts.split(",")]
    VLLM_RESULTS.mkdir(parents=True, exist_ok=True)
    name = (
        "vllm_agreement"
        if (contexts, gen) == ("4096,8192", GEN)
        else f"vllm_agreement_c{contexts.replace(',', '-')}_g{gen}"
    )
    name += "" if preset_name(config) == "paper" else f"_{config}"
    stock, kvh = _run_engines(ctxs, gen, name, settings, reuse_stock)
    rows = []
    for ctx, s, k in zip(ctxs, stock["runs"], kvh["runs"], strict=True):
        runner = _runner_agreement(ctx, config)
        rows.append(
            {
                "context": ctx,
                "gen": gen,
                "prompt_tokens": s["prompt_tokens"],
                "stock_self": s["agreement"],
                "kvhead": k["agreement"],
                "runner_flexicache": runner,
                "difference": None if runner is None else k["agreement"] - runner,
                "forced_output_is_reference": s["output"] == s["reference"]
                and k["output"] == k["reference"],
            }
        )
    report = kvh["kvhead"]
    summary = {
        "rows": rows,
        "settings": settings,
        "kvhead_resident_heads": report["resident_heads"],
        "kvhead_resident_page_fraction": report["resident_page_fraction"],
        "stock_block_size": STOCK_BLOCK,
        "kv_cache_bytes": KV_BUDGET,
        "dtype": "float32",
    }
    (VLLM_RESULTS / f"{name}.json").write_text(json.dumps(summary, indent=1))
    console = Console(record=True, width=140)
    console.print(_table(rows, mode))
    (VLLM_RESULTS / f"{name}.md").write_text(console.export_text())


if __name__ == "__main__":
    app()
