"""How many dense heads configuration A should keep, priced by the coverage curves (no model run).

Configuration A keeps 22 heads dense (layers 0-1 and the profile's 16 most RCO-unstable others)
and spreads 68 x 70 pages over the stable heads. Every dense head holds every page, so each one
given back to the stable pool pays for ~7 more pages per stable head at the same residency. For
each count N of dense heads (the leading layers' first, then by RCO instability, as
``kvhead eval --unstable-heads N`` picks them) this prints the ``--top-k`` that keeps A's
resident pages where 8k decoding starts, and the stable heads' summed and worst missed
attention mass under :func:`kvhead.core.budgets.allocate_budgets`, scored on curves ranked every
step and on curves ranked every 8 steps (which also price the drift between reranks). In-sample:
the calibration window's curves set and score the budgets; ``kvhead eval`` is the test
(``accuracy_unstable_heads.sh``). Writes ``benchmarks/results/accuracy/accuracy_dense_count.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import ACCURACY_RESULTS, PROFILE
from kvhead.core.budgets import allocate_budgets, missed_mass
from kvhead.core.stability import HeadProfile
from kvhead.eval.harness import profile_pool

app = typer.Typer(add_completion=False)


@app.command()
def main(
    profile: Path = PROFILE,
    drift_profile: Path = ACCURACY_RESULTS / "accuracy_profile_w05_r8.json",
    leading_layers: int = 2,
    top_k: int = 70,
    context: int = 8192,
    gen_tokens: int = 256,
    output: Path = ACCURACY_RESULTS / "accuracy_dense_count.json",
) -> None:
    curves = {
        "every step": HeadProfile.load(profile),
        "every 8 steps": HeadProfile.load(drift_profile),
    }
    prof = curves["every step"]
    if any(p.coverage is None for p in curves.values()):
        raise typer.BadParameter("both profiles need coverage curves (kvhead coverage)")
    heads = prof.num_layers * prof.num_kv_heads
    start, pool = profile_pool(prof, context, gen_tokens, top_k)
    base = len(prof.unstable)
    rows = []
    for count in range(base, leading_layers * prof.num_kv_heads - 1, -1):
        dense = prof.unstable_mask(leading_layers, count)
        k = (pool - count * start) // (heads - count)
        row = {"dense_heads": count, "top_k": k, "pool": count * start + (heads - count) * k}
        for name, p in curves.items():
            budgets = allocate_budgets(p.coverage, ~dense, k)
            missed = missed_mass(p.coverage, ~dense, budgets)
            row[name] = {"missed_sum": float(missed.sum()), "missed_max": float(missed.max())}
        rows.append(row)
    table = Table(
        title=f"dense heads vs stable budgets at A's residency ({pool} pages at {context} tokens)"
    )
    for column in (
        "dense heads",
        "--top-k",
        "missed sum (ranked every step)",
        "worst head",
        "missed sum (every 8 steps)",
        "worst head",
    ):
        table.add_column(column, justify="right")
    for r in rows:
        a, b = r["every step"], r["every 8 steps"]
        table.add_row(
            str(r["dense_heads"]),
            str(r["top_k"]),
            f"{a['missed_sum']:.2f}",
            f"{a['missed_max']:.3f}",
            f"{b['missed_sum']:.2f}",
            f"{b['missed_max']:.3f}",
        )
    Console().print(table)
    output.write_text(
        json.dumps(
            {
                "profile": str(profile),
                "drift_profile": str(drift_profile),
                "leading_layers": leading_layers,
                "pool": pool,
                "rows": rows,
            },
            indent=1,
        )
    )
    print(f"wrote {output}")


if __name__ == "__main__":
    app()
