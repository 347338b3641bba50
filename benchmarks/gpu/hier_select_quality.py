"""Selection quality of int8 and two-level (super-page) bounds on real attention (CPU).

Prefills a corpus window into SmolLM2-135M-Instruct through the reference runner, then decodes a
few teacher-forced tokens densely. At every (step, layer) it takes the decode query, the cache's
keys and its fp32 page bounds and compares, per KV head:

* ``exact``: the flat fp32 top-K (``select_top_k(score_pages(...))``), the selection in use;
* ``int8``: the flat top-K over int8 bounds (two-level with every super-page kept);
* ``G/r``: two-level with super-pages of G pages, keeping M = r x K / G super-pages, so that
  r x K pages get exact (int8) page scores;
* ``oracle``: the K pages holding the most true attention mass (newest forced): the ceiling.

Metrics: overlap with the exact set (|A n exact| / |exact|), and the share of the true softmax
attention mass (dense weights, averaged over query heads) that falls in the selected pages.

Run: ``python benchmarks/gpu/hier_select_quality.py`` (a few minutes on 2 cores at 4k); writes
``benchmarks/results/gpu/<name>.json`` and ``<name>.md`` (``--name``, default ``hier_select``).
The recorded runs: ``hier_select`` = ``--ratios 1,2,4,8``; ``hier_select_8k`` = ``--context 8192
--top-ks 16,32,64 --groups 8,16 --ratios 2,4 --name hier_select_8k``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from rich.console import Console
from transformers import AutoTokenizer

from benchmarks.common import GPU_RESULTS, MODEL
from benchmarks.gpu.selection_report import report, summarize
from kvhead.core.bounds.compact import (
    CompactBounds,
    build_super_bounds,
    hier_select,
    num_super_pages,
)
from kvhead.core.pages import page_mask, page_sums, score_pages, select_top_k
from kvhead.core.policy import LayerSelection
from kvhead.eval.inputs import corpus_window
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.models import resolve_model

console = Console()
app = typer.Typer(add_completion=False)
BY = ("top_k", "variant")


class QualityProbe:
    """A dense decode policy that, at each layer, scores the candidate selections it is given."""

    def __init__(
        self,
        runner: ReferenceRunner,
        cache: PagedKVCache,
        top_ks: list[int],
        variants: list[tuple[int, int]],
    ) -> None:
        self.dense = runner.policy("dense")
        self.cache = cache
        self.spec = runner.spec
        self.top_ks = top_ks
        self.variants = variants  # (group G, candidates per K r)
        self.rows: list[dict] = []

    def select(
        self,
        layer: int,
        query: torch.Tensor,
        bounds,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        live=None,
    ) -> LayerSelection:
        self._measure(layer, query, bounds, block_table, seq_lens)
        return self.dense.select(layer, query, bounds, block_table, seq_lens, live)

    @torch.no_grad()
    def _measure(self, layer, query, bounds, block_table, seq_lens) -> None:
        spec, total = self.spec, int(seq_lens[0])
        num_pages = (seq_lens.long() + spec.page_size - 1) // spec.page_size
        width = int(num_pages[0])
        table = block_table[:, :width]
        keys, _ = self.cache.keys_values(layer, total)  # [T, Hkv, D]
        group = spec.num_q_heads // spec.num_kv_heads
        q = query.float().view(spec.num_kv_heads, group, spec.head_dim)
        logits = torch.einsum("hgd,thd->hgt", q, keys.float()) * spec.head_dim**-0.5
        weights = logits.softmax(-1)  # [Hkv, G, T]
        mass = page_sums(weights, spec.page_size)
        head_mass = mass.mean(1)  # [Hkv, N]: a KV head's page mass, averaged over its group
        pages = CompactBounds.from_pages(bounds)
        exact_scores = score_pages(query, bounds, table, num_pages)
        for top_k in self.top_ks:
            exact = select_top_k(exact_scores, top_k, num_pages)
            oracle = select_top_k(head_mass.unsqueeze(0), top_k, num_pages)
            sets = {"exact": exact, "oracle": oracle}
            groups = num_super_pages(width, 1)
            supers1 = build_super_bounds(bounds, table, num_pages, 1)
            sets["int8"] = hier_select(query, pages, supers1, table, num_pages, top_k, 1, groups)
            for g, r in self.variants:
                supers = build_super_bounds(bounds, table, num_pages, g)
                num_super = max(1, r * top_k // g)
                sets[f"G{g}/r{r}"] = hier_select(
                    query, pages, supers, table, num_pages, top_k, g, num_super
                )
            exact_mask = page_mask(exact, width)[0]
            for name, ids in sets.items():
                m = page_mask(ids, width)[0]  # [Hkv, N]
                overlap = ((m & exact_mask).sum(-1).float() / exact_mask.sum(-1)).mean().item()
                covered = (mass * m.unsqueeze(1)).sum(-1).mean().item()
                self.rows.append(
                    {
                        "layer": layer,
                        "ctx": total,
                        "top_k": top_k,
                        "variant": name,
                        "overlap": overlap,
                        "mass": covered,
                    }
                )


@app.command()
def main(
    context: int = typer.Option(4096, help="Prefilled corpus tokens."),
    steps: int = typer.Option(4, help="Teacher-forced decode steps measured after the prefill."),
    top_ks: str = typer.Option("16,32", help="Comma-separated K (pages per head)."),
    groups: str = typer.Option("4,8,16", help="Comma-separated super-page sizes G."),
    ratios: str = typer.Option("1,2,4", help="Comma-separated r: r x K pages get page scores."),
    out_dir: Path = typer.Option(GPU_RESULTS, help="Where JSON and markdown go."),
    threads: int = typer.Option(2, help="CPU threads for the prefill."),
    name: str = typer.Option("hier_select", help="Result file stem (JSON and markdown)."),
) -> None:
    """Overlap with the exact top-K and attention mass covered, per selection variant."""
    torch.set_num_threads(threads)
    model_dir = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    runner = ReferenceRunner.from_pretrained(model_dir)
    tokens = corpus_window(tokenizer, context + steps)
    cache = runner.new_cache(context + steps)
    ks = [int(k) for k in top_ks.split(",")]
    variants = [(int(g), int(r)) for g in groups.split(",") for r in ratios.split(",")]
    probe = QualityProbe(runner, cache, ks, variants)
    runner.forward(cache, tokens[:context])
    for step in range(steps):
        runner.forward(cache, tokens[context + step : context + step + 1], policy=probe)
    summary = summarize(probe.rows, BY)
    result = {
        "model": model_dir.name,
        "context": context,
        "steps": steps,
        "page_size": runner.spec.page_size,
        "num_layers": runner.num_layers,
        "num_kv_heads": runner.spec.num_kv_heads,
        "summary": summary,
    }
    report(
        summary,
        BY,
        console=console,
        result=result,
        out_dir=out_dir,
        name=name,
        title=(
            f"selection quality, SmolLM2-135M, {context} tokens, {steps} steps x "
            f"{runner.num_layers} layers x {runner.spec.num_kv_heads} KV heads"
        ),
        heading="Two-level int8 page selection: quality on real attention",
        description=(
            f"SmolLM2-135M-Instruct, {context}-token corpus window ({context // 16} pages of 16), "
            f"{steps} teacher-forced decode steps x {runner.num_layers} layers; per KV head, "
            "averaged (and worst case) over steps, layers and heads. `exact`: flat top-K on fp32 "
            "bounds (the reference selection); `int8`: flat top-K on int8 bounds; `Gg/rr`: "
            "super-pages of g pages, top r*K/g super-pages kept, top-K of their r*K pages; "
            "`oracle`: top-K pages by true attention mass. Overlap: share of the exact set chosen; "
            "mass: share of the softmax attention mass in the chosen pages. "
            "Produced by `benchmarks/gpu/hier_select_quality.py`."
        ),
    )


if __name__ == "__main__":
    app()
