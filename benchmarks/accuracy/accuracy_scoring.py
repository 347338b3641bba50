"""Which page score, and are summary tokens worth it? A screen on attention outputs at one context.

The reference runner decodes the dense model's greedy continuation of corpus windows densely; at
every (step, layer) a probe takes each stable head's exact attention (the heads the profile keeps
sparse in ``flexicache+``: unstable and leading-layer heads are dense there) and compares, at the
same K, the pages chosen by:

* ``box_max``: the spec's score (Quest's upper bound, max over the GQA group);
* ``box_soft``: the same bound, the group's softmaxes summed (``flexicache+`` until now);
* ``w{30..70}``: box centre's logit + w x the box's spread, softmaxes summed
  (``score_pages(bound_weight=w)``);
* ``oracle``: the K pages holding the most true attention mass (needs every key: a bound).

For each: the attention mass the pages keep, and the relative error of the head's attention
output (``|o - o_dense| / |o_dense|``, mean over query heads) without and with summary tokens for
the skipped pages (``kvhead.core.summaries``: key = box centre, value = page mean, logit + log
count).
Output error is what the next layer sees, so it ranks the candidates more directly than mass.

Run: ``python benchmarks/accuracy/accuracy_scoring.py --windows 1,3`` (CPU, ~1.5 min per 8k
window); writes ``benchmarks/results/accuracy/accuracy_scoring.json``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer

from benchmarks.accuracy.stable_head_screen import StableHeadProbe, mean5, screen_windows
from benchmarks.common import ACCURACY_RESULTS
from kvhead.core.pages import PageBounds, page_mask, page_sums, score_pages, select_top_k
from kvhead.core.summaries import compensate

app = typer.Typer(add_completion=False)
WEIGHTS = (0.3, 0.4, 0.5, 0.6, 0.7)


class OutputProbe(StableHeadProbe):
    """Measures every candidate selection on the stable heads."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.mass: dict[str, list[float]] = {}

    @torch.no_grad()
    def _measure(
        self, layer: int, query: torch.Tensor, bounds: PageBounds, block_table, seq_lens
    ) -> None:
        spec, total = self.spec, int(seq_lens[0])
        num_pages = (seq_lens.long() + spec.page_size - 1) // spec.page_size
        width = int(num_pages[0])
        table = block_table[:, :width]
        keys, values = self.cache.keys_values(layer, total)
        scale = spec.head_dim**-0.5
        q = query[0].float().view(spec.num_kv_heads, -1, spec.head_dim)
        logits = torch.einsum("hgd,thd->hgt", q, keys.float()) * scale  # [H, G, T]
        weights = logits.softmax(-1)
        dense_out = weights @ values.float().transpose(0, 1)  # [H, G, D]
        mass = page_sums(weights, spec.page_size)
        candidates = {
            "box_max": score_pages(query, bounds, table, num_pages),
            "box_soft": score_pages(query, bounds, table, num_pages, group_score="softmax"),
            **{
                f"w{round(w * 100)}": score_pages(
                    query, bounds, table, num_pages, group_score="softmax", bound_weight=w
                )
                for w in WEIGHTS
            },
            "oracle": mass.mean(1).unsqueeze(0),
        }
        stable = self.stable[layer]
        sums = self.cache.value_sums[layer]
        for name, scores in candidates.items():
            ids = select_top_k(scores, self.top_k, num_pages)
            kept = (mass * page_mask(ids, width)[0].unsqueeze(1)).sum(-1).mean(1)  # [H]
            self.mass.setdefault(name, []).extend(kept[stable].tolist())
            out, lse = _sparse(logits, values, ids, spec.page_size, total)
            fixed = compensate(
                out, lse, query, bounds, sums, table, seq_lens, ids, spec.page_size, scale
            )
            for tag, o in (("", out), ("+summaries", fixed)):
                o = o[0].view_as(dense_out)
                err = ((o - dense_out).norm(dim=-1) / dense_out.norm(dim=-1)).mean(1)
                self.error.setdefault(name + tag, []).extend(err[stable].tolist())


def _sparse(logits, values, ids, page_size, total):
    """Attention restricted to the listed pages, from the dense logits (``out, lse`` per query)."""
    heads, group, _ = logits.shape
    listed = page_mask(ids, -(-total // page_size))[0]
    listed = listed.repeat_interleave(page_size, dim=-1)[:, :total]
    logits = logits.masked_fill(~listed.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(logits, -1)
    out = (logits - lse.unsqueeze(-1)).exp() @ values.float().transpose(0, 1)
    return out.reshape(1, heads * group, -1), lse.reshape(1, -1)


@app.command()
def main(
    context: int = typer.Option(8192, help="Sequence length (prompt + steps)."),
    steps: int = typer.Option(32, help="Dense decode steps measured per window."),
    top_k: int = typer.Option(70, help="Pages per top-K set."),
    windows: str = typer.Option("1,3", help="Corpus windows (as kvhead eval numbers them)."),
    output: Annotated[Path, typer.Option(help="JSON results file.")] = ACCURACY_RESULTS
    / "accuracy_scoring.json",
) -> None:
    """Attention mass and output error per page score, with and without summary tokens."""
    screen_windows(
        OutputProbe,
        lambda probe: {
            "mass": {k: mean5(v) for k, v in probe.mass.items()},
            "output_error": {k: mean5(v) for k, v in probe.error.items()},
        },
        context=context,
        steps=steps,
        top_k=top_k,
        windows=windows,
        output=output,
    )


if __name__ == "__main__":
    app()
