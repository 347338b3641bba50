"""What a stable head's rerank costs the decode when it runs beside it.

The "< 10%" target has been measured serialised: ``kernels.select_pages`` timed alone, divided
by R = 16 and by one sparse decode step. A pipelined FlexiCache need not wait for it: step t's
rerank can start from step t's query on a side stream while the decode goes on, and its top-K
set takes effect from step t + 1 (one more step of staleness per rerank; the accuracy of that
is the policy's ``rerank_lag``, measured elsewhere). Its cost is then what it adds to the steps
it overlaps with (SM and bandwidth contention), not its latency.

Per (context, batch, K), Llama-8B attention shape, the inputs of ``gpu_select.py`` (random bf16
KV, int8 bounds, random top-K page lists for the attention), one CUDA graph per variant, each
of 8 windows of R = 16 sparse decode steps over rotating (query, page list) sets:

- ``steps``: the 16 steps, no rerank (the baseline);
- ``overlap`` / ``overlap_hi``: ``select_pages`` on the window's first query, forked to a side
  stream at the window's start (default / highest priority); the window ends when both streams
  are done, so a selection outlasting the steps shows up in the time;
- ``lag1``: as ``overlap``, but step 2 waits for the selection (an attention-only stand-in for
  a set needed by the very next step; in a model the next step of a layer comes a whole model
  step later);
- ``serial``: selection, then the steps, one stream (today's serialised cost, in this harness);
- ``select``: the selections alone (today's "entry" time);
- ``stamped``: ``overlap`` with GPU timer stamps at the window start, the selection's end and the
  steps' end (when the selection finishes under contention; not used for costs).

Cost of a variant = (T_variant - T_steps) / R / T_step with T_step = T_steps / R, medians over
interleaved replays (variants in rotating order, so drift hits all alike). Checks: every graph's
side-stream selections equal the eager ``select_pages`` of the same inputs, window 0 against
the torch reference (as ``gpu_select.py``), and the attention output equals the baseline's.

Run: ``python benchmarks/gpu/gpu_rerank_overlap.py`` (``--quick``: tiny
sizes, also under ``TRITON_INTERPRET=1`` on CPU, where streams and graphs are absent and the
times mean nothing). Writes ``<out-dir>/gpu_rerank_overlap.{json,md}`` after every size.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import triton
import triton.language as tl
import typer
from rich.console import Console

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.gpu_kernels import (
    DIM,
    RERANK_INTERVAL,
    ROTATIONS,
    Checks,
    PagedProblem,
    random_selection,
)
from benchmarks.gpu.gpu_select import entry_check
from kvhead import kernels
from kvhead.core.bounds.compact import (
    DEFAULT_GROUP,
    CompactBounds,
    build_super_bounds,
    score_compact_pages,
)
from kvhead.core.pages import PageBounds
from kvhead.kernels.triton.attention import sparse_decode_attention as kernel_attention

VARIANTS = ("steps", "overlap", "overlap_hi", "lag1", "serial", "select", "stamped")
COSTED = ("overlap", "overlap_hi", "lag1", "serial")
console = Console()
app = typer.Typer(add_completion=False)


@triton.jit
def _stamp_kernel(buf_ptr, slot):
    now = tl.inline_asm_elementwise(
        "mov.u64 $0, %globaltimer;", "=l", [], dtype=tl.int64, is_pure=False, pack=1
    )
    tl.store(buf_ptr + slot, now)


def stamp(buf: torch.Tensor, slot: int) -> None:
    """Write the device's nanosecond timer (host clock without CUDA) to ``buf[slot]``."""
    if buf.is_cuda:
        _stamp_kernel[(1,)](buf, slot)
    else:
        buf[slot] = time.perf_counter_ns()


class Window:
    """Issues one variant's 8 windows on the current stream (captured into a graph on CUDA)."""

    def __init__(
        self,
        prob: PagedProblem,
        sels: list[torch.Tensor],
        pages: list[CompactBounds],
        supers: list[CompactBounds],
        top_k: int,
        steps: int,
    ) -> None:
        self.prob, self.sels, self.pages, self.supers = prob, sels, pages, supers
        self.top_k, self.steps = top_k, steps
        cuda = prob.k_cache.is_cuda
        self.side = {
            "overlap": torch.cuda.Stream() if cuda else None,
            "overlap_hi": torch.cuda.Stream(priority=-8) if cuda else None,
        }
        self.stamps = torch.zeros(3 * len(sels), dtype=torch.int64, device=prob.k_cache.device)

    def select(self, w: int) -> torch.Tensor:
        return kernels.select_pages(
            self.prob.queries[w],
            self.pages[w],
            self.supers[w],
            self.prob.table,
            self.prob.num_pages,
            self.top_k,
        )

    def step(self, r: int) -> torch.Tensor:
        p = self.prob
        return kernel_attention(
            p.queries[r], p.k_cache, p.v_cache, p.table, p.seq_lens, self.sels[r], DIM**-0.5
        )[0]

    def issue(self, variant: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """All windows of ``variant``; returns the selections and the last attention output."""
        side = self.side["overlap_hi" if variant == "overlap_hi" else "overlap"]
        forks = variant in ("overlap", "overlap_hi", "lag1", "stamped")
        main = torch.cuda.current_stream() if side is not None else None
        chosen, out = [], None
        rot = len(self.sels)
        for w in range(rot):
            if variant == "stamped":
                stamp(self.stamps, 3 * w)
            if variant in ("select", "serial"):
                chosen.append(self.select(w))
            if forks:
                if side is not None:
                    side.wait_stream(main)
                with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
                    chosen.append(self.select(w))
                    if variant == "stamped":
                        stamp(self.stamps, 3 * w + 1)
            if variant == "select":
                continue
            for i in range(self.steps):
                out = self.step((w + i) % rot)  # window w starts with query w, its rerank's
                if variant == "lag1" and i == 0 and side is not None:
                    main.wait_stream(side)
            if variant == "stamped":
                stamp(self.stamps, 3 * w + 2)
            if forks and side is not None:
                main.wait_stream(side)
        return chosen, out


def capture(fn: Callable[[], object]) -> tuple[Callable[[], None], object]:
    """A graph of ``fn`` (after an eager warm-up on a side stream) and what ``fn`` returned
    during capture (its tensors hold the replay's results); eager calls without CUDA."""
    if not torch.cuda.is_available():
        return fn, fn()
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        fn()
    torch.cuda.current_stream().wait_stream(warm)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    graph.replay()
    torch.cuda.synchronize()
    return graph.replay, result


def time_rounds(
    runs: dict[str, Callable[[], None]], rounds: int, after_round: Callable[[], None]
) -> dict[str, list[float]]:
    """Milliseconds per replay of each run, variants interleaved in rotating order."""
    names, times = list(runs), {n: [] for n in runs}
    cuda = torch.cuda.is_available()
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        events = []
        for name in order:
            if cuda:
                start, end = (torch.cuda.Event(enable_timing=True) for _ in range(2))
                start.record()
                runs[name]()
                end.record()
                events.append((name, start, end))
            else:
                t0 = time.perf_counter()
                runs[name]()
                times[name].append((time.perf_counter() - t0) * 1e3)
        if cuda:
            torch.cuda.synchronize()
            for name, start, end in events:
                times[name].append(start.elapsed_time(end))
        after_round()
    return times


class RerankInputs:
    """One point's rotating bound sets (copies, so each window's selection reads HBM) and the
    reference scores that ``entry_check`` compares window 0's selection with."""

    def __init__(self, prob: PagedProblem, rotations: int) -> None:
        bounds = PageBounds(
            kmin=prob.k_cache.amin(dim=1).float(), kmax=prob.k_cache.amax(dim=1).float()
        )
        self.pages = CompactBounds.from_pages(bounds)
        self.supers = build_super_bounds(bounds, prob.table, prob.num_pages, DEFAULT_GROUP)
        clone = lambda c: CompactBounds(c.qmin.clone(), c.qmax.clone(), c.scale.clone())
        self.page_sets = [self.pages] + [clone(self.pages) for _ in range(rotations - 1)]
        self.super_sets = [self.supers] + [clone(self.supers) for _ in range(rotations - 1)]
        self.forced = score_compact_pages(prob.queries[0], self.pages, prob.table, prob.num_pages)
        self.forced[:, :, prob.max_pages - 1] = float("inf")
        self.finite = self.forced[self.forced.isfinite()].abs().max().item()

    def window(
        self,
        prob: PagedProblem,
        gen: torch.Generator,
        top_k: int,
        steps: int,
        checks: Checks,
        tag: str,
    ) -> tuple[Window, list[torch.Tensor]]:
        """A ``Window`` over random page lists for the attention, and its eager selections
        (window 0's checked against the torch reference)."""
        rotations, device = len(self.page_sets), prob.k_cache.device
        sels = [
            random_selection(gen, prob.max_pages, prob.table.shape[0], top_k, device)
            for _ in range(rotations)
        ]
        win = Window(prob, sels, self.page_sets, self.super_sets, top_k, steps)
        eager = [win.select(w) for w in range(rotations)]
        entry_check(
            {"top_k": top_k},
            tag,
            checks,
            prob.queries[0],
            self.pages,
            self.supers,
            prob.table,
            prob.num_pages,
            self.forced,
            self.finite,
        )
        return win, eager


def bench_point(
    ctx: int,
    batch: int,
    top_ks: list[int],
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
        runs, results = {}, {}
        for name in VARIANTS:
            runs[name], results[name] = capture(lambda n=name, w=win: w.issue(n))
        for name, (chosen, out) in results.items():
            if chosen:
                checks.true(
                    f"{name} {tag}: graph selections equal eager select_pages",
                    len(chosen) == rotations
                    and all(torch.equal(c, e) for c, e in zip(chosen, eager)),
                )
            if out is not None:
                checks.true(
                    f"{name} {tag}: attention equals the baseline's",
                    torch.equal(out, results["steps"][1]),
                )
        stamps: list[torch.Tensor] = []
        times = time_rounds(
            runs, rounds, lambda s=stamps, w=win: s.append(w.stamps.view(-1, 3).cpu().double())
        )
        ms = {n: statistics.median(t) / rotations for n, t in times.items()}  # per window
        step_ms = ms["steps"] / steps
        st = torch.stack(stamps[1:] if len(stamps) > 1 else stamps) / 1e6  # ms
        sel_end, steps_end = st[..., 1] - st[..., 0], st[..., 2] - st[..., 0]
        row = {
            "ctx": ctx,
            "batch": batch,
            "top_k": top_k,
            "steps": steps,
            "rounds": rounds,
            "window_ms": ms,
            "step_ms": step_ms,
            "serialised_share": ms["select"] / steps / step_ms,
            "cost": {n: (ms[n] - ms["steps"]) / steps / step_ms for n in COSTED},
            "select_end_ms": sel_end.median().item(),
            "steps_end_ms": steps_end.median().item(),
            "select_outlasts_frac": (sel_end > steps_end).double().mean().item(),
            "spread": {n: (min(t) / rotations, max(t) / rotations) for n, t in times.items()},
        }
        rows.append(row)
        console.print(
            f"{tag}: step {1e3 * step_ms:.1f} us, select {1e3 * ms['select']:.1f} us "
            f"(serialised {100 * row['serialised_share']:.1f}%), overlap "
            f"{100 * row['cost']['overlap']:.1f}% / hi "
            f"{100 * row['cost']['overlap_hi']:.1f}% / lag1 "
            f"{100 * row['cost']['lag1']:.1f}% / serial "
            f"{100 * row['cost']['serial']:.1f}%"
            f"; selection done at {1e3 * row['select_end_ms']:.1f} us of "
            f"{1e3 * row['steps_end_ms']:.1f}"
        )
    return rows


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        "## Rerank overlapped with the decode steps vs serialised in front of them",
        "",
        (
            "Per window of R = 16 sparse decode steps (Llama-8B attention, same kernel and inputs "
            "as gpu_select's sparse step), medians of interleaved CUDA-graph replays of 8 windows. "
            "serialised: `select_pages` alone / 16 / step (today's definition). overlap: "
            "(window with the selection on a side stream - window without) / 16 / step, the "
            "selection launched at the window's start and the window ending when both streams "
            "are done; hi: side stream at the highest priority; lag1: step 2 waits for the "
            "selection; serial: the selection in front of the steps on one stream. done at: "
            "when the overlapped selection finished (GPU timer, from the window's start), beside "
            "the 16 steps' end. Assumes the new top-K set is applied one step later "
            f"(rerank_lag = 1). Checks: {result['checks']} run, {result['failed']} failed."
        ),
        "",
        (
            "| ctx | batch | K | step us | select us | **serialised %** | **overlap %** | hi % | "
            "lag1 % | serial % | done at us / steps end us |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        c = r["cost"]
        lines.append(
            f"| {r['ctx']} | {r['batch']} | {r['top_k']} | {1e3 * r['step_ms']:.1f} | "
            f"{1e3 * r['window_ms']['select']:.1f} | **{100 * r['serialised_share']:.1f}** | "
            f"**{100 * c['overlap']:.1f}** | {100 * c['overlap_hi']:.1f} | "
            f"{100 * c['lag1']:.1f} | {100 * c['serial']:.1f} | "
            f"{1e3 * r['select_end_ms']:.1f} / {1e3 * r['steps_end_ms']:.1f} |"
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
    rounds: int = typer.Option(40, help="Interleaved replays of every variant per point."),
    name: str = typer.Option("gpu_rerank_overlap", help="Result file stem."),
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
    rotations, steps = (2, 3) if quick else (ROTATIONS, RERANK_INTERVAL)
    rounds = 2 if quick else rounds
    checks = Checks()
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "seed": seed,
        "rows": [],
    }
    for ctx in ctxs:
        for batch in bs:
            result["rows"] += bench_point(
                ctx, batch, ks, checks, device, gen, rotations, steps, rounds
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
