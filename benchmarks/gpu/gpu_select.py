"""Rerank selection cost on the GPU (target: "scoring + top-K amortised over R = 16 steps < 10%
of a sparse decode step"), per launch plan, every plan checked against the reference.

For each (context, batch, K), Llama-8B attention shape, int8 page bounds of random bf16 keys:
the sparse decode step (the denominator) and the fp32 flat selection (the "before"), then
int8 flat and two-level (super-pages of 8, 4K candidates) selection, each in the multi-launch
layout with and without programmatic dependent launches, and in one-launch shapes
(``kvhead.kernels.triton.select_one``) at batches up to 8. (Run 3 also timed a two-launch layout,
since removed.) "auto" is the plan
``kernels.select_pages`` takes at that size, looked up among the measured plans; "entry" is
``kernels.select_pages`` itself, checked and timed (the dispatch as it stands when run).
Times are medians of CUDA-graph replays over 8 rotating input sets.

Run: ``python benchmarks/gpu/gpu_select.py`` (``--quick``: tiny sizes, also under
``TRITON_INTERPRET=1`` on CPU). Writes ``benchmarks/results/gpu/gpu_select.json`` and ``.md``
(after every size, so a cut-off run keeps what it measured). Exits 1 if a check failed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from rich.console import Console

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.gpu_kernels import (
    NUM_KV,
    PAGE,
    RERANK_INTERVAL,
    ROTATIONS,
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
    default_num_super,
    flat_select,
    plan_selection,
    score_compact_pages,
    select_in_super_pages,
    select_super_pages,
    super_page_scores,
)
from kvhead.core.pages import PageBounds
from kvhead.kernels.triton.select_hier import (
    FUSE_MAX_PROGRAMS,
    TILE,
    Plan,
    auto_layout,
    auto_pdl,
    hier_select_stages,
)
from kvhead.kernels.triton.select_hier import flat_select as kernel_flat
from kvhead.kernels.triton.select_one import OneShape, default_shape

# True: the multi-launch layout with programmatic dependent launches, False: without them;
# OneShape: one launch (flat and two-level, batch <= 8). The one-launch shapes kept are those
# the dispatch takes or that won somewhere in the one-launch runs (gpu_select_run1/2).
PLANS: dict[str, OneShape | bool] = {
    "multi": True,
    "multi nopdl": False,
    "one mma t128 c256": OneShape(128, 256, mma=True),
    "one mma t64 c256 radix": OneShape(64, 256, mma=True, rank=False),
    "one mma t128 c256 radix": OneShape(128, 256, mma=True, rank=False),
}
ONE_MAX_BATCH = 8  # one-launch plans are timed up to this batch
console = Console()
app = typer.Typer(add_completion=False)


def plan_of(name: str, rows: int, cand_tiles: int) -> Plan:
    shape = PLANS[name]
    if isinstance(shape, bool):
        return Plan("fused" if rows * cand_tiles <= FUSE_MAX_PROGRAMS else "split", pdl=shape)
    return Plan("one", one=shape)


def plans_for(batch: int) -> list[str]:
    """Plans timed at this batch: one-launch shapes up to ONE_MAX_BATCH."""
    return [n for n, s in PLANS.items() if isinstance(s, bool) or batch <= ONE_MAX_BATCH]


def auto_name(rows: int, max_pages: int, top_k: int) -> str:
    """The measured plan that ``kernels.select_pages`` runs at this size, as "flat <plan>" or
    "hier <plan>" ("unmeasured" if its shape is none of PLANS)."""
    two_level = plan_selection(max_pages, top_k, rows=rows) is not None
    k = min(top_k, max_pages)
    first = -(-max_pages // DEFAULT_GROUP) if two_level else max_pages
    cand = default_num_super(top_k, DEFAULT_GROUP) * DEFAULT_GROUP if two_level else max_pages
    kind = "hier" if two_level else "flat"
    layout = auto_layout(rows, -(-cand // TILE), flat=not two_level, first_boxes=first, top_k=k)
    if layout != "one":
        pdl = auto_pdl(rows, layout, flat=not two_level, max_pages=max_pages)
        return f"{kind} multi" + ("" if pdl else " nopdl")
    shape = default_shape(cand)
    return f"{kind} " + next((n for n, s in PLANS.items() if s == shape), "unmeasured")


def set_auto(row: dict) -> None:
    """Fill a row's auto plan and time from its measured plans (current dispatch rules)."""
    row["auto"] = auto_name(row["batch"] * NUM_KV, row["ctx"] // PAGE, row["top_k"])
    kind, name = row["auto"].split(" ", 1)
    if name == "multi nopdl" and name not in row[kind]:  # runs before PDL: multi had none
        name = "multi"
    row["auto_ms"] = row[kind].get(name, float("nan"))
    row["auto_frac_of_sparse"] = row["auto_ms"] / RERANK_INTERVAL / row["sparse_ms"]


def entry_check(
    row: dict,
    tag: str,
    checks: Checks,
    query: torch.Tensor,
    pages: CompactBounds,
    supers: CompactBounds,
    table: torch.Tensor,
    num_pages: torch.Tensor,
    forced: torch.Tensor,
    finite: float,
) -> None:
    """``kernels.select_pages`` against the torch reference of the path it takes."""
    top_k = row["top_k"]
    num_super = plan_selection(table.shape[1], top_k, rows=query.shape[0] * NUM_KV)
    got = kernels.select_pages(query, pages, supers, table, num_pages, top_k)
    if num_super is None:
        ref = flat_select(query, pages, table, num_pages, top_k)
    else:  # second level against the reference inside the kernel's super-pages (near-ties)
        got_sup = hier_select_stages(
            query, pages, supers, table, num_pages, top_k, DEFAULT_GROUP, num_super
        )[1]
        ref = select_in_super_pages(query, pages, got_sup, table, num_pages, top_k, DEFAULT_GROUP)
    checks.true(
        f"entry {tag}: ids valid, counts equal",
        bool(((got >= 0) & (got < table.shape[1])).all())
        and torch.equal((got >= 0).sum(2), (ref >= 0).sum(2)),
    )
    checks.bound(f"entry {tag}: score sets", score_set_gap(forced, got, ref), 1e-5 * finite + 1e-3)


def bench_point(
    ctx: int,
    batch: int,
    top_ks: list[int],
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
) -> list[dict]:
    prob = PagedProblem.random(ctx, batch, device, gen, rotations)
    k_cache, table, num_pages, queries = prob.k_cache, prob.table, prob.num_pages, prob.queries
    max_pages, rows = prob.max_pages, batch * NUM_KV
    bounds = PageBounds(kmin=k_cache.amin(dim=1).float(), kmax=k_cache.amax(dim=1).float())
    pages = CompactBounds.from_pages(bounds)
    supers = build_super_bounds(bounds, table, num_pages, DEFAULT_GROUP)
    clone = lambda c: CompactBounds(c.qmin.clone(), c.qmax.clone(), c.scale.clone())
    page_sets = [pages] + [clone(pages) for _ in range(rotations - 1)]
    super_sets = [supers] + [clone(supers) for _ in range(rotations - 1)]
    forced = score_compact_pages(queries[0], pages, table, num_pages)
    forced[:, :, max_pages - 1] = float("inf")
    finite = forced[forced.isfinite()].abs().max().item()
    sup_scores = super_page_scores(queries[0], supers, num_pages, DEFAULT_GROUP)
    sup_finite = sup_scores[sup_scores.isfinite()].abs().max().item()
    out = []
    for top_k in top_ks:
        tag = f"ctx={ctx} B={batch} K={top_k}"
        sels = [random_selection(gen, max_pages, batch, top_k, device) for _ in range(rotations)]
        sparse_ms = prob.sparse_ms(sels)
        fp32_ms = graph_ms(
            [
                (lambda q=q, k=top_k: kernels.score_and_select(q, bounds, table, num_pages, k))
                for q in queries
            ]
        )
        num_super = default_num_super(top_k, DEFAULT_GROUP)
        row = {
            "ctx": ctx,
            "batch": batch,
            "top_k": top_k,
            "sparse_ms": sparse_ms,
            "flat_fp32_ms": fp32_ms,
            "flat": {},
            "hier": {},
            "num_super": num_super,
        }
        ref_flat = flat_select(queries[0], pages, table, num_pages, top_k)
        ref_sup = select_super_pages(queries[0], supers, num_pages, DEFAULT_GROUP, num_super)
        for name in plans_for(batch):
            flat_plan = plan_of(name, rows, -(-max_pages // TILE))
            got = kernel_flat(queries[0], pages, table, num_pages, top_k, plan=flat_plan)
            checks.true(
                f"flat {name} {tag}: ids valid, counts equal",
                bool(((got >= 0) & (got < max_pages)).all())
                and torch.equal((got >= 0).sum(2), (ref_flat >= 0).sum(2)),
            )
            checks.bound(
                f"flat {name} {tag}: score sets",
                score_set_gap(forced, got, ref_flat),
                1e-5 * finite + 1e-3,
            )
            ms = graph_ms(
                [
                    (
                        lambda q=q, p=p, k=top_k, pl=flat_plan: kernel_flat(
                            q, p, table, num_pages, k, plan=pl
                        )
                    )
                    for q, p in zip(queries, page_sets)
                ]
            )
            row["flat"][name] = ms
        for name in plans_for(batch):
            hier_plan = plan_of(name, rows, -(-num_super * DEFAULT_GROUP // TILE))
            got, got_sup = hier_select_stages(
                queries[0],
                pages,
                supers,
                table,
                num_pages,
                top_k,
                DEFAULT_GROUP,
                num_super,
                plan=hier_plan,
            )
            # pages against the reference's second level inside the kernel's super-pages (a
            # near-tie at the M-th super-page may pick another one of equal score)
            ref = select_in_super_pages(
                queries[0], pages, got_sup, table, num_pages, top_k, DEFAULT_GROUP
            )
            checks.true(
                f"hier {name} {tag}: ids valid, counts equal",
                bool(((got >= 0) & (got < max_pages)).all())
                and torch.equal((got >= 0).sum(2), (ref >= 0).sum(2))
                and torch.equal((got_sup >= 0).sum(2), (ref_sup >= 0).sum(2)),
            )
            checks.bound(
                f"hier {name} {tag}: super-page score sets",
                score_set_gap(sup_scores, got_sup, ref_sup),
                1e-5 * sup_finite + 1e-3,
            )
            checks.bound(
                f"hier {name} {tag}: page score sets",
                score_set_gap(forced, got, ref),
                1e-5 * finite + 1e-3,
            )
            ms = graph_ms(
                [
                    (
                        lambda q=q, p=p, s=s, k=top_k, m=num_super, pl=hier_plan: (
                            hier_select_stages(
                                q, p, s, table, num_pages, k, DEFAULT_GROUP, m, plan=pl
                            )
                        )
                    )
                    for q, p, s in zip(queries, page_sets, super_sets)
                ]
            )
            row["hier"][name] = ms
        entry_check(row, tag, checks, queries[0], pages, supers, table, num_pages, forced, finite)
        row["entry_ms"] = graph_ms(
            [
                (lambda q=q, p=p, s=s, k=top_k: kernels.select_pages(q, p, s, table, num_pages, k))
                for q, p, s in zip(queries, page_sets, super_sets)
            ]
        )
        row["entry_frac_of_sparse"] = row["entry_ms"] / RERANK_INTERVAL / sparse_ms
        set_auto(row)
        out.append(row)
        console.print(
            f"{tag}: sparse {1e3 * sparse_ms:.1f} us, auto {row['auto']} "
            f"{1e3 * row['auto_ms']:.1f} us = "
            f"{100 * row['auto_frac_of_sparse']:.1f}%  flat {row['flat']}  "
            f"hier {row['hier']}"
        )
    return out


def _best(times: dict, prefix: str) -> str:
    """``"us (plan)"`` of the fastest plan whose name starts with ``prefix``, or "-"."""
    some = {n: v for n, v in times.items() if n.startswith(prefix)}
    if not some:
        return "-"
    best = min(some, key=some.get)
    return f"{1e3 * some[best]:.1f} ({best[len(prefix) :].strip()})"


def _multi(times: dict) -> str:
    """Multi-launch time, with the no-PDL time beside it where measured."""
    nopdl = times.get("multi nopdl")
    return f"{1e3 * times['multi']:.1f}" + (f" ({1e3 * nopdl:.1f})" if nopdl else "")


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "## Rerank selection per launch plan (multi-launch, one launch)",
        "",
        (
            "Selection time amortised over R = 16 steps as a share of the sparse decode step "
            "(same K, re-measured here); medians of graph replays over 8 rotating inputs. Flat "
            "int8: every page scored; two-level: super-pages of 8, top M = K/2, top-K of their "
            "4K pages. multi: the multi-launch kernels (2 launches flat, 3-4 two-level; "
            "later launches programmatic dependent ones, in brackets without); one: "
            "one launch, last program per row merges (batch <= 8); two: two launches, each "
            "reduced by its last program per row (two-level; run 3 only, since removed). auto: "
            "the plan "
            "`kernels.select_pages` takes at this size under the current dispatch rules, looked "
            "up among the measured plans (a --rebuild table derives it after the runs); entry: "
            "`kernels.select_pages` itself, timed with the dispatch of the run. "
            f"Checks: {result['checks']} run, {result['failed']} failed."
        ),
        "",
        (
            "| ctx | batch | K | sparse us | flat fp32 % | "
            "flat int8 us: multi (no PDL) / best one | "
            "two-level us: multi (no PDL) / best one / best two | auto | auto us | **auto %** | "
            "entry us (%) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        flat, hier = r["flat"], r["hier"]
        entry = (
            f"{1e3 * r['entry_ms']:.1f} ({100 * r['entry_frac_of_sparse']:.1f})"
            if "entry_ms" in r
            else "-"
        )
        lines.append(
            f"| {r['ctx']} | {r['batch']} | {r['top_k']} | {1e3 * r['sparse_ms']:.1f} | "
            f"{100 * r['flat_fp32_ms'] / RERANK_INTERVAL / r['sparse_ms']:.0f} | "
            f"{_multi(flat)} / {_best(flat, 'one')} | {_multi(hier)} / "
            f"{_best(hier, 'one')} / {_best(hier, 'two')} | {r['auto']} | "
            f"{1e3 * r['auto_ms']:.1f} | **{100 * r['auto_frac_of_sparse']:.1f}** | {entry} |"
        )
    path.write_text("\n".join(lines) + "\n")


@app.command()
def main(
    quick: bool = typer.Option(
        False, help="Tiny sizes: a smoke run (works under the interpreter)."
    ),
    out_dir: str = typer.Option(str(GPU_RESULTS), help="Where JSON and markdown go."),
    contexts: str = typer.Option("8192,32768,131072", help="Comma-separated contexts."),
    batches: str = typer.Option("1,8,64", help="Comma-separated batch sizes."),
    top_ks: str = typer.Option("32,64,128", help="Comma-separated K."),
    seed: int = typer.Option(0, help="Seed of every random input."),
    rebuild: str = typer.Option(
        "",
        help="Comma-separated result JSONs: measure nothing, merge "
        "their rows (later files win), re-derive auto with the current "
        "dispatch rules and write <out-dir>/gpu_select.{json,md}.",
    ),
) -> None:
    """Check and time every plan at every size; write gpu_select.json / .md."""
    if rebuild:
        merged: dict = {}
        runs = [json.loads(Path(f).read_text()) for f in rebuild.split(",")]
        for run in runs:
            for row in run["rows"]:
                set_auto(row)
                merged[(row["ctx"], row["batch"], row["top_k"])] = row
        result = {
            "device": runs[-1]["device"],
            "sources": rebuild.split(","),
            "rows": [merged[key] for key in sorted(merged, key=lambda t: (t[0], t[1], t[2]))],
            "checks": sum(r["checks"] for r in runs),
            "failed": sum(r["failed"] for r in runs),
        }
        Path(out_dir, "gpu_select.json").write_text(json.dumps(result, indent=1))
        write_markdown(Path(out_dir, "gpu_select.md"), result)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_select_quick" if quick else "gpu_select"
    gen = torch.Generator(device=device).manual_seed(seed)
    parse = lambda s: [int(x) for x in s.split(",")]
    ctxs, bs, ks = (
        ([2048], [1, 2], [4, 16]) if quick else (parse(contexts), parse(batches), parse(top_ks))
    )
    rotations = 1 if quick else ROTATIONS
    checks = Checks()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seed": seed,
        "rows": [],
    }
    for ctx in ctxs:
        for batch in bs:
            result["rows"] += bench_point(ctx, batch, ks, checks, device, gen, rotations)
            result.update(checks=checks.count, failed=len(checks.failed), failures=checks.failed)
            (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))
            write_markdown(out_dir / f"{name}.md", result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    console.print(f"checks: {checks.count} run, failed: {checks.failed or 'none'}")
    if checks.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
