"""Summary table and result files shared by the page-selection quality benchmarks.

``hier_select_quality.py`` (real SmolLM2 attention) and ``hier_select_long.py`` (synthetic keys
at 8k-128k) measure the same two numbers per selection variant -- overlap with the exact fp32
top-K and the share of true attention mass covered -- so they summarise, print and write them
the same way; only the grouping columns differ (``ctx`` exists only in the long-context runs).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from rich.console import Console
from rich.table import Table

METRICS = ("overlap_mean", "overlap_min", "mass_mean", "mass_min")
HEADERS = {
    "ctx": "ctx",
    "top_k": "K",
    "variant": "variant",
    "overlap_mean": "overlap mean",
    "overlap_min": "overlap min",
    "mass_mean": "mass mean",
    "mass_min": "mass min",
}


def summarize(rows: list[dict], by: tuple[str, ...]) -> list[dict]:
    """Mean and worst case of ``overlap`` and ``mass`` per distinct value of the ``by`` fields."""
    out = []
    for key in sorted({tuple(r[f] for f in by) for r in rows}):
        sel = [r for r in rows if tuple(r[f] for f in by) == key]
        out.append(
            {
                **dict(zip(by, key, strict=True)),
                "samples": len(sel),
                "overlap_mean": statistics.fmean(r["overlap"] for r in sel),
                "overlap_min": min(r["overlap"] for r in sel),
                "mass_mean": statistics.fmean(r["mass"] for r in sel),
                "mass_min": min(r["mass"] for r in sel),
            }
        )
    return out


def _cells(row: dict, by: tuple[str, ...]) -> list[str]:
    return [str(row[f]) for f in by] + [f"{row[m]:.3f}" for m in METRICS]


def report(
    summary: list[dict],
    by: tuple[str, ...],
    *,
    console: Console,
    title: str,
    heading: str,
    description: str,
    result: dict,
    out_dir: Path,
    name: str,
) -> None:
    """Print the summary table, then write ``<name>.json`` (``result``) and ``<name>.md``."""
    table = Table(title=title)
    for col in (*by, *METRICS):
        table.add_column(HEADERS[col], justify="right")
    for row in summary:
        table.add_row(*_cells(row, by))
    console.print(table)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
    header = [HEADERS[c] for c in (*by, *METRICS)]
    lines = [
        f"# {heading}",
        "",
        description,
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    lines += ["| " + " | ".join(_cells(row, by)) + " |" for row in summary]
    (out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")
