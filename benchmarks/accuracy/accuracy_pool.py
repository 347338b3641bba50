"""Pool `kvhead eval` runs of single corpus windows into the numbers the README quotes.

Long-context windows run as separate processes (two per CPU, or on the H200), one JSON each; a
pooled agreement is then hits over all teacher-forced tokens, with its binomial standard error,
and the pooled perplexity ratio exp(mean NLL difference), which for windows of equal length is the
geometric mean of the windows' ratios -- the same pooling `kvhead eval --prompts N` does inside
one run. Each set is ``NAME=GLOB``; every mode the set's files hold is pooled, and all sets are
written to one JSON and printed as a table.

    python benchmarks/accuracy/accuracy_pool.py \
        docs_8k='benchmarks/results/accuracy/accuracy_docs_comp_8k_w*.json'
"""

from __future__ import annotations

import glob
import json
import math
import sys
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import ACCURACY_RESULTS
from kvhead.eval.harness import EvalReport


def load(paths: list[str]) -> list[tuple[str, EvalReport]]:
    """The runs of one set, by first window; each must hold one context, the same in all."""
    runs = sorted(
        ((p, EvalReport.model_validate_json(Path(p).read_text())) for p in paths),
        key=lambda run: run[1].config.first_window,
    )
    contexts = {r.results[0].context for _, r in runs}
    if any(len(r.results) != 1 for _, r in runs) or len(contexts) != 1:
        raise typer.BadParameter("every file must hold one context, the same in all files of a set")
    return runs


def pool(runs: list[tuple[str, EvalReport]], mode: str) -> dict:
    """One mode of a set of single-context runs, pooled over their windows."""
    modes = [r.results[0].modes[mode] for _, r in runs]
    tokens = sum(m.scored_tokens for m in modes)
    hits = sum(round(m.token_agreement * m.scored_tokens) for m in modes)
    agreement = hits / tokens
    ratios = [r for m in modes for r in m.window_perplexity_ratio]  # windows of equal length
    return {
        "context": runs[0][1].results[0].context,
        "mode": mode,
        "files": [p for p, _ in runs],
        "windows": [
            w
            for _, r in runs
            for w in range(r.config.first_window, r.config.first_window + r.config.prompts)
        ],
        "devices": sorted({r.device for _, r in runs}),
        "tokens": tokens,
        "token_agreement": agreement,
        "agreement_stderr": math.sqrt(agreement * (1 - agreement) / tokens),
        "window_agreement": [a for m in modes for a in m.window_agreement],
        "perplexity_ratio": math.exp(sum(map(math.log, ratios)) / len(ratios)),
        "mean_kl": (
            sum(k for m in modes for k in m.window_kl) / sum(len(m.window_kl) for m in modes)
        ),
        "resident_fraction_max": max(m.resident_fraction for m in modes),
        "promoted_per_rerank_mean": sum(m.promoted_per_rerank for m in modes) / len(modes),
        "miss_margins": [x for m in modes for x in m.miss_margins],
    }


def main(
    sets: Annotated[list[str], typer.Argument(help="NAME=GLOB, one per pooled set.")],
    output: Annotated[Path, typer.Option(help="JSON of every pooled set.")] = ACCURACY_RESULTS
    / "accuracy_pooled.json",
) -> None:
    pooled = {}
    for spec in sets:
        name, sep, pattern = spec.partition("=")
        paths = glob.glob(pattern)
        if not sep or not paths:
            raise typer.BadParameter(f"{spec!r}: expected NAME=GLOB matching result files")
        runs = load(paths)
        for mode in sorted(set.intersection(*(set(r.results[0].modes) for _, r in runs))):
            pooled[f"{name} {mode}"] = pool(runs, mode)
    output.write_text(json.dumps(pooled, indent=1))
    table = Table(title="kvhead eval runs pooled over corpus windows")
    for column in (
        "set",
        "ctx",
        "windows",
        "agreement ± s.e.",
        "PPL ratio",
        "mean KL",
        "resident",
        "promoted",
    ):
        table.add_column(column, justify="right")
    for name, p in pooled.items():
        table.add_row(
            name,
            str(p["context"]),
            ",".join(map(str, p["windows"])),
            f"{p['token_agreement']:.4f} ± {p['agreement_stderr']:.4f}",
            f"{p['perplexity_ratio']:.4f}",
            f"{p['mean_kl']:.5f}",
            f"{p['resident_fraction_max']:.3f}",
            f"{p['promoted_per_rerank_mean']:.1f}",
        )
    Console().print(table)
    print(f"results: {output}")


if __name__ == "__main__":
    typer.run(main)
