"""Reference Helix on CPU: per-token decode latency and communicated bytes vs context, KVP 1 vs 2.

One Llama decoder layer (random weights, 8 query / 2 KV heads of dim 64, hidden 512, SwiGLU
1024, fp32), batch 1, decoding after a random context loaded straight into the KV shards
(round-robin blocks of 16 tokens). Two gloo ranks, one core and one torch thread each, so a
rank stands for a device. Three arms step in turn, the order rotating every step (medians):

* ``kvp1``: the whole layer on rank 0 (a one-rank Helix group), one thread;
* ``kvp1_2threads``: the same with two threads, what one process gets from both cores;
* ``kvp2``: Helix with KVP 2 × TP 1 on both ranks (each reads half the KV).

The arms decode the same inputs from the same context, so their outputs must agree (checked:
exit 1 beyond 1e-5 relative). Bytes: what each rank handed the all-to-all per step, against
:func:`kvhead.core.helix.comm_bytes_per_token` (exit 1 if they differ), and the all-reduce
payload beside it. Process CPU time per step (``median_cpu_ms``; rank 1's KVP 2 figure under
``kvp2_rank1``) is the work a rank does, apart from waiting on the other rank and from sharing
a core with other processes: when wall time nears the two ranks' CPU times added, the ranks
did not run in parallel (the load average is recorded).

Run: ``python benchmarks/helix/helix_decode.py`` (``--contexts 1024,4096 --steps 10`` for a
quick run). Writes ``benchmarks/results/helix/helix_decode.{json,png}``.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import torch.distributed as dist
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import RESULTS
from kvhead.core.helix import HelixLayout, comm_bytes_per_token
from kvhead.eval.helix import HelixRank, run_ranks
from kvhead.eval.llama_layers import BlockShape, random_layer

SHAPE = BlockShape(hidden=512, intermediate=1024, num_q_heads=8, num_kv_heads=2, head_dim=64)
BLOCK = 16
ARMS = ("kvp1", "kvp1_2threads", "kvp2")
OUT = RESULTS / "helix"
console = Console()
app = typer.Typer(add_completion=False)


def _context(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    size = (1, n, SHAPE.num_kv_heads, SHAPE.head_dim)
    return torch.randn(size, generator=g), torch.randn(size, generator=g)


def _bench(contexts: list[int], steps: int, warmup: int) -> list[dict]:
    """On both ranks: rank 0 returns one row per context, rank 1 its own KVP 2 figures."""
    rank = dist.get_rank()
    solo = dist.new_group([0])  # every rank creates it; rank 1 is no member
    layer = random_layer(SHAPE, seed=0)
    rows = []
    for n in contexts:
        keys, values = _context(n)
        xs = torch.randn(
            warmup + steps, 1, SHAPE.hidden, generator=torch.Generator().manual_seed(1)
        )
        capacity = n + warmup + steps
        decoders = {"kvp2": HelixRank(SHAPE, [layer], HelixLayout(2, 1, BLOCK), 1, capacity)}
        if rank == 0:
            for arm in ("kvp1", "kvp1_2threads"):
                decoders[arm] = HelixRank(
                    SHAPE, [layer], HelixLayout(1, 1, BLOCK), 1, capacity, group=solo
                )
        for dec in decoders.values():
            dec.load_context([keys], [values], [n])
        del keys, values
        times = {arm: [] for arm in ARMS}
        cpu = {arm: [] for arm in ARMS}
        outs = {arm: [] for arm in ARMS}
        for i, x in enumerate(xs):
            for arm in ARMS[i % 3 :] + ARMS[: i % 3]:
                dist.barrier()
                if arm not in decoders:
                    continue  # rank 1 idles (in a blocking wait) while rank 0 runs KVP 1
                torch.set_num_threads(2 if arm == "kvp1_2threads" else 1)
                start, start_cpu = time.perf_counter(), time.process_time()
                outs[arm].append(decoders[arm].step(x))
                if i >= warmup:
                    times[arm].append(time.perf_counter() - start)
                    cpu[arm].append(time.process_time() - start_cpu)
        torch.set_num_threads(1)
        helix = decoders["kvp2"]
        if rank == 0:
            rows.append(_row(n, steps + warmup, times, cpu, outs, helix))
        else:
            rows.append(
                {
                    "median_cpu_ms": 1e3 * statistics.median(cpu["kvp2"]),
                    "a2a_bytes_per_token": helix.bytes_sent / (steps + warmup),
                }
            )
    return rows


def _row(n: int, stepped: int, times: dict, cpu: dict, outs: dict, helix: HelixRank) -> dict:
    reference = torch.stack(outs["kvp1"])
    scale = reference.abs().max()
    formula = comm_bytes_per_token(helix.layout, SHAPE.num_q_heads, SHAPE.head_dim, 1, 4)
    return {
        "context": n,
        "median_ms": {arm: 1e3 * statistics.median(t) for arm, t in times.items()},
        "p90_ms": {arm: 1e3 * statistics.quantiles(t, n=10)[-1] for arm, t in times.items()},
        "median_cpu_ms": {arm: 1e3 * statistics.median(t) for arm, t in cpu.items()},
        "a2a_bytes_per_token": helix.bytes_sent / stepped,
        "a2a_bytes_formula": formula,
        "allreduce_payload_bytes_per_token": helix.reduced_bytes / stepped,
        "max_rel_diff": {
            arm: float((torch.stack(outs[arm]) - reference).abs().max() / scale) for arm in ARMS[1:]
        },
    }


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ctx = [r["context"] for r in rows]
    fig, (lat, comm) = plt.subplots(1, 2, figsize=(10, 4))
    colors = dict(zip(ARMS, ("C0", "C1", "C2")))
    for arm in ARMS:
        lat.plot(ctx, [r["median_ms"][arm] for r in rows], marker="o", c=colors[arm], label=arm)
    for arm in ("kvp1", "kvp2"):
        cpu = [r["median_cpu_ms"][arm] for r in rows]
        lat.plot(ctx, cpu, ls="--", c=colors[arm], label=f"{arm} CPU time, rank 0")
    lat.set(xscale="log", yscale="log", xlabel="context tokens", ylabel="median ms / token")
    lat.set_title("one decoder layer, batch 1, gloo CPU")
    lat.legend()
    comm.plot(ctx, [r["a2a_bytes_per_token"] for r in rows], marker="o", label="all-to-all sent")
    comm.plot(ctx, [r["a2a_bytes_formula"] for r in rows], ls="--", label="formula")
    comm.plot(
        ctx,
        [r["allreduce_payload_bytes_per_token"] for r in rows],
        marker="s",
        label="all-reduce payload",
    )
    comm.set(xscale="log", xlabel="context tokens", ylabel="bytes / token / rank (KVP 2)")
    comm.set_ylim(bottom=0)
    comm.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


@app.command()
def main(
    contexts: str = typer.Option("1024,4096,16384,65536", help="context lengths, comma-separated"),
    steps: int = typer.Option(40, help="timed decode steps per arm and context"),
    warmup: int = typer.Option(5, help="untimed steps first"),
    out: Path = typer.Option(OUT / "helix_decode.json", help="JSON result; the plot beside it"),
) -> None:
    ctx = [int(c) for c in contexts.split(",")]
    load_at_start = os.getloadavg()
    rows, rank1 = run_ranks(2, _bench, ctx, steps, warmup)
    for row, other in zip(rows, rank1):
        row["kvp2_rank1"] = other
    table = Table(
        "context",
        *[f"{a} ms" for a in ARMS],
        "speed-up",
        "cpu ms kvp1 / kvp2 r0 + r1",
        "a2a B",
        "formula",
    )
    for r in rows:
        ms, cpu = r["median_ms"], r["median_cpu_ms"]
        table.add_row(
            str(r["context"]),
            *[f"{ms[arm]:.2f}" for arm in ARMS],
            f"{ms['kvp1'] / ms['kvp2']:.2f}x",
            f"{cpu['kvp1']:.1f} / {cpu['kvp2']:.1f} + {r['kvp2_rank1']['median_cpu_ms']:.1f}",
            f"{r['a2a_bytes_per_token']:.0f}",
            str(r["a2a_bytes_formula"]),
        )
    console.print(table)
    result = {
        "shape": SHAPE.__dict__,
        "block": BLOCK,
        "batch": 1,
        "dtype": "float32",
        "steps": steps,
        "warmup": warmup,
        "host": {"cpus": os.cpu_count(), "loadavg": [load_at_start, os.getloadavg()]},
        "torch": torch.__version__,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    _plot(rows, out.with_suffix(".png"))
    console.print(f"wrote {out} and {out.with_suffix('.png').name}")
    bad = [r for r in rows if max(r["max_rel_diff"].values()) > 1e-5]
    bad += [
        r
        for r in rows
        for sent in (r["a2a_bytes_per_token"], r["kvp2_rank1"]["a2a_bytes_per_token"])
        if sent != r["a2a_bytes_formula"]
    ]
    if bad:
        console.print(f"[red]check failed at contexts {[r['context'] for r in bad]}")
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
