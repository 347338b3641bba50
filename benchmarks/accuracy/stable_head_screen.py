"""Shared harness of the stable-head screens (accuracy_scoring.py, accuracy_summaries.py).

A screen decodes the dense model's greedy continuation of corpus windows densely and, at every
(step, layer) with stable heads, measures candidate sparse attentions against the exact one: a
probe stands in for the dense policy and records per-head numbers under names. The flexicache+
stable heads are the profile's stable heads with layers 0-1 dense.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from benchmarks.common import MODEL
from kvhead.core.pages import PageBounds
from kvhead.eval.inputs import corpus_window
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.eval.tasks import greedy, prefill
from kvhead.models import resolve_model
from kvhead.models.profiles import profile_for_model


class StableHeadProbe:
    """Decodes densely; ``_measure`` runs at every layer with stable heads (subclasses record)."""

    def __init__(
        self, runner: ReferenceRunner, cache: PagedKVCache, stable: torch.Tensor, top_k: int
    ) -> None:
        self.dense = runner.policy("dense")
        self.cache, self.spec, self.stable, self.top_k = cache, runner.spec, stable, top_k
        self.error: dict[str, list[float]] = {}

    def reset(self) -> None:
        self.dense.reset()

    def select(self, layer, query, bounds, block_table, seq_lens, live=None):
        if self.stable[layer].any():
            self._measure(layer, query, bounds, block_table, seq_lens)
        return self.dense.select(layer, query, bounds, block_table, seq_lens, live)

    def _measure(
        self, layer: int, query: torch.Tensor, bounds: PageBounds, block_table, seq_lens
    ) -> None:
        raise NotImplementedError


def mean5(values: list[float]) -> float:
    return round(sum(values) / len(values), 5)


def screen_windows(
    probe_type: type[StableHeadProbe],
    summarise,
    *,
    context: int,
    steps: int,
    top_k: int,
    windows: str,
    output: Path,
) -> dict:
    """Run ``probe_type`` over corpus ``windows`` ("1,3", numbered as kvhead eval numbers them);
    ``summarise(probe)`` gives each window's row. Writes and returns the result."""
    start = time.perf_counter()
    model_dir = resolve_model(MODEL)
    runner = ReferenceRunner.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    stable = ~profile_for_model(model_dir, None).unstable_mask(leading_layers=2)
    result: dict = {"context": context, "steps": steps, "top_k": top_k, "windows": {}}
    for window in [int(w) for w in windows.split(",")]:
        prompt = corpus_window(tokenizer, context - steps, offset=window * 7919)  # eval's window
        pre = prefill(runner, prompt, steps)
        probe = probe_type(runner, pre.cache, stable, top_k)
        greedy(runner, pre, steps, probe)
        result["windows"][window] = row = summarise(probe)
        print(window, json.dumps(row), flush=True)
    result["seconds"] = round(time.perf_counter() - start)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"wrote {output}")
    return result
