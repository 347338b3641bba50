"""One decode step of the FlexiCache layers vs stock vLLM's CPU attention, without the engine.

The engine benchmark (``vllm_throughput.py``) measures whole steps on a shared machine, where
load swings hide the plugin's own cost. This harness builds SmolLM2's 30 attention layers as the
plugin does (real head split from the profile, bf16 caches, vLLM's CPU kernels), fills ``batch``
sequences of ``context`` tokens, and times decode steps of every layer (write + attend) against
the stock path (write every head to vLLM's cache + one paged-attention call over all heads, on
32-token blocks and the ISA vLLM picks for them, as stock vLLM runs). Stock and FlexiCache steps
alternate, so load from other work on a shared machine hits both alike.
``--profile-out`` writes a cProfile of the FlexiCache steps.

Run: ``python benchmarks/vllm_throughput_layer.py --context 7936 --batch 4``.
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import time
from pathlib import Path

import torch
import typer

from kvhead.spec import HeadPageSpec
from kvhead.stability import HeadProfile
from kvhead.vllm_plugin.config import HeadSplit
from kvhead.vllm_plugin.kernels import paged_attention, write_cache
from kvhead.vllm_plugin.layer import FlexiLayer
from kvstore import HostArena, HostArenaConfig

app = typer.Typer(add_completion=False)
PROFILE = Path(__file__).parents[1] / "kvhead" / "profiles" / "smollm2-135m-instruct.json"
LAYERS, HQ, HKV, D, P, STOCK_BLOCK = 30, 9, 3, 64, 16, 32
DTYPE = torch.bfloat16


class Harness:
    """30 layers, ``batch`` sequences of ``context`` tokens in random physical blocks."""

    def __init__(self, context: int, batch: int, top_k: int, rerank: int, isa: str,
                 stock_isa: str, kernel_threads: int) -> None:
        torch.manual_seed(0)
        self.isa, self.stock_isa, self.batch = isa, stock_isa, batch
        self.split = HeadSplit.from_profile(HeadProfile.load(PROFILE))
        width = (context + 512) // P + 1
        self.num_blocks = batch * width + 1
        self.table = torch.randperm(self.num_blocks)[: batch * width].view(batch, width).int()
        stock_blocks = self.num_blocks // 2 + 1
        self.stock_table = torch.randperm(stock_blocks)[: batch * (width // 2)].view(batch, -1).int()
        spec = HeadPageSpec(HQ, HKV, D, P, DTYPE)
        arena = HostArena(spec, HostArenaConfig(
            capacity_pages=self.num_blocks * self.split.num_stable, num_layers=LAYERS,
            num_blocks=self.num_blocks))
        self.layers, self.caches, self.stock = [], [], []
        for i in range(LAYERS):
            resident, stable = self.split.resident(i), self.split.stable(i)
            self.layers.append(FlexiLayer(
                i, resident, stable, num_kv_heads=HKV, group=HQ // HKV,
                num_blocks=self.num_blocks, page_size=P, head_dim=D, dtype=DTYPE, prefill_isa=isa,
                arena=arena, pool_pages=batch * len(stable) * (top_k + 3), open_pages=4 * batch,
                top_k=top_k, rerank_interval=rerank, kernel_threads=kernel_threads or None))
            self.caches.append(torch.zeros(self.num_blocks, max(len(resident), 1), P, 2 * D,
                                           dtype=DTYPE))
            self.stock.append(torch.zeros(stock_blocks, HKV, STOCK_BLOCK, 2 * D, dtype=DTYPE))
        self.seq_lens = torch.zeros(batch, dtype=torch.int64)
        for start in range(0, context, 1024):
            self._write(torch.arange(start, min(start + 1024, context)))
        self.seq_lens += context

    def _slots(self, positions: torch.Tensor, table: torch.Tensor, block: int) -> torch.Tensor:
        """Flat cache slots of ``positions`` of every sequence (sequence-major)."""
        rows = torch.arange(self.batch).repeat_interleave(len(positions))
        pos = positions.repeat(self.batch)
        return table[rows, pos // block].long() * block + pos % block

    def _write(self, positions: torch.Tensor) -> None:
        slots = self._slots(positions, self.table, P)
        stock_slots = self._slots(positions, self.stock_table, STOCK_BLOCK)
        for i, layer in enumerate(self.layers):
            k, v = torch.randn(2, len(slots), HKV, D, dtype=DTYPE)
            layer.write(k, v, slots, self.caches[i])
            write_cache(self.stock[i], k, v, stock_slots, self.stock_isa)

    def step(self, kvhead: bool) -> None:
        """One decode token per sequence through every layer (the same token for both paths)."""
        table, block = (self.table, P) if kvhead else (self.stock_table, STOCK_BLOCK)
        slots = table.long().gather(1, (self.seq_lens // block).view(-1, 1)).flatten() * block \
            + self.seq_lens % block
        lens = self.seq_lens + 1
        q = torch.randn(self.batch, HQ, D, dtype=DTYPE)
        out = torch.empty_like(q)
        k, v = torch.randn(2, self.batch, HKV, D, dtype=DTYPE)
        starts = torch.arange(self.batch + 1)
        for i, layer in enumerate(self.layers):
            if kvhead:
                layer.write(k, v, slots, self.caches[i])
                layer.decode(q, out, torch.arange(self.batch), lens, self.table, self.caches[i],
                             D**-0.5)
            else:
                write_cache(self.stock[i], k, v, slots, self.stock_isa)
                paged_attention(q, self.stock[i], out, starts, lens, table, D**-0.5,
                                self.stock_isa)
        if kvhead:  # a step is one stock and one kvhead pass over the same position
            self.seq_lens = lens


def _time(harness: Harness, steps: int) -> tuple[float, float]:
    """Mean ms per step of (stock, kvhead), the two alternating step by step."""
    spent = [0.0, 0.0]
    for step in range(steps + 1):
        for kvhead in (False, True):
            start = time.perf_counter()
            harness.step(kvhead)
            if step:  # step 0 warms up (and reranks every head)
                spent[kvhead] += time.perf_counter() - start
    return 1000 * spent[0] / steps, 1000 * spent[1] / steps


@app.command()
def main(context: int = 7936, batch: int = 4, steps: int = 32, top_k: int = 64, rerank: int = 16,
         threads: int = typer.Option(0, help="OpenMP threads for both paths (0: torch's)."),
         kernel_threads: int = typer.Option(0, help="FlexiCache decode threads (0: torch's)."),
         profile_out: Path | None = None, out: Path | None = None) -> None:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    if threads:
        torch.set_num_threads(threads)
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # as vLLM's CPU worker does before its AMX kernels run
    harness = Harness(context, batch, top_k, rerank, _get_attn_isa(DTYPE, P, D),
                      _get_attn_isa(DTYPE, STOCK_BLOCK, D), kernel_threads)
    stock_ms, kvhead_ms = _time(harness, steps)
    result = {"context": context, "batch": batch, "steps": steps, "top_k": top_k,
              "rerank_interval": rerank, "threads": torch.get_num_threads(),
              "kernel_threads": kernel_threads,
              "isa": {"stock": harness.stock_isa, "kvhead": harness.isa},
              "load_average": os.getloadavg(),
              "stock_attention_ms_per_step": stock_ms, "kvhead_attention_ms_per_step": kvhead_ms,
              "kvhead_over_stock": kvhead_ms / stock_ms}
    print(json.dumps(result))
    if out is not None:
        out.write_text(json.dumps(result, indent=1))
    if profile_out is not None:
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(steps):
            harness.step(True)
        profiler.disable()
        stats = pstats.Stats(profiler)
        stats.dump_stats(profile_out)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    app()
