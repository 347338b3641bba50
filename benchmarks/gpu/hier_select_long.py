"""Selection quality of int8 and two-level bounds at 8k-128k tokens on *synthetic* keys (CPU).

Why synthetic: the real-model probe (``hier_select_quality.py``) is limited to SmolLM2's 8k
positions and to what a 2-core CPU can prefill. This generator keeps the properties that decide
how well min/max page bounds rank pages, so that the two-level selection can be judged at
lengths no real run here reaches:

* anisotropic keys: per-channel scales (log-normal) and a few channels with a large constant
  offset, as trained K projections have; boxes are loose in exactly those channels;
* locality: tokens come in topic segments (geometric lengths, mean ``segment`` tokens) that
  share a topic vector, so a page's keys are alike and its box is informative;
* RoPE (Llama-3 frequencies) on queries and keys, so a far key matches a query only through
  the slow channel pairs, as in a real model;
* queries that retrieve: each query head mixes the current topic with the topics of a few far
  "needle" segments, plus noise; the temperature is set so the true top pages hold most, but
  not all, of the softmax mass (as in SmolLM2: see the 8k rows, which the markdown puts next to
  the real-model result for comparison).

Shape: Llama-8B attention (8 KV heads, 4 query heads each, head dim 128), 16-token pages.
Metrics as in ``hier_select_quality.py``: overlap with the exact fp32 top-K, and the share of
the true softmax mass (averaged over the GQA group) in the selected pages.

Run: ``python benchmarks/gpu/hier_select_long.py`` (about 10 min on 2 cores); writes
``benchmarks/results/gpu/hier_select_long.{json,md}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from rich.console import Console

from benchmarks.common import GPU_RESULTS
from benchmarks.gpu.selection_report import report, summarize
from kvhead.core.bounds.compact import (
    CompactBounds,
    build_super_bounds,
    default_num_super,
    flat_select,
    hier_select,
    plan_selection,
)
from kvhead.core.pages import PageBounds, page_mask, score_pages, select_top_k

NUM_KV, GROUP_Q, DIM, PAGE = 8, 4, 128, 16
ROPE_THETA = 500_000.0
console = Console()
app = typer.Typer(add_completion=False)
BY = ("ctx", "top_k", "variant")


def rope(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (half-split layout) of ``x [..., T, D]`` at ``positions [T]``."""
    half = x.shape[-1] // 2
    freqs = ROPE_THETA ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = (positions.double()[:, None] * freqs[None, :]).float()
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


def synthetic_step(
    ctx: int, segment: int, needles: int, temperature: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys ``[T, Hkv, D]`` (post-RoPE) and one decode query ``[Hkv * G, D]`` at position T."""
    lengths = (
        torch.distributions.Geometric(probs=torch.tensor(1.0 / segment))
        .sample((ctx // 4 + 8,))
        .long()
        .clamp_min(1)
    )  # torch's Geometric takes no generator
    starts = torch.cumsum(lengths, 0) - lengths
    num_segments = int((starts < ctx).sum())
    seg_of = torch.repeat_interleave(torch.arange(num_segments), lengths[:num_segments])[:ctx]
    topics = torch.randn(num_segments, NUM_KV, DIM, generator=gen)
    scale = torch.exp(0.5 * torch.randn(NUM_KV, DIM, generator=gen))
    offset = torch.zeros(NUM_KV, DIM)
    heavy = torch.randint(0, DIM, (NUM_KV, 4), generator=gen)
    offset.scatter_(1, heavy, 4.0 * torch.randn(NUM_KV, 4, generator=gen).sign())
    noise = torch.randn(ctx, NUM_KV, DIM, generator=gen)
    keys = scale * (offset + 0.8 * topics[seg_of] + 0.6 * noise)  # [T, Hkv, D]
    keys = rope(keys.transpose(0, 1), torch.arange(ctx)).transpose(0, 1)

    picks = torch.randint(0, max(num_segments - 1, 1), (NUM_KV, GROUP_Q, needles), generator=gen)
    heads = torch.arange(NUM_KV).view(-1, 1, 1)
    far = topics[picks, heads].sum(2) / needles**0.5  # [Hkv, G, D]
    now = topics[num_segments - 1].unsqueeze(1)
    q = 0.7 * far + 0.5 * now + 0.5 * torch.randn(NUM_KV, GROUP_Q, DIM, generator=gen)
    q = q * scale.unsqueeze(1) * temperature  # align with the keys' channel scales
    q = rope(q.reshape(1, NUM_KV * GROUP_Q, DIM).transpose(0, 1), torch.tensor([ctx]))
    return keys, q.transpose(0, 1)[0]


def measure(
    ctx: int,
    keys: torch.Tensor,
    query: torch.Tensor,
    top_ks: list[int],
    variants: list[tuple[int, int]],
) -> list[dict]:
    """Overlap and covered mass of each selection, per KV head, for one decode query."""
    max_pages = ctx // PAGE
    paged = keys.view(max_pages, PAGE, NUM_KV, DIM)
    bounds = PageBounds(kmin=paged.amin(1), kmax=paged.amax(1))
    table = torch.arange(max_pages).unsqueeze(0)
    num_pages = torch.tensor([max_pages])
    q = query.unsqueeze(0)  # [1, Hq, D]
    logits = torch.einsum("hgd,thd->hgt", query.view(NUM_KV, GROUP_Q, DIM), keys) * DIM**-0.5
    mass = logits.softmax(-1).view(NUM_KV, GROUP_Q, max_pages, PAGE).sum(-1)  # [Hkv, G, N]
    head_mass = mass.mean(1)
    pages = CompactBounds.from_pages(bounds)
    exact_scores = score_pages(q, bounds, table, num_pages)
    supers = {g: build_super_bounds(bounds, table, num_pages, g) for g, _ in variants}
    rows = []
    for top_k in top_ks:
        exact = select_top_k(exact_scores, top_k, num_pages)
        sets = {
            "exact": exact,
            "oracle": select_top_k(head_mass.unsqueeze(0), top_k, num_pages),
            "int8": flat_select(q, pages, table, num_pages, top_k),
        }
        for g, r in variants:
            m = default_num_super(top_k, g, r)
            sets[f"G{g}/r{r}"] = hier_select(q, pages, supers[g], table, num_pages, top_k, g, m)
        auto = plan_selection(max_pages, top_k)
        sets["auto"] = sets["int8"] if auto is None else sets["G8/r4"]
        exact_mask = page_mask(exact, max_pages)[0]
        for name, ids in sets.items():
            chosen = page_mask(ids, max_pages)[0]  # [Hkv, N]
            overlap = (chosen & exact_mask).sum(-1).float() / exact_mask.sum(-1)
            covered = (mass * chosen.unsqueeze(1)).sum(-1).mean(1)  # [Hkv]
            for h in range(NUM_KV):
                rows.append(
                    {
                        "ctx": ctx,
                        "top_k": top_k,
                        "variant": name,
                        "overlap": overlap[h].item(),
                        "mass": covered[h].item(),
                    }
                )
    return rows


@app.command()
def main(
    contexts: str = typer.Option("8192,32768,131072", help="Comma-separated context lengths."),
    top_ks: str = typer.Option("32,64,128", help="Comma-separated K (pages per head)."),
    variants: str = typer.Option("8/4,8/2,16/4", help="Comma-separated G/r two-level variants."),
    queries: int = typer.Option(4, help="Independent (keys, query) draws per context."),
    segment: int = typer.Option(256, help="Mean topic-segment length in tokens."),
    needles: int = typer.Option(3, help="Far segments each query head retrieves from."),
    temperature: float = typer.Option(1.6, help="Query scale: sets how peaked attention is."),
    seed: int = typer.Option(0, help="Seed of the generator."),
    out_dir: Path = typer.Option(GPU_RESULTS, help="Where JSON and markdown go."),
    name: str = typer.Option("hier_select_long", help="Result file stem."),
) -> None:
    """Overlap with the exact top-K and attention mass covered, per context and variant."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # segment lengths (torch.distributions draws from the global RNG)
    ks = [int(k) for k in top_ks.split(",")]
    pairs = [(int(v.split("/")[0]), int(v.split("/")[1])) for v in variants.split(",")]
    if (8, 4) not in pairs:
        raise typer.BadParameter("the default variant 8/4 must be included (auto uses it)")
    rows: list[dict] = []
    for ctx in (int(c) for c in contexts.split(",")):
        for _ in range(queries):
            keys, query = synthetic_step(ctx, segment, needles, temperature, gen)
            rows += measure(ctx, keys, query, ks, pairs)
        console.print(f"ctx={ctx} done")
    summary = summarize(rows, BY)
    params = {
        "segment": segment,
        "needles": needles,
        "temperature": temperature,
        "queries": queries,
        "seed": seed,
        "num_kv_heads": NUM_KV,
        "group_q": GROUP_Q,
        "head_dim": DIM,
        "page": PAGE,
    }
    report(
        summary,
        BY,
        console=console,
        result={"params": params, "summary": summary},
        out_dir=out_dir,
        name=name,
        title=f"synthetic keys, {queries} queries x {NUM_KV} KV heads per context",
        heading="Two-level int8 page selection at long context: synthetic keys",
        description=(
            "Synthetic keys and queries (not a model's; generator and its parameters in "
            f"`benchmarks/gpu/hier_select_long.py`: {json.dumps(params)}). Llama-8B head shape, "
            "16-token pages. Per KV head and query, averaged (and worst case). `exact`: flat "
            "top-K on fp32 bounds; `int8`: flat top-K on int8 bounds; `Gg/rr`: super-pages of "
            "g pages, top r*K/g kept, top-K of their r*K pages; `auto`: what "
            "`kernels.select_pages` runs at that size; `oracle`: top-K by true attention mass."
        ),
    )


if __name__ == "__main__":
    app()
