"""Launch-plan sweep of the int8 rerank selection (and the timing of the int8 bounds append).

For each (context, batch, K) of the selection table in ``gpu_kernels.py``, every plan of
:class:`kvhead.kernels.triton.select_hier.Plan` listed below is checked against the torch reference
(each level's score set, NaN fails) and timed as a share of the sparse decode step, amortised
over R = 16 steps. Plans: the layout (first level fused into the candidate programs or in
its own launch) and the scoring (CUDA-core fp32 or int8
tensor-core digits, tile, tiles per program, pipeline stages). "before" is the layout rule of
the previous default with CUDA-core scoring.

Also times :func:`kvhead.kernels.append_bounds` (int8 page and super-page bounds on append,
one launch) beside the fp32 ``update_bounds`` (two launches), after checking the append
bit-for-bit against :meth:`kvhead.core.bounds.live.LiveBounds.append`.

Run: ``python benchmarks/gpu/hier_select_sweep.py`` (``--quick``: tiny sizes, also under
``TRITON_INTERPRET=1``). Writes ``benchmarks/results/gpu/hier_select_sweep.json``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.gpu_kernels import (
    DIM,
    NUM_KV,
    PAGE,
    RERANK_INTERVAL,
    Checks,
    PagedProblem,
    random_selection,
    score_set_gap,
)
from benchmarks.gpu.timing import graph_ms
from kvhead import kernels
from kvhead.core.bounds.compact import (
    DEFAULT_GROUP,
    CompactBounds,
    build_super_bounds,
    flat_select,
    plan_selection,
    score_compact_pages,
    select_in_super_pages,
    select_super_pages,
    super_page_scores,
)
from kvhead.core.bounds.live import LiveBounds
from kvhead.core.pages import PageBounds
from kvhead.kernels.triton.select_hier import Plan, Scoring, hier_select_stages

console = Console()
app = typer.Typer(add_completion=False)

MMA = Scoring(mma=True)
T64 = Scoring(True, 64, 2, 2)
PLANS: dict[str, tuple[str, Scoring]] = {  # name: (layout, scoring)
    "before": ("old", Scoring()),
    "grid mma": ("old", MMA),
    "grid mma t64x2 s2": ("old", T64),
    "fused mma t64x2 s2": ("fused", T64),
    "split mma t64x2 s2": ("split", T64),
    "grid mma t128": ("old", Scoring(True, 128, 1, 1)),
}


def _plan(name: str, rows: int, cand_tiles: int) -> Plan:
    layout, scoring = PLANS[name]
    if layout == "old":  # the previous rule: fused first level on small grids, else split
        layout = "fused" if rows * cand_tiles <= 256 else "split"
    return Plan(layout, scoring)


def sweep_point(
    ctx: int,
    batch: int,
    top_ks: list[int],
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
) -> list[dict]:
    prob = PagedProblem.random(ctx, batch, device, gen, rotations)
    table, num_pages, queries, max_pages = prob.table, prob.num_pages, prob.queries, prob.max_pages
    bounds = PageBounds(
        kmin=prob.k_cache.amin(dim=1).float(), kmax=prob.k_cache.amax(dim=1).float()
    )
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, DEFAULT_GROUP)
    clone = lambda c: CompactBounds(c.qmin.clone(), c.qmax.clone(), c.scale.clone())
    page_sets = [pages] + [clone(pages) for _ in range(rotations - 1)]
    super_sets = [supers] + [clone(supers) for _ in range(rotations - 1)]
    forced = score_compact_pages(queries[0], pages, table, num_pages)
    forced[:, :, max_pages - 1] = float("inf")
    finite = forced[forced.isfinite()].abs().max().item()
    rows_out = []
    for top_k in top_ks:
        sels = [random_selection(gen, max_pages, batch, top_k, device) for _ in range(rotations)]
        sparse_ms = prob.sparse_ms(sels)
        num_super = plan_selection(max_pages, top_k)
        flat = num_super is None
        num_cand = max_pages if flat else num_super * DEFAULT_GROUP
        tag = f"ctx={ctx} B={batch} K={top_k}"
        row = {
            "ctx": ctx,
            "batch": batch,
            "top_k": top_k,
            "sparse_ms": sparse_ms,
            "path": "flat int8" if flat else f"G={DEFAULT_GROUP} M={num_super}",
            "plans": {},
        }
        if not flat:
            ref_sup = select_super_pages(queries[0], supers, num_pages, DEFAULT_GROUP, num_super)
            sup_scores = super_page_scores(queries[0], supers, num_pages, DEFAULT_GROUP)
            sup_finite = sup_scores[sup_scores.isfinite()].abs().max().item()
        for name in PLANS:
            if PLANS[name][0] in ("fused", "split") and flat:
                continue
            plan = _plan(name, batch * NUM_KV, -(-num_cand // 32))
            if flat:
                got = _flat(queries[0], pages, table, num_pages, top_k, plan)
                ref = flat_select(queries[0], pages, table, num_pages, top_k)
                checks.bound(
                    f"{tag} {name}: score sets",
                    score_set_gap(forced, got, ref),
                    1e-5 * finite + 1e-3,
                )
                call = lambda q, p, s, k=top_k, pl=plan: _flat(q, p, table, num_pages, k, pl)
            else:
                got, got_sup = hier_select_stages(
                    queries[0],
                    pages,
                    supers,
                    table,
                    num_pages,
                    top_k,
                    DEFAULT_GROUP,
                    num_super,
                    plan=plan,
                )
                ref = select_in_super_pages(
                    queries[0], pages, got_sup, table, num_pages, top_k, DEFAULT_GROUP
                )
                checks.bound(
                    f"{tag} {name}: super-page score sets",
                    score_set_gap(sup_scores, got_sup, ref_sup),
                    1e-5 * sup_finite + 1e-3,
                )
                checks.bound(
                    f"{tag} {name}: page score sets",
                    score_set_gap(forced, got, ref),
                    1e-5 * finite + 1e-3,
                )
                call = lambda q, p, s, k=top_k, m=num_super, pl=plan: hier_select_stages(
                    q, p, s, table, num_pages, k, DEFAULT_GROUP, m, plan=pl
                )
            checks.true(f"{tag} {name}: ids valid", bool(((got >= 0) & (got < max_pages)).all()))
            ms = graph_ms(
                [
                    (lambda q=q, p=p, s=s, c=call: c(q, p, s))
                    for q, p, s in zip(queries, page_sets, super_sets)
                ]
            )
            row["plans"][name] = {"ms": ms, "frac_of_sparse": ms / RERANK_INTERVAL / sparse_ms}
        rows_out.append(row)
        console.print(
            f"{tag} sparse {1e3 * sparse_ms:.1f} us: "
            + ", ".join(f"{n} {1e3 * v['ms']:.1f}" for n, v in row["plans"].items())
        )
    return rows_out


def _flat(q, pages, table, num_pages, top_k, plan):
    from kvhead.kernels.triton.select_hier import flat_select as kernel

    return kernel(q, pages, table, num_pages, top_k, plan)


def time_append(
    batch: int, ctx: int, checks: Checks, device: torch.device, gen: torch.Generator
) -> dict:
    """One decode token per sequence into int8 bounds (+ super-pages of a ``ctx`` table)."""
    max_pages = ctx // PAGE
    live = LiveBounds.empty(
        batch * max_pages, batch, max_pages, NUM_KV, DIM, PAGE, DEFAULT_GROUP, device
    )
    for t in (live.open_min, live.open_max):
        t.copy_(torch.randn(t.shape, generator=gen, device=device))
    live.open_max.copy_(torch.maximum(live.open_min, live.open_max))
    keys = torch.randn(batch, NUM_KV, DIM, device=device, generator=gen).bfloat16()
    # Every row closes a page and its group: the slowest case (both rounded and stored).
    pos = torch.full((batch,), PAGE * DEFAULT_GROUP * 3 - 1, device=device)
    slots = torch.arange(batch, device=device) * max_pages * PAGE + pos
    ref = LiveBounds(
        *(
            CompactBounds(c.qmin.clone(), c.qmax.clone(), c.scale.clone())
            for c in (live.pages, live.supers)
        ),
        live.open_min.clone(),
        live.open_max.clone(),
        PAGE,
        DEFAULT_GROUP,
    )
    ref.append(keys, slots, pos)
    kernels.append_bounds(live, keys, slots, pos)
    same = all(
        torch.equal(a, b)
        for a, b in (
            (live.pages.qmin, ref.pages.qmin),
            (live.pages.qmax, ref.pages.qmax),
            (live.pages.scale, ref.pages.scale),
            (live.supers.qmin, ref.supers.qmin),
            (live.supers.qmax, ref.supers.qmax),
            (live.supers.scale, ref.supers.scale),
            (live.open_min, ref.open_min),
            (live.open_max, ref.open_max),
        )
    )
    checks.true(f"append_bounds B={batch} bit-exact", same)
    append_ms = graph_ms([lambda: kernels.append_bounds(live, keys, slots, pos)], repeat=8)
    fp32 = PageBounds(
        kmin=torch.zeros(batch * max_pages, NUM_KV, DIM, device=device),
        kmax=torch.zeros(batch * max_pages, NUM_KV, DIM, device=device),
    )
    update_ms = graph_ms([lambda: kernels.update_bounds(fp32, keys, slots, PAGE)], repeat=8)
    return {"batch": batch, "ctx": ctx, "append_int8_ms": append_ms, "update_fp32_ms": update_ms}


@app.command()
def main(
    quick: bool = typer.Option(
        False, help="Tiny sizes: a smoke run (works under the interpreter)."
    ),
    out: Path = typer.Option(GPU_RESULTS / "hier_select_sweep.json", help="Where the JSON goes."),
    seed: int = typer.Option(0, help="Seed of every random input."),
    contexts: str = typer.Option("8192,32768,131072", help="Comma-separated contexts."),
    batches: str = typer.Option("1,8,64", help="Comma-separated batch sizes."),
) -> None:
    """Check and time every plan; print the best per point; write the JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    checks = Checks()
    ctx_list = [32768] if quick else [int(c) for c in contexts.split(",")]
    batch_list = [1] if quick else [int(b) for b in batches.split(",")]
    top_ks = [8] if quick else [32, 64, 128]
    rotations = 1 if quick else 8
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "loadavg": os.getloadavg(),
        "plans": {n: [p[0], p[1].__dict__] for n, p in PLANS.items()},
        "append": [time_append(b, ctx_list[-1], checks, device, gen) for b in batch_list],
        "rows": [],
    }
    console.print(result["append"])
    for ctx in ctx_list:
        for batch in batch_list:
            result["rows"] += sweep_point(ctx, batch, top_ks, checks, device, gen, rotations)
            result["checks"] = {"count": checks.count, "failed": checks.failed}
            out.write_text(json.dumps(result, indent=1))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = Table(title="selection / 16 as % of the sparse step (best plan vs before)")
    for col in ("ctx", "B", "K", "sparse us", "before %", "best %", "best plan"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        best = min(r["plans"], key=lambda n: r["plans"][n]["ms"])
        table.add_row(
            str(r["ctx"]),
            str(r["batch"]),
            str(r["top_k"]),
            f"{1e3 * r['sparse_ms']:.1f}",
            f"{100 * r['plans']['before']['frac_of_sparse']:.1f}",
            f"{100 * r['plans'][best]['frac_of_sparse']:.1f}",
            best,
        )
    console.print(table)
    console.print(f"checks: {checks.count}, failed: {checks.failed or 'none'}")
    if checks.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
