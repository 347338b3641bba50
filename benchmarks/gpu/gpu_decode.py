"""GPU decode step, dense vs FlexiCache, at 8k-128k context.

Two measurements, both with random weights of Llama-8B shape (hidden 4096, 32 query / 8 KV
heads of dim 128, MLP 14336) in bf16 and random KV, because only speed matters here:

* ``runner``: the Hugging Face reference runner (``kvhead.eval.runner``), batch 1, a 4-layer
  model (the step time of a deeper model scales with its layer count), decoding after a context
  whose KV is written straight into the runner's paged cache, dense vs flexicache (a quarter of
  the KV heads unstable). The cache keeps int8 live bounds (built at the first decode step
  here, ``append_bounds`` after) and the policy selects through ``kernels.select_pages``, the
  attention is our Triton kernel. Checks (exit 1 on failure): every selection of an untimed
  flexicache decode against the torch reference on the same live bounds
  (:class:`CheckedPolicy`), and flexicache with K >= every page against dense logits (first
  context). Runs on CPU too (``--quick``; kernels interpreted under ``TRITON_INTERPRET=1``).
* ``layer``: a batched decode step of 4 such layers built directly on the kernels, laid out as
  the design says: unstable heads (a quarter) attend to every page of a device cache; stable
  heads attend to a device hot pool holding their top-K pages plus the newest page, rerank every
  16 steps with ``score_and_select`` over device-resident fp32 bounds, and pull promoted pages
  from a pinned host arena with ``copy_pages_async`` on a side stream. Dense attends to every
  page of every head with the same kernel. No RoPE (it is a few element-wise ops per step).
  Hot-pool slot bookkeeping is simplified: a promoted page lands in the slot of its rank, and
  one host arena serves all layers; bytes moved and kernels run are those of the real scheme.

Run: ``python benchmarks/gpu/gpu_decode.py`` (``--quick`` for a CPU smoke run; ``--skip-layer``
/ ``--skip-runner`` for one part). Writes ``benchmarks/results/gpu/<name>.json``:
``gpu_decode.json`` holds the layer and runner tables with the fp32 reference selection,
``gpu_decode_runner.json`` the runner on the kernel route (int8 live bounds, ``select_pages``).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import GPU_RESULTS
from kvhead import kernels
from kvhead.core.bounds.compact import flat_select as ref_flat_select
from kvhead.core.bounds.compact import hier_select as ref_hier_select
from kvhead.core.bounds.compact import plan_selection, score_compact_pages
from kvhead.core.pages import PageBounds, all_pages
from kvhead.core.policy import SelectionPolicy

console = Console()
app = typer.Typer(add_completion=False)


@dataclass(frozen=True)
class Shape:
    hidden: int = 4096
    num_q: int = 32
    num_kv: int = 8
    head_dim: int = 128
    intermediate: int = 14336
    vocab: int = 128256
    layers: int = 4
    page: int = 16
    top_k: int = 64
    rerank: int = 16
    unstable_frac: float = 0.25

    @property
    def num_unstable(self) -> int:
        return max(1, round(self.num_kv * self.unstable_frac))


QUICK = Shape(
    hidden=256, num_q=8, num_kv=4, head_dim=32, intermediate=512, vocab=1000, layers=2, top_k=4
)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_steps(step, warmup: int, steps: int) -> list[float]:
    """Host milliseconds of each decode step, device synchronised around every step."""
    for i in range(warmup):
        step(i)
    times = []
    for i in range(warmup, warmup + steps):
        sync()
        start = time.perf_counter()
        step(i)
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def timed_decode(
    body, pos: torch.Tensor, ctx: int, steps: int, rerank_every: int | None, device: torch.device
) -> list[float]:
    """Step times with every step that does not rerank replayed from a CUDA graph.

    Eager PyTorch spends more host time launching a layer's ~20 small kernels than the GPU
    spends running them at batch 8, which would hide what the kernels save; a serving engine
    captures decode steps as graphs too (vLLM does). Rerank steps sync with the host (promoted
    page lists), so they run eagerly and their cost stays in the mean.
    """

    def reranks(i: int) -> bool:
        return rerank_every is not None and i % rerank_every == 0

    graph = None

    def step(i: int) -> None:
        pos.fill_(ctx + i)
        if graph is None or reranks(i):
            body(reranks(i))
        else:
            graph.replay()

    step(0)
    step(1)
    if device.type == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body(False)
        torch.cuda.current_stream().wait_stream(side)
        captured = torch.cuda.CUDAGraph()
        with torch.cuda.graph(captured):
            body(False)
        graph = captured
    return timed_steps(step, 2, steps)


def kv_bytes(shape: Shape, batch: int, tokens: int, heads: int) -> int:
    return 2 * batch * tokens * heads * shape.head_dim * 2


class Layer:
    """Random bf16 weights of one Llama decoder layer."""

    def __init__(self, shape: Shape, device: torch.device, gen: torch.Generator) -> None:
        def w(rows: int, cols: int) -> torch.Tensor:
            return (torch.randn(rows, cols, device=device, generator=gen) * rows**-0.5).bfloat16()

        qkv = (shape.num_q + 2 * shape.num_kv) * shape.head_dim
        self.shape = shape
        self.w_qkv = w(shape.hidden, qkv)
        self.w_o = w(shape.num_q * shape.head_dim, shape.hidden)
        self.w_up = w(shape.hidden, 2 * shape.intermediate)
        self.w_down = w(shape.intermediate, shape.hidden)

    def project(self, x: torch.Tensor):
        s = self.shape
        qkv = F.rms_norm(x, (s.hidden,)) @ self.w_qkv
        q, k, v = qkv.split(
            [s.num_q * s.head_dim, s.num_kv * s.head_dim, s.num_kv * s.head_dim], dim=1
        )
        batch = x.shape[0]
        return (
            q.reshape(batch, s.num_q, s.head_dim),
            k.reshape(batch, s.num_kv, s.head_dim),
            v.reshape(batch, s.num_kv, s.head_dim),
        )

    def finish(self, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        x = x + attn.reshape(x.shape[0], -1) @ self.w_o
        gate, up = (F.rms_norm(x, (self.shape.hidden,)) @ self.w_up).chunk(2, dim=1)
        return x + (F.silu(gate) * up) @ self.w_down


def layer_dense(
    shape: Shape,
    layers: list[Layer],
    batch: int,
    ctx: int,
    steps: int,
    device: torch.device,
    gen: torch.Generator,
) -> dict:
    """Every head attends to every page of a device cache."""
    pages = -(-(ctx + steps + 8) // shape.page)
    caches = [
        (
            torch.randn(
                batch * pages,
                shape.page,
                shape.num_kv,
                shape.head_dim,
                device=device,
                generator=gen,
                dtype=torch.bfloat16,
            ),
            torch.randn(
                batch * pages,
                shape.page,
                shape.num_kv,
                shape.head_dim,
                device=device,
                generator=gen,
                dtype=torch.bfloat16,
            ),
        )
        for _ in layers
    ]
    table = torch.arange(batch * pages, device=device, dtype=torch.int32).view(batch, pages)
    x0 = torch.randn(batch, shape.hidden, device=device, generator=gen).bfloat16()
    scale = shape.head_dim**-0.5
    pos = torch.zeros(1, dtype=torch.long, device=device)  # position of the token decoded now

    def body(rerank_now: bool) -> None:
        seq_lens = (pos + 1).int().repeat(batch)
        slots = table[:, pos // shape.page].long().view(-1) * shape.page + pos % shape.page
        ids = all_pages((seq_lens + shape.page - 1) // shape.page, shape.num_kv, pages)
        x = x0
        for layer, (k_cache, v_cache) in zip(layers, caches):
            q, k, v = layer.project(x)
            k_cache.view(-1, shape.num_kv, shape.head_dim)[slots] = k
            v_cache.view(-1, shape.num_kv, shape.head_dim)[slots] = v
            out, _ = kernels.sparse_decode_attention(
                q, k_cache, v_cache, table, seq_lens, ids, scale
            )
            x = layer.finish(x, out)

    times = timed_decode(body, pos, ctx, steps, None, device)
    resident = len(layers) * kv_bytes(shape, batch, ctx, shape.num_kv)
    return {"times_ms": times, "kv_bytes_resident": resident, "meta_bytes_resident": 0}


def layer_flexicache(
    shape: Shape,
    layers: list[Layer],
    batch: int,
    ctx: int,
    steps: int,
    device: torch.device,
    gen: torch.Generator,
) -> dict:
    """Unstable heads: every page; stable heads: top-K + newest page from a hot pool."""
    hu, hs = shape.num_unstable, shape.num_kv - shape.num_unstable
    page, top_k = shape.page, shape.top_k
    group = shape.num_q // shape.num_kv
    pages = -(-(ctx + steps + 8) // page)
    slots_per_seq = top_k + 1  # top-K plus the newest page
    table = torch.arange(batch * pages, device=device, dtype=torch.int32).view(batch, pages)
    pool_table = torch.arange(batch * slots_per_seq, device=device, dtype=torch.int32).view(
        batch, slots_per_seq
    )
    pool_lens = torch.full((batch,), slots_per_seq * page, device=device, dtype=torch.int32)
    pool_ids = all_pages(torch.full((batch,), slots_per_seq, device=device), hs, slots_per_seq)
    # One pinned arena (all stable heads' pages of one layer) stands in for every layer's.
    # Its contents do not change a copy's speed, so a constant fill saves host time.
    arena = torch.empty(
        batch * pages * hs,
        2,
        page,
        shape.head_dim,
        dtype=torch.bfloat16,
        pin_memory=device.type == "cuda",
    ).fill_(0.5)
    state = []
    for _ in layers:
        k_u = torch.randn(
            batch * pages,
            page,
            hu,
            shape.head_dim,
            device=device,
            generator=gen,
            dtype=torch.bfloat16,
        )
        v_u = torch.randn_like(k_u)
        # Pool rows are (slot, head) pages of [K|V, P, D], the unit copy_pages_async moves.
        pool = torch.randn(
            batch * slots_per_seq,
            hs,
            2,
            page,
            shape.head_dim,
            device=device,
            generator=gen,
            dtype=torch.bfloat16,
        )
        stable_keys = torch.randn(
            batch * pages,
            page,
            hs,
            shape.head_dim,
            device=device,
            generator=gen,
            dtype=torch.bfloat16,
        )
        bounds = PageBounds(kmin=stable_keys.amin(1).float(), kmax=stable_keys.amax(1).float())
        del stable_keys
        state.append(
            {
                "k_u": k_u,
                "v_u": v_u,
                "pool": pool,
                "bounds": bounds,
                "prev": None,
                "event": None,
                "promoted": 0,
                "reranks": 0,
            }
        )
    x0 = torch.randn(batch, shape.hidden, device=device, generator=gen).bfloat16()
    scale = shape.head_dim**-0.5

    def rerank(st: dict, q_s: torch.Tensor, num_pages: torch.Tensor) -> None:
        ids = kernels.score_and_select(q_s, st["bounds"], table, num_pages, top_k)
        fresh = ids >= 0
        if st["prev"] is not None:  # pages already in the pool stay; only new ones move
            fresh &= ~(ids.unsqueeze(-1) == st["prev"].unsqueeze(-2)).any(-1)
        st["prev"] = ids
        b, h, rank = fresh.nonzero(as_tuple=True)
        page_ids = ids[b, h, rank]
        src = ((b * pages + page_ids) * hs + h).cpu()
        dst = ((b * slots_per_seq + rank) * hs + h).cpu()
        st["event"] = kernels.copy_pages_async(
            arena, src, st["pool"].view(-1, 2, page, shape.head_dim), dst
        )
        st["promoted"] += int(src.numel())
        st["reranks"] += 1

    pos = torch.zeros(1, dtype=torch.long, device=device)  # position of the token decoded now
    newest = torch.arange(batch, device=device) * slots_per_seq + top_k  # newest page's slot

    def body(rerank_now: bool) -> None:
        seq_lens = (pos + 1).int().repeat(batch)
        num_pages = (pos // page + 1).repeat(batch)
        offset = pos % page
        slots = table[:, pos // page].long().view(-1) * page + offset
        ids_u = all_pages(num_pages, hu, pages)
        x = x0
        for layer, st in zip(layers, state):
            q, k, v = layer.project(x)
            q_u = q[:, : hu * group]
            q_s = q[:, hu * group :]
            st["k_u"].view(-1, hu, shape.head_dim)[slots] = k[:, :hu]
            st["v_u"].view(-1, hu, shape.head_dim)[slots] = v[:, :hu]
            st["pool"][newest, :, 0, offset] = k[:, hu:]
            st["pool"][newest, :, 1, offset] = v[:, hu:]
            kernels.update_bounds(st["bounds"], k[:, hu:].contiguous(), slots, page)
            if rerank_now:
                rerank(st, q_s, num_pages)
            if st["event"] is not None:  # promoted pages must land before the pool is read
                torch.cuda.current_stream().wait_event(st["event"])
                st["event"] = None
            out_u, _ = kernels.sparse_decode_attention(
                q_u, st["k_u"], st["v_u"], table, seq_lens, ids_u, scale
            )
            k_pool = st["pool"][:, :, 0].permute(0, 2, 1, 3)  # [slot, P, Hs, D], strided
            v_pool = st["pool"][:, :, 1].permute(0, 2, 1, 3)
            out_s, _ = kernels.sparse_decode_attention(
                q_s, k_pool, v_pool, pool_table, pool_lens, pool_ids, scale
            )
            x = layer.finish(x, torch.cat([out_u, out_s], dim=1))

    times = timed_decode(body, pos, ctx, steps, shape.rerank, device)
    resident = len(layers) * (
        kv_bytes(shape, batch, ctx, hu) + kv_bytes(shape, batch, slots_per_seq * page, hs)
    )
    meta = len(layers) * batch * pages * hs * shape.head_dim * 4 * 2
    promoted = sum(st["promoted"] for st in state)
    reranks = sum(st["reranks"] for st in state)
    return {
        "times_ms": times,
        "kv_bytes_resident": resident,
        "meta_bytes_resident": meta,
        "promoted_pages_per_layer_rerank": promoted / max(reranks, 1),
        "rerank_steps_ms": [t for j, t in enumerate(times) if (j + 2) % shape.rerank == 0],
    }


class CheckedPolicy(SelectionPolicy):
    """The runner's policy, unchanged, that also checks each kernel selection against the
    torch reference on the same inputs (the live int8 bounds the cache keeps on CUDA).

    Pages are compared as score sets under the reference's int8 page scores (a near-tie may
    pick another page of equal score); two-level rows whose first level picked other
    super-pages than the reference (a near-tie there) count as ``super_ties``, not failures.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls = self.kernel_calls = self.rows_equal = self.rows = self.super_ties = 0
        self.worst_gap = 0.0

    def _top_k(self, query, bounds, block_table, num_pages, heads):
        ids = super()._top_k(query, bounds, block_table, num_pages, heads)
        self.calls += 1
        live = self._live
        if live is None or self.head_top_k is not None:
            return ids
        self.kernel_calls += 1
        pages, k = live.pages, self.top_k
        num_super = plan_selection(
            block_table.shape[1], k, live.group, rows=block_table.shape[0] * self.num_kv_heads
        )
        if num_super is None:
            ref = ref_flat_select(query, pages, block_table, num_pages, k)
        else:
            ref = ref_hier_select(
                query, pages, live.supers, block_table, num_pages, k, live.group, num_super
            )
        asked = slice(None) if heads is None else heads
        got, ref = ids[:, asked], ref[:, asked]
        scores = score_compact_pages(query, pages, block_table, num_pages)[:, asked]
        scores[..., (num_pages - 1).clamp_min(0)] = float("inf")  # the forced newest page
        gap = (
            scores.gather(2, got.clamp_min(0)).sort(2).values
            - scores.gather(2, ref.clamp_min(0)).sort(2).values
        ).nan_to_num(posinf=0.0)
        row_gap = gap.abs().amax(2)  # [B, heads]
        finite = scores[scores.isfinite()].abs().max()
        bad = row_gap > 1e-5 * finite + 1e-3
        if num_super is not None and bool(bad.any()):
            self.super_ties += int(bad.sum())
            row_gap = row_gap.masked_fill(bad, 0.0)
        self.rows += got.shape[0] * got.shape[1]
        self.rows_equal += int((got == ref).all(2).sum())
        self.worst_gap = max(self.worst_gap, float(row_gap.max()) / float(finite))
        return ids


def live_bytes(cache) -> int:
    """Device bytes of the int8 live bounds (pages, super-pages, open boxes) of all layers."""
    total = 0
    for live in cache.live:
        if live is None:
            continue
        parts = [live.pages] + ([live.supers] if live.supers is not None else [])
        total += sum(t.numel() * t.element_size() for c in parts for t in (c.qmin, c.qmax, c.scale))
        total += sum(t.numel() * t.element_size() for t in (live.open_min, live.open_max))
    return total


def runner_steps(
    shape: Shape,
    ctx: int,
    steps: int,
    device: torch.device,
    gen: torch.Generator,
    equal_check: bool,
) -> dict:
    """The reference runner, batch 1: dense vs flexicache step time, resident KV, and checks.

    flexicache selects through ``kernels.select_pages`` from the cache's live int8 bounds on
    CUDA; every selection is checked against the torch reference (:class:`CheckedPolicy`).
    ``equal_check``: also decode with flexicache at K >= every page, whose logits must equal
    dense's (same pages, same kernel).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvhead.eval.paged_cache import PagedKVCache
    from kvhead.eval.runner import ReferenceRunner

    config = LlamaConfig(
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.num_q,
        num_key_value_heads=shape.num_kv,
        head_dim=shape.head_dim,
        num_hidden_layers=shape.layers,
        vocab_size=shape.vocab,
        max_position_embeddings=ctx + steps + 64,
        rope_theta=500000.0,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    runner = ReferenceRunner(model, page_size=shape.page)
    # Live int8 bounds and the kernel route as on CUDA also in a CPU smoke run (interpreted
    # under TRITON_INTERPRET=1, else the kernels' torch fallbacks).
    cache = PagedKVCache(
        runner.num_layers, runner.spec, ctx + steps + 8, device=device, live_bounds=True
    )
    for layer in range(shape.layers):
        for pool in (cache.k[layer], cache.v[layer]):
            flat = pool.view(-1, shape.num_kv, shape.head_dim)[:ctx]
            flat.copy_(torch.randn(flat.shape, device=device, generator=gen))
        slots = torch.arange(ctx, device=device)
        cache.bounds[layer].update(
            cache.k[layer].view(-1, shape.num_kv, shape.head_dim)[:ctx], slots, shape.page
        )
    cache.advance(ctx)
    unstable = torch.zeros(shape.layers, shape.num_kv, dtype=torch.bool)
    unstable[:, : shape.num_unstable] = True
    tokens = torch.randint(0, shape.vocab, (steps + 2,), device=device, generator=gen)
    total = shape.layers * kv_bytes(shape, 1, ctx, shape.num_kv)
    result = {"fp32_bounds_bytes": sum(2 * b.kmin.numel() * 4 for b in cache.bounds)}

    def decode(policy, count: int, logits: list | None = None) -> list[float]:
        def step(i: int) -> None:
            out = runner.forward(cache, tokens[i % tokens.numel()].view(1), policy=policy)
            if logits is not None:
                logits.append(out)

        times = (
            timed_steps(step, 2, count - 2) if logits is None else [step(i) for i in range(count)]
        )
        cache.rewind(ctx)
        return times

    modes = {"dense": {}, "flexicache": {"unstable": unstable}}
    kwargs = {
        "num_layers": shape.layers,
        "num_kv_heads": shape.num_kv,
        "page_size": shape.page,
        "top_k": shape.top_k,
        "rerank_interval": shape.rerank,
        "use_kernels": True,
        "kernels": kernels,
    }
    for mode, extra in modes.items():
        policy = SelectionPolicy(mode=mode, **kwargs, **extra)
        times = decode(policy, steps)
        result[mode] = {
            "times_ms": times,
            "resident_fraction": policy.stats.resident_fraction,
            "kv_bytes_resident": policy.stats.resident_fraction * total,
            "live_bounds_bytes": live_bytes(cache),
        }
    # Untimed: the same flexicache decode with every selection checked (the reference
    # scoring would dominate a timed step); 17 steps hold a rerank of every head.
    checked = CheckedPolicy(mode="flexicache", **kwargs, unstable=unstable)
    decode(checked, shape.rerank + 1, [])
    result["flexicache"].update(
        selections=checked.calls,
        kernel_selections=checked.kernel_calls,
        rows_checked=checked.rows,
        rows_equal=checked.rows_equal,
        super_near_ties=checked.super_ties,
        worst_score_gap_rel=checked.worst_gap,
    )
    if equal_check:
        dense_logits: list = []
        every_logits: list = []
        decode(runner.policy("dense"), 8, dense_logits)
        every = runner.policy(
            "flexicache", top_k=cache.num_blocks, unstable=unstable, use_kernels=True
        )
        decode(every, 8, every_logits)
        diff = max(float((a - b).abs().max()) for a, b in zip(dense_logits, every_logits))
        scale = max(float(a.abs().max()) for a in dense_logits)
        result["all_pages_equal_dense"] = {
            "steps": 8,
            "max_abs_logit_diff": diff,
            "max_abs_logit": scale,
        }
    return result


def summary(times: list[float]) -> dict:
    return {"median_ms": statistics.median(times), "mean_ms": statistics.fmean(times)}


def runner_row(ctx: int, res: dict) -> tuple[dict, list[str]]:
    """JSON row of one context and the names of its failed checks."""
    row = {"ctx": ctx, **{k: v for k, v in res.items() if k not in ("dense", "flexicache")}}
    row.update({m: {**summary(res[m]["times_ms"]), **res[m]} for m in ("dense", "flexicache")})
    flexi, failed = res["flexicache"], []
    if flexi["kernel_selections"] == 0:
        failed.append(f"{ctx}: flexicache never selected through the live-bounds kernels")
    if not flexi["worst_score_gap_rel"] <= 1e-5 + 1e-3:
        failed.append(f"{ctx}: kernel vs reference score gap {flexi['worst_score_gap_rel']:.3g}")
    equal = res.get("all_pages_equal_dense")
    if equal is not None:
        equal["ok"] = equal["max_abs_logit_diff"] <= 1e-2 * equal["max_abs_logit"]
        if not equal["ok"]:
            failed.append(
                f"{ctx}: flexicache with every page differs from dense by "
                f"{equal['max_abs_logit_diff']:.3g}"
            )
    return row, failed


@app.command()
def main(
    quick: bool = typer.Option(False, help="Tiny shape and context: a CPU smoke run."),
    out_dir: Path = typer.Option(GPU_RESULTS, help="Where the JSON goes."),
    batch: int = typer.Option(8, help="Sequences per decode step in the layer benchmark."),
    seed: int = typer.Option(0, help="Seed of weights and KV."),
    skip_runner: bool = typer.Option(False, help="Only the kernel-level layer benchmark."),
    skip_layer: bool = typer.Option(False, help="Only the reference runner."),
    contexts: str = typer.Option("8192,32768,131072", help="Comma-separated contexts."),
    name: str = typer.Option("gpu_decode", help="Result file name (without .json)."),
) -> None:
    """Decode step time and device KV bytes, dense vs FlexiCache; writes <name>.json.
    Exits 1 if a runner check failed."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = QUICK if quick else Shape()
    contexts = [256] if quick else [int(c) for c in contexts.split(",")]
    steps = 2 * shape.rerank + 1 if quick else 3 * shape.rerank
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / (f"{name}_quick.json" if quick else f"{name}.json")
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "shape": shape.__dict__,
        "batch": batch,
        "steps": steps,
        "layer": [],
        "runner": [],
        "failed": [],
    }
    table = Table(title=f"decode step, {shape.layers} layers of Llama-8B shape, batch {batch}")
    for col in (
        "ctx",
        "dense ms",
        "flexi ms",
        "speedup",
        "dense KV GB",
        "flexi KV GB",
        "flexi meta GB",
        "promoted/rerank",
    ):
        table.add_column(col, justify="right")
    layers = [] if skip_layer else [Layer(shape, device, gen) for _ in range(shape.layers)]
    for ctx in [] if skip_layer else contexts:
        dense = layer_dense(shape, layers, batch, ctx, steps, device, gen)
        flexi = layer_flexicache(shape, layers, batch, ctx, steps, device, gen)
        row = {
            "ctx": ctx,
            "dense": {**summary(dense["times_ms"]), **dense},
            "flexicache": {**summary(flexi["times_ms"]), **flexi},
        }
        result["layer"].append(row)
        (path).write_text(json.dumps(result, indent=1))
        table.add_row(
            str(ctx),
            f"{row['dense']['median_ms']:.3f}",
            f"{row['flexicache']['median_ms']:.3f}",
            f"{row['dense']['median_ms'] / row['flexicache']['median_ms']:.1f}",
            f"{dense['kv_bytes_resident'] / 1e9:.2f}",
            f"{flexi['kv_bytes_resident'] / 1e9:.3f}",
            f"{flexi['meta_bytes_resident'] / 1e9:.3f}",
            f"{flexi['promoted_pages_per_layer_rerank']:.0f}",
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if not skip_layer:
        console.print(table)
    del layers
    if not skip_runner:
        run_table = Table(title=f"reference runner, batch 1, {shape.layers} layers")
        for col in (
            "ctx",
            "dense ms",
            "flexi ms",
            "flexi resident %",
            "flexi KV GB",
            "live int8 MB",
            "rows equal ref",
            "K=all vs dense",
        ):
            run_table.add_column(col, justify="right")
        for ctx in contexts:
            res = runner_steps(shape, ctx, steps, device, gen, equal_check=ctx == contexts[0])
            row, failed = runner_row(ctx, res)
            result["runner"].append(row)
            result["failed"] += failed
            path.write_text(json.dumps(result, indent=1))
            flexi = row["flexicache"]
            equal = row.get("all_pages_equal_dense")
            run_table.add_row(
                str(ctx),
                f"{row['dense']['median_ms']:.2f}",
                f"{flexi['median_ms']:.2f}",
                f"{100 * flexi['resident_fraction']:.1f}",
                f"{flexi['kv_bytes_resident'] / 1e9:.3f}",
                f"{flexi['live_bounds_bytes'] / 1e6:.1f}",
                f"{flexi['rows_equal']}/{flexi['rows_checked']}",
                f"{equal['max_abs_logit_diff']:.2g}" if equal else "-",
            )
            if device.type == "cuda":
                torch.cuda.empty_cache()
        console.print(run_table)
    path.write_text(json.dumps(result, indent=1))
    console.print(f"runner checks failed: {result['failed'] or 'none'}")
    if result["failed"]:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
