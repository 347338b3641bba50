"""One decode step of the FlexiCache layers vs stock vLLM's CPU attention, without the engine.

The engine benchmark (``vllm_throughput.py``) measures whole steps on a shared machine, where
load swings hide the plugin's own cost. This harness builds SmolLM2's 30 attention layers as the
plugin does (real head split from the profile, bf16 caches, vLLM's CPU kernels), fills ``batch``
sequences of ``context`` tokens, and times decode steps of every layer (write + attend) against
the stock path (write every head to vLLM's cache + one paged-attention call over all heads, on
32-token blocks and the ISA vLLM picks for them, as stock vLLM runs). Stock and FlexiCache steps
alternate, so load from other work on a shared machine hits both alike.
``--profile-out`` writes a cProfile of the FlexiCache steps.

Layers are built through the plugin's runtime from named settings (``--config`` a preset of
:mod:`kvhead.presets` or its record name spec / plus / plus11, ``benchmarks/common.py``) with
``--set key=value`` overrides, so what each flexicache+ option costs can be timed one at a time
(e.g. ``--config plus --set compensate=false``).

Run: ``python benchmarks/vllm/vllm_throughput_layer.py --context 7936 --batch 4 --out FILE``
(the recorded runs are ``benchmarks/results/vllm/vllm_throughput_layer_*.json``; without
``--out`` it only prints).
"""

from __future__ import annotations

import cProfile
import json
import os
import pstats
import sys
import time
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from pydantic import ValidationError

from benchmarks.common import CONFIG_NAMES, kvhead_settings
from kvhead.core.stability import HeadProfile
from kvhead.vllm.config import FlexiCacheSettings, HeadSplit, stable_budgets
from kvhead.vllm.ops import paged_attention, write_cache
from kvhead.vllm.request_state import DecodeRows
from kvhead.vllm.runtime import FlexiRuntime, ModelGeometry

app = typer.Typer(add_completion=False)
ARENA_GIB = 8.0  # every stable page of the harness's blocks (bf16)
LAYERS, HQ, HKV, D, P, STOCK_BLOCK = 30, 9, 3, 64, 16, 32
DTYPE = torch.bfloat16


class Harness:
    """30 layers, ``batch`` sequences of ``context`` tokens in random physical blocks."""

    def __init__(
        self, context: int, batch: int, settings: FlexiCacheSettings, isa: str, stock_isa: str
    ) -> None:
        torch.manual_seed(0)
        self.isa, self.stock_isa, self.batch = isa, stock_isa, batch
        profile = HeadProfile.load(settings.profile)
        self.split = HeadSplit.from_profile(
            profile, settings.max_resident_heads_per_layer, settings.leading_layers
        )
        width = (context + 512) // P + 1
        self.num_blocks = batch * width + 1
        self.table = torch.randperm(self.num_blocks)[: batch * width].view(batch, width).int()
        stock_blocks = self.num_blocks // 2 + 1
        stock_ids = torch.randperm(stock_blocks)[: batch * (width // 2)]
        self.stock_table = stock_ids.view(batch, -1).int()
        geo = ModelGeometry(
            num_layers=LAYERS,
            num_q_heads=HQ,
            num_kv_heads=HKV,
            head_dim=D,
            page_size=P,
            dtype=DTYPE,
            max_model_len=width * P,
            max_num_seqs=batch,
        )
        runtime = FlexiRuntime(
            settings, self.split, geo, isa, P, stable_budgets(settings, profile, self.split)
        )
        self.layers, self.caches, self.stock = [], [], []
        for i in range(LAYERS):
            self.layers.append(runtime.layer(i, self.num_blocks))
            self.caches.append(
                torch.zeros(
                    self.num_blocks, max(len(self.split.resident(i)), 1), P, 2 * D, dtype=DTYPE
                )
            )
            self.stock.append(torch.zeros(stock_blocks, HKV, STOCK_BLOCK, 2 * D, dtype=DTYPE))
        self.seq_lens = torch.zeros(batch, dtype=torch.int64)
        self.steps, self.rerank_interval = 0, settings.rerank_interval
        self.all_blocks = torch.arange(self.num_blocks)
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
            layer.write(k, v, slots, self.caches[i], self.all_blocks)
            write_cache(self.stock[i], k, v, stock_slots, self.stock_isa)

    def step(self, kvhead: bool) -> None:
        """One decode token per sequence through every layer (the same token for both paths)."""
        table, block = (self.table, P) if kvhead else (self.stock_table, STOCK_BLOCK)
        slots = (
            table.long().gather(1, (self.seq_lens // block).view(-1, 1)).flatten() * block
            + self.seq_lens % block
        )
        lens = self.seq_lens + 1
        q = torch.randn(self.batch, HQ, D, dtype=DTYPE)
        out = torch.empty_like(q)
        k, v = torch.randn(2, self.batch, HKV, D, dtype=DTYPE)
        starts = torch.arange(self.batch + 1)
        rows = DecodeRows.lock_step(self.batch, self.steps, self.rerank_interval)
        for i, layer in enumerate(self.layers):
            if kvhead:
                layer.write(k, v, slots, self.caches[i], self.all_blocks)
                layer.decode(
                    q,
                    out,
                    torch.arange(self.batch),
                    lens,
                    self.table,
                    self.caches[i],
                    D**-0.5,
                    rows,
                    self.all_blocks,
                )
            else:
                write_cache(self.stock[i], k, v, slots, self.stock_isa)
                paged_attention(q, self.stock[i], out, starts, lens, table, D**-0.5, self.stock_isa)
        if kvhead:  # a step is one stock and one kvhead pass over the same position
            self.seq_lens = lens
            self.steps += 1


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


def _settings(config: str, overrides: list[str]) -> FlexiCacheSettings:
    """Named settings with ``key=value`` overrides (values parsed as JSON, else strings)."""
    raw = kvhead_settings(config, ARENA_GIB)
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"--set takes key=value, got {item!r}")
        try:
            raw[key] = json.loads(value)
        except json.JSONDecodeError:
            raw[key] = value
    try:
        return FlexiCacheSettings.model_validate(raw)
    except ValidationError as err:
        raise typer.BadParameter(str(err)) from None


@app.command()
def main(
    context: int = 7936,
    batch: int = 4,
    steps: int = 32,
    config: str = typer.Option("paper", help=f"kvhead settings, one of {CONFIG_NAMES}."),
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Setting override key=value (repeatable).")
    ] = None,
    threads: int = typer.Option(0, help="OpenMP threads for both paths (0: torch's)."),
    kernel_threads: int = typer.Option(0, help="FlexiCache decode threads (0: torch's)."),
    profile_out: Path | None = None,
    out: Path | None = None,
) -> None:
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    set_ = set_ or []
    settings = _settings(
        config, [*set_, *([f"decode_kernel_threads={kernel_threads}"] if kernel_threads else [])]
    )
    if threads:
        torch.set_num_threads(threads)
    if torch.cpu._is_amx_tile_supported():
        torch.cpu._init_amx()  # as vLLM's CPU worker does before its AMX kernels run
    harness = Harness(
        context, batch, settings, _get_attn_isa(DTYPE, P, D), _get_attn_isa(DTYPE, STOCK_BLOCK, D)
    )
    stock_ms, kvhead_ms = _time(harness, steps)
    result = {
        "context": context,
        "batch": batch,
        "steps": steps,
        "config": config,
        "overrides": set_,
        "top_k": settings.top_k,
        "rerank_interval": settings.rerank_interval,
        "threads": torch.get_num_threads(),
        "kernel_threads": kernel_threads,
        "isa": {"stock": harness.stock_isa, "kvhead": harness.isa},
        "load_average": os.getloadavg(),
        "stock_attention_ms_per_step": stock_ms,
        "kvhead_attention_ms_per_step": kvhead_ms,
        "kvhead_over_stock": kvhead_ms / stock_ms,
    }
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
