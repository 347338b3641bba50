"""GPU kernel benchmark: check every Triton kernel against the torch reference on fresh random
inputs, then time it against dense SDPA and against the bandwidth floor.

Shape: Llama-8B attention (32 query heads, 8 KV heads, head dim 128), bf16 KV in vLLM's paged
layout with 16-token pages, fp32 page bounds. Contexts 8k-128k, K in {32, 64, 128} pages per
head, batch 1-64. The floor of a kernel is the bytes it must read over the device-to-device copy
bandwidth measured at the start of the run (bytes read plus written over time).

Run: ``python benchmarks/gpu/gpu_kernels.py`` (``--quick`` for a tiny smoke run, which also works
on CPU under ``TRITON_INTERPRET=1``). Prints a table; writes
``benchmarks/results/gpu/gpu_kernels.json`` and ``gpu_kernels.md``. Exits 1 if any check failed.
"""

from __future__ import annotations

import json
import math
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import torch.nn.functional as F
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.timing import graph_ms, median_ms, wall_ms
from kvhead import kernels
from kvhead.core.attention import sparse_decode_attention as ref_attention
from kvhead.core.bounds.compact import (
    DEFAULT_CANDIDATES_PER_K,
    DEFAULT_GROUP,
    CompactBounds,
    build_super_bounds,
    default_num_super,
    flat_select,
    num_super_pages,
    plan_selection,
    score_compact_pages,
    select_in_super_pages,
    select_super_pages,
    super_page_scores,
)
from kvhead.core.bounds.live import LiveBounds
from kvhead.core.combine import combine_partials as ref_combine
from kvhead.core.pages import PageBounds, all_pages, score_pages
from kvhead.kernels.triton.attention import DEFAULT_CONFIG, LaunchConfig
from kvhead.kernels.triton.attention import sparse_decode_attention as kernel_attention
from kvhead.kernels.triton.select_hier import hier_select_stages

NUM_Q, NUM_KV, DIM, PAGE = 32, 8, 128, 16
RERANK_INTERVAL = 16
ROTATIONS = 8  # input sets per graph, so repeated calls read HBM rather than the L2 (1 if quick)
REL_TOL = 1e-2  # bf16 operands, fp32 accumulation
HIER_VARIANTS = ((8, 4),)  # (super-page size G, candidate pages per K); first: the default
HIER_MARKER = "## Two-level int8 selection (super-pages), rerank cost"
console = Console()
app = typer.Typer(add_completion=False)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


class Checks:
    """Collects pass/fail of every correctness check; NaN compares false, so it never passes."""

    def __init__(self) -> None:
        self.failed: list[str] = []
        self.count = 0

    def bound(self, name: str, value: float, limit: float) -> float:
        self.count += 1
        if not value <= limit:
            self.failed.append(f"{name}: {value:.3g} > {limit:.3g}")
        return value

    def true(self, name: str, ok: bool) -> None:
        self.count += 1
        if not ok:
            self.failed.append(name)


def measure_ceilings(device: torch.device, quick: bool) -> dict:
    """Device copy bandwidth (read + write) and pinned host-to-device bandwidth."""
    nbytes = (64 if quick else 2048) << 20
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    d2d_ms = median_ms(lambda: dst.copy_(src))
    host = torch.randint(0, 255, (nbytes // 4,), dtype=torch.uint8)
    if device.type == "cuda":
        host = host.pin_memory()
    dev = torch.empty(host.shape, dtype=torch.uint8, device=device)
    h2d_ms = wall_ms(lambda: dev.copy_(host, non_blocking=True))
    return {
        "d2d_bytes_per_s": 2 * nbytes / (d2d_ms * 1e-3),
        "h2d_pinned_bytes_per_s": host.numel() / (h2d_ms * 1e-3),
    }


def same_bytes_copy_ms(nbytes: int, device: torch.device, rotations: int) -> float:
    """A plain device copy moving ``nbytes`` (half read, half written): what this size allows.

    Small transfers never reach the large-copy bandwidth (too few bytes in flight to cover the
    latency), so this is the fair yardstick for batch-1 decode, next to the asymptotic floor.
    """
    half = max(nbytes // 2, 1)
    src = torch.empty(rotations, half, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    return graph_ms([(lambda i=i: dst[i].copy_(src[i])) for i in range(rotations)])


def random_selection(
    gen: torch.Generator, num_pages: int, batch: int, top_k: int, device: torch.device
) -> torch.Tensor:
    """Distinct random pages per (sequence, head), newest included, ascending (like a top-K)."""
    noise = torch.rand(batch, NUM_KV, num_pages - 1, generator=gen, device=device)
    older = noise.topk(top_k - 1, dim=2).indices
    newest = torch.full((batch, NUM_KV, 1), num_pages - 1, device=device)
    return torch.cat([older, newest], dim=2).sort(dim=2).values


@dataclass
class PagedProblem:
    """One (context, batch) of random bf16 KV in vLLM's paged layout, with rotating queries.

    The block table is the identity, so dense SDPA can read the same memory as a strided view;
    the newest page is partial (``seq_len = ctx - tail_gap``), so its masked tail is part of
    every check.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    table: torch.Tensor
    seq_len: int
    seq_lens: torch.Tensor
    num_pages: torch.Tensor
    queries: list[torch.Tensor]

    @property
    def max_pages(self) -> int:
        return self.table.shape[1]

    @classmethod
    def random(
        cls,
        ctx: int,
        batch: int,
        device: torch.device,
        gen: torch.Generator,
        rotations: int,
        tail_gap: int = 5,
    ) -> PagedProblem:
        max_pages = ctx // PAGE
        num_blocks = batch * max_pages
        k_cache = torch.randn(
            num_blocks, PAGE, NUM_KV, DIM, device=device, dtype=torch.bfloat16, generator=gen
        )
        v_cache = torch.randn(k_cache.shape, device=device, dtype=torch.bfloat16, generator=gen)
        table = torch.arange(num_blocks, device=device, dtype=torch.int32).view(batch, max_pages)
        seq_len = ctx - tail_gap
        return cls(
            k_cache=k_cache,
            v_cache=v_cache,
            table=table,
            seq_len=seq_len,
            seq_lens=torch.full((batch,), seq_len, device=device, dtype=torch.int32),
            num_pages=torch.full((batch,), max_pages, device=device, dtype=torch.int64),
            queries=[
                torch.randn(batch, NUM_Q, DIM, device=device, dtype=torch.bfloat16, generator=gen)
                for _ in range(rotations)
            ],
        )

    def sparse_ms(self, sels: list[torch.Tensor]) -> float:
        """Graph-replayed sparse attention over rotating (query, selection) pairs."""
        k_cache, v_cache, table, seq_lens = self.k_cache, self.v_cache, self.table, self.seq_lens
        return graph_ms(
            [
                (
                    lambda q=q, s=s: kernel_attention(
                        q, k_cache, v_cache, table, seq_lens, s, DIM**-0.5
                    )
                )
                for q, s in zip(self.queries, sels)
            ]
        )


def bench_context(
    ctx: int,
    batch: int,
    top_ks: list[int],
    ceil: dict,
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
) -> tuple[list, dict, dict]:
    """Dense, sparse, selection and append for one (context, batch); returns result rows."""
    prob = PagedProblem.random(ctx, batch, device, gen, rotations)
    k_cache, v_cache, table, seq_lens = prob.k_cache, prob.v_cache, prob.table, prob.seq_lens
    seq_len, num_pages = prob.seq_len, prob.num_pages
    queries, max_pages = prob.queries, prob.max_pages
    scale = DIM**-0.5
    d2d = ceil["d2d_bytes_per_s"]

    # Dense baselines: SDPA on a strided view (GQA group as query rows) and our kernel.
    q4 = queries[0].view(batch, NUM_KV, NUM_Q // NUM_KV, DIM)
    keys = k_cache.view(batch, ctx, NUM_KV, DIM)[:, :seq_len].transpose(1, 2)
    values = v_cache.view(batch, ctx, NUM_KV, DIM)[:, :seq_len].transpose(1, 2)
    sdpa = lambda: F.scaled_dot_product_attention(q4, keys, values, scale=scale)
    every = all_pages(num_pages, NUM_KV, max_pages)
    dense = lambda: kernel_attention(queries[0], k_cache, v_cache, table, seq_lens, every, scale)
    dense_out, dense_lse = dense()
    sdpa_out = sdpa().reshape(batch, NUM_Q, DIM)
    ref_out, ref_lse = ref_attention(
        queries[0][:1], k_cache, v_cache, table[:1], seq_lens[:1], every[:1], scale
    )
    tag = f"ctx={ctx} B={batch}"
    checks.bound(f"dense vs reference {tag}", rel_err(dense_out[:1], ref_out), REL_TOL)
    checks.bound(f"dense lse {tag}", (dense_lse[:1] - ref_lse).abs().max().item(), 1e-3)
    checks.bound(f"dense vs sdpa {tag}", rel_err(dense_out, sdpa_out), REL_TOL)
    dense_bytes = 2 * batch * seq_len * NUM_KV * DIM * 2
    sdpa_ms = median_ms(sdpa)
    dense_ms = median_ms(dense)
    dense_row = {
        "ctx": ctx,
        "batch": batch,
        "bytes": dense_bytes,
        "sdpa_ms": sdpa_ms,
        "kernel_dense_ms": dense_ms,
        "floor_ms": dense_bytes / d2d * 1e3,
        "sdpa_bw_frac": dense_bytes / (sdpa_ms * 1e-3) / d2d,
        "kernel_dense_bw_frac": dense_bytes / (dense_ms * 1e-3) / d2d,
    }
    del dense_out, sdpa_out, ref_out

    rows = []
    for top_k in top_ks:
        sels = [random_selection(gen, max_pages, batch, top_k, device) for _ in range(rotations)]
        out, lse = kernels.sparse_decode_attention(
            queries[0], k_cache, v_cache, table, seq_lens, sels[0], scale
        )
        ref_out, ref_lse = ref_attention(
            queries[0], k_cache, v_cache, table, seq_lens, sels[0], scale
        )
        err = checks.bound(f"sparse {tag} K={top_k}", rel_err(out, ref_out), REL_TOL)
        checks.bound(f"sparse lse {tag} K={top_k}", (lse - ref_lse).abs().max().item(), 1e-3)
        calls = [
            (lambda q=q, s=s: kernel_attention(q, k_cache, v_cache, table, seq_lens, s, scale))
            for q, s in zip(queries, sels)
        ]
        eager_ms = median_ms(calls[0])
        g_ms = graph_ms(calls)
        nbytes = 2 * batch * NUM_KV * (top_k * PAGE - 5) * DIM * 2
        rows.append(
            {
                "ctx": ctx,
                "batch": batch,
                "top_k": top_k,
                "bytes": nbytes,
                "rel_err": err,
                "eager_ms": eager_ms,
                "graph_ms": g_ms,
                "floor_ms": nbytes / d2d * 1e3,
                "same_bytes_copy_ms": same_bytes_copy_ms(nbytes, device, rotations),
                "bw_frac": nbytes / (g_ms * 1e-3) / d2d,
                "speedup_vs_sdpa": sdpa_ms / g_ms,
            }
        )
        del out, ref_out

    # Scoring + top-K on the bounds of every page, amortised over a rerank interval.
    kmin = k_cache.amin(dim=1).float()
    kmax = k_cache.amax(dim=1).float()
    bounds = PageBounds(kmin=kmin, kmax=kmax)
    sel_rows = []
    for top_k in top_ks:
        ids = kernels.score_and_select(queries[0], bounds, table, num_pages, top_k)
        scores = score_pages(queries[0], bounds, table, num_pages)
        scores[:, :, max_pages - 1] = float("inf")
        ref_top = scores.topk(min(top_k, max_pages), dim=2).values.sort(dim=2).values
        got = scores.gather(2, ids.clamp_min(0)).sort(dim=2).values
        checks.true(
            f"select {tag} K={top_k}: ids valid", bool(((ids >= 0) & (ids < max_pages)).all())
        )
        checks.bound(
            f"select {tag} K={top_k}: score sets",
            (got - ref_top).nan_to_num(posinf=0.0).abs().max().item(),
            1e-3,
        )
        calls = [
            (lambda q=q, k=top_k: kernels.score_and_select(q, bounds, table, num_pages, k))
            for q in queries
        ]
        g_ms = graph_ms(calls)
        half = PageBounds(kmin=kmin.bfloat16(), kmax=kmax.bfloat16())
        ids16 = kernels.score_and_select(queries[0], half, table, num_pages, top_k)
        scores16 = score_pages(
            queries[0], PageBounds(half.kmin.float(), half.kmax.float()), table, num_pages
        )
        scores16[:, :, max_pages - 1] = float("inf")
        ref16 = scores16.topk(min(top_k, max_pages), dim=2).values.sort(dim=2).values
        got16 = scores16.gather(2, ids16.clamp_min(0)).sort(dim=2).values
        checks.bound(
            f"select bf16 bounds {tag} K={top_k}: score sets",
            (got16 - ref16).nan_to_num(posinf=0.0).abs().max().item(),
            1e-3,
        )
        g16_ms = graph_ms(
            [
                (lambda q=q, b=half, k=top_k: kernels.score_and_select(q, b, table, num_pages, k))
                for q in queries
            ]
        )
        sparse_ms = next(r["graph_ms"] for r in rows if r["top_k"] == top_k)
        nbytes = 2 * batch * NUM_KV * max_pages * DIM * 4
        sel_rows.append(
            {
                "ctx": ctx,
                "batch": batch,
                "top_k": top_k,
                "bytes": nbytes,
                "graph_ms": g_ms,
                "floor_ms": nbytes / d2d * 1e3,
                "bw_frac": nbytes / (g_ms * 1e-3) / d2d,
                "amortized_frac_of_sparse": g_ms / RERANK_INTERVAL / sparse_ms,
                "bf16_bounds_graph_ms": g16_ms,
                "bf16_amortized_frac_of_sparse": g16_ms / RERANK_INTERVAL / sparse_ms,
            }
        )
        del scores

    # Append one decode token per sequence (the per-step bounds update).
    slots = table[:, -1].long() * PAGE + (seq_len - 1) % PAGE
    new_keys = torch.randn(batch, NUM_KV, DIM, device=device, dtype=torch.bfloat16, generator=gen)
    ref = PageBounds(kmin=kmin.clone(), kmax=kmax.clone())
    ref.update(new_keys, slots, PAGE)
    kernels.update_bounds(bounds, new_keys, slots, PAGE)
    checks.true(
        f"update_bounds {tag} exact",
        torch.equal(ref.kmin, bounds.kmin) and torch.equal(ref.kmax, bounds.kmax),
    )
    upd_ms = graph_ms([lambda: kernels.update_bounds(bounds, new_keys, slots, PAGE)], repeat=8)
    upd_row = {
        "ctx": ctx,
        "batch": batch,
        "graph_ms": upd_ms,
        "append_int8_ms": bench_append(bounds, table, seq_lens, new_keys, checks, tag),
    }
    return rows, {"dense": dense_row, "update": upd_row}, {"select": sel_rows}


def bench_append(
    bounds: PageBounds,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    keys: torch.Tensor,
    checks: Checks,
    tag: str,
) -> float:
    """The int8 path's per-step update (``kernels.append_bounds``): one key per sequence that
    closes its page and its super-page (the case that rounds and stores both), checked
    bit-for-bit against ``LiveBounds.append``; returns graph-replay ms per call."""
    live = LiveBounds.from_bounds(bounds, table, seq_lens, PAGE, DEFAULT_GROUP)
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
    pos = torch.full_like(seq_lens, table.shape[1] * PAGE - 1)  # last slot of the last group
    slots = table[:, -1].long() * PAGE + PAGE - 1
    ref.append(keys, slots, pos)
    kernels.append_bounds(live, keys, slots, pos)
    pairs = [
        (getattr(a, n), getattr(b, n))
        for a, b in ((live.pages, ref.pages), (live.supers, ref.supers))
        for n in ("qmin", "qmax", "scale")
    ]
    pairs += [(live.open_min, ref.open_min), (live.open_max, ref.open_max)]
    checks.true(f"append_bounds {tag} bit-exact", all(torch.equal(a, b) for a, b in pairs))
    return graph_ms([lambda: kernels.append_bounds(live, keys, slots, pos)], repeat=8)


def bench_combine(
    batch: int, shards: int, checks: Checks, device: torch.device, gen: torch.Generator
) -> dict:
    outs = torch.randn(shards, batch, NUM_Q, DIM, device=device, generator=gen).bfloat16()
    lses = torch.randn(shards, batch, NUM_Q, device=device, generator=gen) * 3
    out, lse = kernels.combine_partials(outs, lses)
    ref_out, ref_lse = ref_combine(outs, lses)
    err = checks.bound(f"combine B={batch} S={shards}", rel_err(out, ref_out), REL_TOL)
    checks.bound(f"combine lse B={batch} S={shards}", (lse - ref_lse).abs().max().item(), 1e-4)
    g_ms = graph_ms([lambda: kernels.combine_partials(outs, lses)], repeat=8)
    return {"batch": batch, "shards": shards, "rel_err": err, "graph_ms": g_ms}


def bench_copy(
    batch: int,
    ctx: int,
    top_k: int,
    device: torch.device,
    gen: torch.Generator,
    host_gen: torch.Generator,
    checks: Checks,
) -> list[dict]:
    """A rerank's promotions (a quarter of K per stable head) copied under sparse attention,
    once per gather mode (zero-copy device kernel, host staging + DMA)."""
    stable_heads = NUM_KV - NUM_KV // 4
    promoted = batch * stable_heads * top_k // 4
    page_shape = (2, PAGE, DIM)  # K and V of one head's page
    arena_pages = 4 * promoted  # host pages to pick from; their number does not change the cost
    arena = torch.randn(arena_pages, *page_shape, generator=host_gen).bfloat16()
    if device.type == "cuda":
        arena = arena.pin_memory()
    pool = torch.zeros(
        batch * stable_heads * top_k, *page_shape, dtype=torch.bfloat16, device=device
    )
    src = torch.randperm(arena_pages, generator=host_gen)[:promoted]
    dst = torch.randperm(pool.shape[0], generator=host_gen)[:promoted]

    # Compute to hide the copy behind: sparse attention over a cache of its own.
    max_pages = ctx // PAGE
    k_cache = torch.randn(
        batch * max_pages, PAGE, NUM_KV, DIM, device=device, dtype=torch.bfloat16, generator=gen
    )
    v_cache = torch.randn(k_cache.shape, device=device, dtype=torch.bfloat16, generator=gen)
    table = torch.arange(batch * max_pages, device=device, dtype=torch.int32).view(batch, -1)
    seq_lens = torch.full((batch,), ctx, device=device, dtype=torch.int32)
    sel = random_selection(gen, max_pages, batch, top_k, device)
    query = torch.randn(batch, NUM_Q, DIM, device=device, dtype=torch.bfloat16, generator=gen)
    repeats = 40 if device.type == "cuda" else 1
    step = lambda: kernel_attention(query, k_cache, v_cache, table, seq_lens, sel, 0.1)
    if device.type == "cuda":  # replayed as a graph: the host is free while the GPU computes
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(repeats):
                step()
        compute = graph.replay
    else:
        compute = step
    t_compute = wall_ms(compute)
    nbytes = promoted * math.prod(page_shape) * 2
    rows = []
    for gather in ("device", "host"):
        pool.zero_()
        event = kernels.copy_pages_async(arena, src, pool, dst, gather=gather)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)
        checks.true(
            f"copy_pages {gather} B={batch} exact",
            torch.equal(pool[dst.to(device)].cpu(), arena[src]),
        )

        def copy(gather=gather) -> None:
            event = kernels.copy_pages_async(arena, src, pool, dst, gather=gather)
            if event is not None:
                torch.cuda.current_stream().wait_event(event)

        def both(copy=copy) -> None:
            compute()
            copy()

        t_copy, t_both = wall_ms(copy), wall_ms(both)
        rows.append(
            {
                "batch": batch,
                "gather": gather,
                "pages": promoted,
                "bytes": nbytes,
                "copy_ms": t_copy,
                "copy_bytes_per_s": nbytes / (t_copy * 1e-3),
                "compute_ms": t_compute,
                "both_ms": t_both,
                "overlap_frac": (t_compute + t_copy - t_both) / min(t_compute, t_copy),
            }
        )
    return rows


def score_set_gap(values: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest gap between the sorted score sets that two id selections pick from ``values``
    (+inf, the forced pages, counts as equal; NaN propagates and fails the bound)."""
    a_set = values.gather(2, a.clamp_min(0)).sort(dim=2).values
    b_set = values.gather(2, b.clamp_min(0)).sort(dim=2).values
    return (a_set - b_set).nan_to_num(posinf=0.0).abs().max().item()


def bench_hier(
    ctx: int,
    batch: int,
    top_ks: list[int],
    variants: list[tuple[int, int]],
    ceil: dict,
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
) -> list[dict]:
    """Rerank selection as a share of the sparse step: flat fp32 (before), flat int8, two-level
    int8, and the one ``kernels.select_pages`` dispatches to.

    The sparse step and the flat fp32 selection are re-measured here exactly as in
    :func:`bench_context`. The int8 bounds are cloned per rotation, so that these (small) bounds
    do not sit in the L2 between calls; the flat fp32 timing keeps the old method (one bounds
    tensor; at 32k and beyond it exceeds the L2 anyway).
    """
    prob = PagedProblem.random(ctx, batch, device, gen, rotations)
    k_cache, table, num_pages, queries = prob.k_cache, prob.table, prob.num_pages, prob.queries
    max_pages = prob.max_pages
    bounds = PageBounds(kmin=k_cache.amin(dim=1).float(), kmax=k_cache.amax(dim=1).float())
    pages = CompactBounds.from_pages(bounds)
    clone = lambda c: CompactBounds(c.qmin.clone(), c.qmax.clone(), c.scale.clone())
    page_sets = [pages] + [clone(pages) for _ in range(rotations - 1)]
    supers = {g: build_super_bounds(bounds, table, num_pages, g) for g, _ in variants}
    super_sets = {g: [s] + [clone(s) for _ in range(rotations - 1)] for g, s in supers.items()}
    forced = score_compact_pages(queries[0], pages, table, num_pages)
    forced[:, :, max_pages - 1] = float("inf")
    finite = forced[forced.isfinite()].abs().max().item()
    d2d = ceil["d2d_bytes_per_s"]
    box = 2 * DIM + 4  # int8 qmin + qmax, fp32 scale
    tag = f"ctx={ctx} B={batch}"
    rows = []
    for top_k in top_ks:
        sels = [random_selection(gen, max_pages, batch, top_k, device) for _ in range(rotations)]
        sparse_ms = prob.sparse_ms(sels)
        flat_ms = graph_ms(
            [
                (lambda q=q, k=top_k: kernels.score_and_select(q, bounds, table, num_pages, k))
                for q in queries
            ]
        )
        # Flat int8: every page scored from its int8 box (the dispatch's path for few pages).
        got = kernels.flat_select(queries[0], pages, table, num_pages, top_k)
        ref = flat_select(queries[0], pages, table, num_pages, top_k)
        checks.true(
            f"flat int8 {tag} K={top_k}: ids valid, counts equal",
            bool(((got >= 0) & (got < max_pages)).all())
            and torch.equal((got >= 0).sum(2), (ref >= 0).sum(2)),
        )
        checks.bound(
            f"flat int8 {tag} K={top_k}: score sets",
            score_set_gap(forced, got, ref),
            1e-5 * finite + 1e-3,
        )
        int8_ms = graph_ms(
            [
                (lambda q=q, p=p, k=top_k: kernels.flat_select(q, p, table, num_pages, k))
                for q, p in zip(queries, page_sets)
            ]
        )
        int8_bytes = batch * NUM_KV * max_pages * box
        auto = plan_selection(max_pages, top_k, rows=batch * NUM_KV)
        row = {
            "ctx": ctx,
            "batch": batch,
            "top_k": top_k,
            "sparse_ms": sparse_ms,
            "flat_fp32_ms": flat_ms,
            "flat_fp32_bytes": 2 * batch * NUM_KV * max_pages * DIM * 4,
            "flat_fp32_frac_of_sparse": flat_ms / RERANK_INTERVAL / sparse_ms,
            "flat_int8_ms": int8_ms,
            "flat_int8_bytes": int8_bytes,
            "flat_int8_frac_of_sparse": int8_ms / RERANK_INTERVAL / sparse_ms,
            "auto": "flat int8" if auto is None else f"G={DEFAULT_GROUP} M={auto}",
            "variants": [],
        }
        for group, per_k in variants:
            num_super = default_num_super(top_k, group, per_k)
            name = f"{tag} K={top_k} G={group} M={num_super}"
            # Each level against the reference: the super-page score set, then the pages chosen
            # inside the kernel's super-pages (a near-tie at the M-th super-page may pick
            # another super-page of equal score; the pages must then follow from it).
            got, got_sup = hier_select_stages(
                queries[0], pages, supers[group], table, num_pages, top_k, group, num_super
            )
            ref_sup = select_super_pages(queries[0], supers[group], num_pages, group, num_super)
            sup_scores = super_page_scores(queries[0], supers[group], num_pages, group)
            sup_finite = sup_scores[sup_scores.isfinite()].abs().max().item()
            ref = select_in_super_pages(queries[0], pages, got_sup, table, num_pages, top_k, group)
            checks.true(
                f"hier {name}: ids valid, counts equal",
                bool(((got >= 0) & (got < max_pages)).all())
                and torch.equal((got >= 0).sum(2), (ref >= 0).sum(2))
                and torch.equal((got_sup >= 0).sum(2), (ref_sup >= 0).sum(2)),
            )
            for level, values, a, b, scale in (
                ("super-page", sup_scores, got_sup, ref_sup, sup_finite),
                ("page", forced, got, ref, finite),
            ):
                checks.bound(
                    f"hier {name}: {level} score sets",
                    score_set_gap(values, a, b),
                    1e-5 * scale + 1e-3,
                )
            g_ms = graph_ms(
                [
                    (
                        lambda q=q, p=p, s=s, k=top_k, g=group, m=num_super: kernels.hier_select(
                            q, p, s, table, num_pages, k, g, m
                        )
                    )
                    for q, p, s in zip(queries, page_sets, super_sets[group])
                ]
            )
            boxes = num_super_pages(max_pages, group) + min(num_super * group, max_pages)
            nbytes = batch * NUM_KV * boxes * box
            row["variants"].append(
                {
                    "group": group,
                    "candidates_per_k": per_k,
                    "num_super": num_super,
                    "graph_ms": g_ms,
                    "bytes": nbytes,
                    "floor_ms": nbytes / d2d * 1e3,
                    "frac_of_sparse": g_ms / RERANK_INTERVAL / sparse_ms,
                }
            )
        default = next(
            (
                v
                for v in row["variants"]
                if v["group"] == DEFAULT_GROUP and v["candidates_per_k"] == DEFAULT_CANDIDATES_PER_K
            ),
            row["variants"][0],
        )
        row["auto_ms"] = int8_ms if auto is None else default["graph_ms"]
        row["auto_frac_of_sparse"] = row["auto_ms"] / RERANK_INTERVAL / sparse_ms
        rows.append(row)
    return rows


def write_hier_markdown(path: Path, result: dict) -> None:
    """Replace (or add) the two-level section at the end of the kernels' markdown."""
    hier = result["hier_select"]
    variants = [(v["group"], v["candidates_per_k"]) for v in hier["rows"][0]["variants"]]
    head = " | ".join(f"G={g}, {r}K cand. ms / %" for g, r in variants)
    lines = [
        HIER_MARKER,
        "",
        (
            "Rerank selection amortised over R = 16 steps as a share of a sparse decode step "
            "(both re-measured in this run; medians of graph replays over 8 rotating inputs). "
            "Flat fp32: `score_and_select` on fp32 bounds (before). Flat int8: `flat_select`, "
            "every page scored from int8 bounds. Two-level: `hier_select` on int8 bounds, "
            "super-pages of G pages, top M = r K / G super-pages, top-K of their r K pages. "
            "Auto: the path `kernels.select_pages` takes at this size. Checks: every timed size "
            f"against the torch reference ({hier['checks']} checks, {hier['failed']} failed)."
        ),
        "",
        (
            f"| ctx | batch | K | sparse ms | flat fp32 ms / % | flat int8 ms / % | {head} | "
            "auto | auto % |"
        ),
        "|---|---|---|---|---|---|" + "---|" * len(variants) + "---|---|",
    ]
    for r in hier["rows"]:
        cells = " | ".join(
            f"{v['graph_ms']:.4f} / {100 * v['frac_of_sparse']:.1f}" for v in r["variants"]
        )
        lines.append(
            f"| {r['ctx']} | {r['batch']} | {r['top_k']} | {r['sparse_ms']:.4f} | "
            f"{r['flat_fp32_ms']:.4f} / {100 * r['flat_fp32_frac_of_sparse']:.0f} | "
            f"{r['flat_int8_ms']:.4f} / {100 * r['flat_int8_frac_of_sparse']:.1f} | "
            f"{cells} | {r['auto']} | {100 * r['auto_frac_of_sparse']:.1f} |"
        )
    old = path.read_text().split(HIER_MARKER)[0].rstrip() if path.exists() else ""
    path.write_text((old + "\n\n" if old else "") + "\n".join(lines) + "\n")


def bench_configs(
    ctx: int,
    batches: list[int],
    top_k: int,
    device: torch.device,
    gen: torch.Generator,
    checks: Checks,
    rotations: int,
) -> list[dict]:
    """Launch-shape sweep (tile, programs per SM, warps, stages) at one context and K.

    Every configuration must agree with the default; the table shows where the default lands.
    """
    configs = [
        LaunchConfig(tile, per_sm, warps, stages)
        for tile in (64, 128)
        for per_sm in (2, 4, 8)
        for warps in (4, 8)
        for stages in (2, 3, 4)
    ]
    if rotations == 1:  # smoke run: a handful
        configs = [DEFAULT_CONFIG, LaunchConfig(128, 2, 8, 2)]
    max_pages = ctx // PAGE
    rows = []
    for batch in batches:
        prob = PagedProblem.random(ctx, batch, device, gen, 1, tail_gap=0)
        k_cache, v_cache, table, seq_lens = prob.k_cache, prob.v_cache, prob.table, prob.seq_lens
        query = prob.queries[0]
        sels = [random_selection(gen, max_pages, batch, top_k, device) for _ in range(rotations)]
        base, _ = kernel_attention(query, k_cache, v_cache, table, seq_lens, sels[0], 0.1)
        for config in configs:
            out, _ = kernel_attention(
                query, k_cache, v_cache, table, seq_lens, sels[0], 0.1, config=config
            )
            checks.bound(f"config {config} B={batch} agrees", rel_err(out, base), REL_TOL)
            calls = [
                (
                    lambda s=s, c=config, q=query, kc=k_cache, vc=v_cache, t=table, n=seq_lens: (
                        kernel_attention(q, kc, vc, t, n, s, 0.1, config=c)
                    )
                )
                for s in sels
            ]
            rows.append(
                {
                    "ctx": ctx,
                    "batch": batch,
                    "top_k": top_k,
                    **asdict(config),
                    "default": config == DEFAULT_CONFIG,
                    "graph_ms": graph_ms(calls),
                }
            )
    return rows


def write_markdown(path: Path, result: dict) -> None:
    lines = [
        f"# GPU kernels on {result['device']}",
        "",
        (
            f"Copy bandwidth (read+write) {result['ceilings']['d2d_bytes_per_s'] / 1e12:.2f} TB/s; "
            f"pinned host->device {result['ceilings']['h2d_pinned_bytes_per_s'] / 1e9:.1f} GB/s. "
            "Llama-8B attention shape (32 q / 8 kv heads, dim 128), bf16, 16-token pages. "
            "Sparse, select and copy times: medians of CUDA-graph replays over 8 rotating input "
            "sets. Dense SDPA and dense kernel: eager `do_bench` medians (L2 flushed), which at "
            "small sizes include the host's launch time. Floor: bytes read / copy bandwidth; "
            "same-bytes copy: a device copy moving as many bytes, the yardstick at sizes too small "
            "to fill the GPU."
        ),
        "",
        (
            "| ctx | batch | dense SDPA ms | dense kernel ms | K | sparse ms | floor ms | "
            "same-bytes copy ms | % of copy bw | x SDPA | select ms (fp32 / bf16 bounds) | "
            "select/16 as % of sparse (fp32 / bf16) |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    dense = {(d["ctx"], d["batch"]): d for d in result["dense"]}
    select = {(s["ctx"], s["batch"], s["top_k"]): s for s in result["select"]}
    for r in result["attention"]:
        d, s = dense[(r["ctx"], r["batch"])], select[(r["ctx"], r["batch"], r["top_k"])]
        lines.append(
            f"| {r['ctx']} | {r['batch']} | {d['sdpa_ms']:.3f} | {d['kernel_dense_ms']:.3f} | "
            f"{r['top_k']} | {r['graph_ms']:.4f} | {r['floor_ms']:.4f} | "
            f"{r['same_bytes_copy_ms']:.4f} | {100 * r['bw_frac']:.0f} | "
            f"{r['speedup_vs_sdpa']:.1f} | {s['graph_ms']:.4f} / {s['bf16_bounds_graph_ms']:.4f} | "
            f"{100 * s['amortized_frac_of_sparse']:.0f} / "
            f"{100 * s['bf16_amortized_frac_of_sparse']:.0f} |"
        )
    checks = result["checks"]
    lines += [
        "",
        f"Checks: {checks['count']} run, {len(checks['failed'])} failed.",
        "",
        (
            "Bounds update per decode step, one token per sequence (graph replay, us): fp32 "
            "`update_bounds` (2 launches) / int8 `append_bounds` (1 launch, page and "
            "super-page closing): "
            + "; ".join(
                f"{u['ctx']} B={u['batch']}: {1e3 * u['graph_ms']:.1f} / "
                f"{1e3 * u['append_int8_ms']:.1f}"
                for u in result["update"]
                if "append_int8_ms" in u
            )
        ),
        "",
    ]
    path.write_text("\n".join(lines))


def run_hier(
    out_dir: Path,
    name: str,
    contexts: list[int],
    batches: list[int],
    top_ks: list[int],
    ceil: dict,
    checks: Checks,
    device: torch.device,
    gen: torch.Generator,
    rotations: int,
    quick: bool,
) -> None:
    """The two-level section alone, merged into ``<name>.json`` and ``<name>.md``."""
    variants = [(4, 2)] if quick else list(HIER_VARIANTS)
    path = out_dir / f"{name}.json"
    result = json.loads(path.read_text()) if path.exists() else {}
    rows: list[dict] = []
    for ctx in contexts:
        for batch in batches:
            rows += bench_hier(ctx, batch, top_ks, variants, ceil, checks, device, gen, rotations)
            console.print(
                f"hier ctx={ctx} batch={batch}: checks failed so far {len(checks.failed)}"
            )
            result["hier_select"] = {
                "ceilings": ceil,
                "rows": rows,
                "checks": checks.count,
                "failed": len(checks.failed),
                "failures": checks.failed,
            }
            path.write_text(json.dumps(result, indent=1))  # after each size: a crash keeps it
            if device.type == "cuda":
                torch.cuda.empty_cache()
    table = Table(title="rerank selection / 16 as % of the sparse step")
    for col in (
        "ctx",
        "B",
        "K",
        "sparse ms",
        "flat fp32 %",
        "flat int8 %",
        *(f"G{v[0]} r{v[1]} %" for v in variants),
        "auto %",
    ):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(
            str(r["ctx"]),
            str(r["batch"]),
            str(r["top_k"]),
            f"{r['sparse_ms']:.4f}",
            f"{100 * r['flat_fp32_frac_of_sparse']:.1f}",
            f"{100 * r['flat_int8_frac_of_sparse']:.1f}",
            *(f"{100 * v['frac_of_sparse']:.1f}" for v in r["variants"]),
            f"{100 * r['auto_frac_of_sparse']:.1f}",
        )
    console.print(table)
    console.print(f"checks: {checks.count} run, failed: {checks.failed or 'none'}")
    write_hier_markdown(out_dir / f"{name}.md", result)
    if checks.failed:
        raise typer.Exit(1)


@app.command()
def main(
    quick: bool = typer.Option(
        False, help="Tiny sizes: a smoke run (works under the interpreter)."
    ),
    out_dir: Path = typer.Option(GPU_RESULTS, help="Where JSON and markdown go."),
    seed: int = typer.Option(0, help="Seed of every random input."),
    hier_only: bool = typer.Option(
        False, help="Only the two-level selection section (merged into the existing results)."
    ),
) -> None:
    """Check and time every kernel; print a table; write gpu_kernels.json and gpu_kernels.md."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "gpu_kernels_quick" if quick else "gpu_kernels"

    def save(result: dict) -> None:  # after every section, so a crash keeps what was measured
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=1))

    gen = torch.Generator(device=device).manual_seed(seed)
    cpu_gen = torch.Generator().manual_seed(seed)
    contexts = [256] if quick else [8192, 32768, 131072]
    batches = [1] if quick else [1, 8, 64]
    top_ks = [4] if quick else [32, 64, 128]
    rotations = 1 if quick else ROTATIONS
    checks = Checks()
    ceil = measure_ceilings(device, quick)
    if hier_only:
        run_hier(
            out_dir, name, contexts, batches, top_ks, ceil, checks, device, gen, rotations, quick
        )
        return
    result: dict = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "seed": seed,
        "ceilings": ceil,
        "attention": [],
        "dense": [],
        "select": [],
        "update": [],
    }
    for ctx in contexts:
        for batch in batches:
            rows, extra, sel = bench_context(
                ctx, batch, top_ks, ceil, checks, device, gen, rotations
            )
            result["attention"] += rows
            result["dense"].append(extra["dense"])
            result["update"].append(extra["update"])
            result["select"] += sel["select"]
            console.print(
                f"done ctx={ctx} batch={batch}: checks failed so far {len(checks.failed)}"
            )
            save(result)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    result["combine"] = [bench_combine(b, s, checks, device, gen) for b in batches for s in (2, 8)]
    result["copy"] = [
        row
        for b in batches[1:] or batches
        for row in bench_copy(
            b, contexts[-1] // 4, top_ks[len(top_ks) // 2], device, gen, cpu_gen, checks
        )
    ]
    save(result)
    result["configs"] = bench_configs(
        contexts[-1], batches, top_ks[len(top_ks) // 2], device, gen, checks, rotations
    )
    result["checks"] = {"count": checks.count, "failed": checks.failed}

    table = Table(title=f"sparse decode attention on {result['device']}")
    for col in (
        "ctx",
        "B",
        "K",
        "SDPA ms",
        "sparse ms",
        "floor ms",
        "copy ms",
        "% bw",
        "x SDPA",
        "select ms",
        "sel/16 %",
    ):
        table.add_column(col, justify="right")
    dense = {(d["ctx"], d["batch"]): d for d in result["dense"]}
    select = {(s["ctx"], s["batch"], s["top_k"]): s for s in result["select"]}
    for r in result["attention"]:
        d, s = dense[(r["ctx"], r["batch"])], select[(r["ctx"], r["batch"], r["top_k"])]
        table.add_row(
            str(r["ctx"]),
            str(r["batch"]),
            str(r["top_k"]),
            f"{d['sdpa_ms']:.3f}",
            f"{r['graph_ms']:.4f}",
            f"{r['floor_ms']:.4f}",
            f"{r['same_bytes_copy_ms']:.4f}",
            f"{100 * r['bw_frac']:.0f}",
            f"{r['speedup_vs_sdpa']:.1f}",
            f"{s['graph_ms']:.4f}",
            f"{100 * s['amortized_frac_of_sparse']:.1f}",
        )
    console.print(table)
    best = {}
    for row in result["configs"]:
        if row["batch"] not in best or row["graph_ms"] < best[row["batch"]]["graph_ms"]:
            best[row["batch"]] = row
    default = {r["batch"]: r["graph_ms"] for r in result["configs"] if r["default"]}
    console.print({"best launch config per batch": best, "default ms": default})
    console.print(
        {"copy": result["copy"], "combine": result["combine"], "update": result["update"]}
    )
    console.print(f"checks: {checks.count} run, failed: {checks.failed or 'none'}")
    save(result)
    write_markdown(out_dir / f"{name}.md", result)
    if checks.failed:
        raise typer.Exit(1)


if __name__ == "__main__":
    app()
