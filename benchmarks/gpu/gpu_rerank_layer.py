"""The overlapped rerank beside whole decoder-layer steps.

``gpu_rerank_overlap.py`` put ``kernels.select_pages`` on a side stream beside 16 sparse
attention steps: attention-only neighbours. In a model the selection runs beside the layer's
weight GEMMs too, which at small batch stream weights from HBM, the resource the selection's
bound reads need. Here each of a window's 16 steps is one Llama-8B decoder layer at that batch:
x @ Wqkv [4096 x 6144], the sparse attention step of ``gpu_rerank_overlap`` (same kernel,
inputs, rotating page lists), attn @ Wo [4096 x 4096], x @ Wgate_up [4096 x 28672],
SiLU(gate) * up, act @ Wdown [14336 x 4096], bf16, random weights allocated once (436 MB, far
beyond the L2, so every step streams them). Skipped: RMSNorms, residual adds, RoPE; the
attention reads the problem's rotating query, not the Wqkv output (so its selections and
outputs stay those of the attention-only harness); the MLP reads the Wo output.

Variants (one CUDA graph each, 8 windows of 16 steps, rotating inputs, medians of interleaved
replays, as ``gpu_rerank_overlap``): ``steps`` / ``overlap`` / ``select`` (the attention-only
baseline, its overlapped rerank and the selection alone, for the denominators); ``layer``
(16 layer steps, no rerank); ``layer_overlap`` (the window's selection forked to a side stream
at its start, joined at its end); ``layer_front`` (the selection in front of the layer steps on
one stream); ``layer4_overlap`` (4 layers' selections queued on one side stream at the start of
4 windows = 16 x 4 layer steps, joined at their end: the same selections per layer step as
``layer_overlap``, all layers reranking at the same model step). Added time per step =
(T_variant - T_layer) / 16 per window; shares over the sparse attention step (the target's
measure: added / 16 / T_sparse_step) and over the layer step. Checks: every graph's
selections equal eager ``select_pages``, window 0 against the torch reference, and every
graph's last attention and MLP outputs equal their baseline's.

Run: ``python benchmarks/gpu/gpu_rerank_layer.py`` (``--quick``: tiny
GEMMs and contexts, also on CPU under ``TRITON_INTERPRET=1``, times meaningless). Writes
``<out-dir>/<name>.{json,md}`` after every (context, batch).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import torch.nn.functional as F
import triton
import typer
from rich.console import Console

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.gpu_kernels import DIM, NUM_Q, RERANK_INTERVAL, ROTATIONS, Checks, PagedProblem
from benchmarks.gpu.gpu_rerank_overlap import RerankInputs, Window, capture, time_rounds

ATTN = ("steps", "overlap", "select")
LAYER = ("layer", "layer_overlap", "layer_front", "layer4_overlap")
ADDED = LAYER[1:]
GROUP4 = 4  # layers whose reranks queue on one side stream in ``layer4_overlap``
console = Console()
app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class LayerShape:
    """GEMM sizes of one decoder layer; the Wo input is the attention output (NUM_Q x DIM).
    A dataclass, not pydantic: the device machine's environment has no pydantic."""

    hidden: int = 4096
    qkv: int = 6144
    inter: int = 14336


class LayerWeights:
    """Random bf16 weights of one layer, scaled so activations stay O(1) (no bf16 overflow)."""

    def __init__(self, shape: LayerShape, device: torch.device, gen: torch.Generator) -> None:
        def w(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, device=device, generator=gen) * rows**-0.5).to(
                torch.bfloat16
            )

        self.shape = shape
        self.qkv = w(shape.hidden, shape.qkv)
        self.o = w(NUM_Q * DIM, shape.hidden)
        self.gate_up = w(shape.hidden, 2 * shape.inter)
        self.down = w(shape.inter, shape.hidden)


class LayerWindow:
    """Issues the layer variants' windows on the current stream (captured into a graph)."""

    def __init__(self, attn: Window, weights: LayerWeights, gen: torch.Generator) -> None:
        self.attn, self.w = attn, weights
        prob = attn.prob
        batch, rot = prob.table.shape[0], len(attn.sels)
        self.xs = [
            torch.randn(batch, weights.shape.hidden, device=prob.k_cache.device, generator=gen).to(
                torch.bfloat16
            )
            for _ in range(rot)
        ]
        cuda = prob.k_cache.is_cuda
        self.side = torch.cuda.Stream() if cuda else None

    def layer_step(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One layer at rotation ``r``; returns (attention output, MLP output)."""
        x = self.xs[r]
        _ = x @ self.w.qkv  # the projection's cost; the attention reads the problem's query
        attn = self.attn.step(r)
        h = attn.reshape(attn.shape[0], -1) @ self.w.o
        gate, up = (h @ self.w.gate_up).chunk(2, dim=-1)
        return attn, (F.silu(gate) * up) @ self.w.down

    def issue(self, variant: str) -> tuple[list[torch.Tensor], tuple[torch.Tensor, ...]]:
        """All windows of ``variant``: the selections and the last layer step's outputs."""
        group = GROUP4 if variant == "layer4_overlap" else 1
        forks = variant in ("layer_overlap", "layer4_overlap")
        side, rot = self.side, len(self.attn.sels)
        main = torch.cuda.current_stream() if side is not None else None
        chosen, out = [], ()
        for w in range(rot):
            if variant == "layer_front":
                chosen.append(self.attn.select(w))
            if forks and w % group == 0:
                if side is not None:
                    side.wait_stream(main)
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    chosen += [self.attn.select(v) for v in range(w, w + group)]
            for i in range(self.attn.steps):
                out = self.layer_step((w + i) % rot)  # the same order in every variant
            if forks and side is not None and w % group == group - 1:
                main.wait_stream(side)
        return chosen, out


def bench_point(
    ctx: int,
    batch: int,
    top_ks: list[int],
    weights: LayerWeights,
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
    steps: int,
    rounds: int,
) -> list[dict]:
    prob = PagedProblem.random(ctx, batch, device, gen, rotations)
    inputs = RerankInputs(prob, rotations)
    rows = []
    for top_k in top_ks:
        tag = f"ctx={ctx} B={batch} K={top_k}"
        win, eager = inputs.window(prob, gen, top_k, steps, checks, tag)
        layer = LayerWindow(win, weights, gen)
        runs, results = {}, {}
        for name in ATTN:
            runs[name], results[name] = capture(lambda n=name, w=win: w.issue(n))
        for name in LAYER:
            runs[name], results[name] = capture(lambda n=name, w=layer: w.issue(n))
        for name, (chosen, out) in results.items():
            if chosen:
                checks.true(
                    f"{name} {tag}: graph selections equal eager select_pages",
                    len(chosen) == rotations
                    and all(torch.equal(c, e) for c, e in zip(chosen, eager)),
                )
            if name in ATTN[1:2]:
                checks.true(
                    f"{name} {tag}: attention equals the baseline's",
                    torch.equal(out, results["steps"][1]),
                )
            if name in ADDED:
                checks.true(
                    f"{name} {tag}: attention and MLP outputs equal the baseline's",
                    all(torch.equal(a, b) for a, b in zip(out, results["layer"][1])),
                )
        checks.true(
            f"layer {tag}: attention equals the attention-only baseline's",
            torch.equal(results["layer"][1][0], results["steps"][1]),
        )
        times = time_rounds(runs, rounds, lambda: None)
        ms = {n: statistics.median(t) / rotations for n, t in times.items()}  # per window
        sparse_ms, layer_ms = ms["steps"] / steps, ms["layer"] / steps
        added = {n: (ms[n] - ms["layer"]) / steps for n in ADDED}  # ms per layer step
        row = {
            "ctx": ctx,
            "batch": batch,
            "top_k": top_k,
            "steps": steps,
            "rounds": rounds,
            "window_ms": ms,
            "sparse_step_ms": sparse_ms,
            "layer_step_ms": layer_ms,
            "select_ms": ms["select"],
            "attn_overlap_share": (ms["overlap"] - ms["steps"]) / steps / sparse_ms,
            "serialised_share": ms["select"] / steps / sparse_ms,
            "added_ms_per_step": added,
            "share_of_sparse": {n: a / sparse_ms for n, a in added.items()},
            "share_of_layer": {n: a / layer_ms for n, a in added.items()},
            "spread": {n: (min(t) / rotations, max(t) / rotations) for n, t in times.items()},
        }
        rows.append(row)
        s, l = row["share_of_sparse"], row["share_of_layer"]
        console.print(
            f"{tag}: sparse {1e3 * sparse_ms:.1f} us, layer {1e3 * layer_ms:.1f} us, select "
            f"{1e3 * ms['select']:.1f} us; added/step us (of sparse %, of layer %): "
            + ", ".join(
                f"{n} {1e3 * added[n]:.2f} ({100 * s[n]:.1f}, {100 * l[n]:.2f})" for n in ADDED
            )
            + f"; attention-only overlap {100 * row['attn_overlap_share']:.1f}%"
        )
    return rows


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "## Rerank beside whole decoder-layer steps (Llama-8B layer, bf16)",
        "",
        (
            "Per window of R = 16 steps, medians of interleaved CUDA-graph replays of 8 windows. "
            "layer step: Wqkv, the sparse attention step, Wo, Wgate_up, SiLU-mul, Wdown (no "
            "norms, residuals, RoPE). sparse step: the attention step alone (today's "
            "denominator). added: (window with the rerank - window without) / 16, per layer "
            "step; % sparse = added / sparse step (the target's measure), % layer = added / layer "
            "step. overlap: the window's `select_pages` on a side stream; front: in front on one "
            "stream; 4 queued: 4 layers' selections queued on one side stream beside 16 x 4 layer "
            "steps (per layer step the same number of selections). attn-only: the overlap beside "
            "attention steps only (gpu_rerank_overlap's measure, this run). Set applied one step "
            f"late. Checks: {result['checks']} run, {result['failed']} failed."
        ),
        "",
        (
            "| ctx | batch | K | sparse us | layer us | select us | serialised % | attn-only "
            "overlap % | overlap added us | **% sparse** | % layer | front added us | % sparse | "
            "% layer | 4 queued added us | **% sparse** | % layer |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        cells = []
        for n in ADDED:
            cells += [
                f"{1e3 * r['added_ms_per_step'][n]:.2f}",
                f"{100 * r['share_of_sparse'][n]:.1f}",
                f"{100 * r['share_of_layer'][n]:.2f}",
            ]
        cells[1], cells[7] = f"**{cells[1]}**", f"**{cells[7]}**"
        lines.append(
            f"| {r['ctx']} | {r['batch']} | {r['top_k']} | {1e3 * r['sparse_step_ms']:.1f} | "
            f"{1e3 * r['layer_step_ms']:.1f} | {1e3 * r['select_ms']:.1f} | "
            f"{100 * r['serialised_share']:.1f} | {100 * r['attn_overlap_share']:.1f} | "
            + " | ".join(cells)
            + " |"
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
    rounds: int = typer.Option(30, help="Interleaved replays of every variant per point."),
    name: str = typer.Option("gpu_rerank_layer", help="Result file stem."),
    seed: int = typer.Option(0, help="Seed of every random input."),
) -> None:
    """Time every variant at every size; write <name>.json / .md; exit 1 if a check failed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device=device).manual_seed(seed)
    parse = lambda s: [int(x) for x in s.split(",")]
    ctxs, bs, ks = (
        ([2048], [1, 2], [4, 16]) if quick else (parse(contexts), parse(batches), parse(top_ks))
    )
    shape = LayerShape(hidden=256, qkv=384, inter=512) if quick else LayerShape()
    rotations, steps = (GROUP4, 3) if quick else (ROTATIONS, RERANK_INTERVAL)
    rounds = 2 if quick else rounds
    weights = LayerWeights(shape, device, gen)
    checks = Checks()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seed": seed,
        "shape": asdict(shape),
        "rows": [],
    }
    for ctx in ctxs:
        for batch in bs:
            result["rows"] += bench_point(
                ctx, batch, ks, weights, checks, device, gen, rotations, steps, rounds
            )
            result.update(checks=checks.count, failed=len(checks.failed), failures=checks.failed)
            (out / f"{name}.json").write_text(json.dumps(result, indent=1))
            write_markdown(out / f"{name}.md", result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    console.print(f"checks: {checks.count} run, failed: {checks.failed or 'none'}")
    if checks.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
