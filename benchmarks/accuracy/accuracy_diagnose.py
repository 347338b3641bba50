"""Why does top-K decoding lose accuracy on SmolLM2? A cheap screen that reuses one dense pass.

Two measurements at one context length (default 8k), both from a shared dense prefill:

1. **Attention mass covered** (``mass``): the reference runner decodes the dense model's greedy
   continuation densely; at every (step, layer) a probe compares page selections by the share
   of the true softmax attention mass (per query head, averaged over the GQA group) that falls in
   the chosen pages: the spec's score (max over the group), with sink/window pages forced,
   per-query-head union, summed per-query-head softmax of the bounds, and the oracle (the K pages
   with the most true mass). Reported per layer, so broad layers show up.
2. **Decode variants** (``variants``): each candidate policy teacher-forces the dense greedy
   continuation (agreement, KL to dense, and the dense top-2 margin at each disagreement, to see
   whether misses are near-ties), teacher-forces held-out corpus text (perplexity ratio), and
   answers passkeys at several depths; with the resident-page fraction beside it.

Run: ``python benchmarks/accuracy/accuracy_diagnose.py --steps 64`` (CPU; ~1 min per variant at
8k); writes ``benchmarks/results/accuracy/accuracy_diagnose.json``.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from transformers import AutoTokenizer

from benchmarks.common import ACCURACY_RESULTS, MODEL
from kvhead.core.pages import PageBounds, page_mask, page_sums, score_pages, select_top_k
from kvhead.core.policy import LayerSelection, SelectionPolicy
from kvhead.eval.inputs import corpus_window, passkey_prompt
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.eval.tasks import greedy, prefill
from kvhead.models import resolve_model
from kvhead.models.profiles import profile_for_model

app = typer.Typer(add_completion=False)
PASSKEY_TOKENS = 8


def _group_scores(query: torch.Tensor, bounds: PageBounds, table: torch.Tensor) -> torch.Tensor:
    """Per-query-head bound scores ``[Hkv, G, N]`` (score_pages before the max over the group)."""
    num_kv = bounds.kmin.shape[1]
    q = query[0].float().view(num_kv, -1, query.shape[-1])
    kmax = bounds.kmax[table[0]].permute(1, 2, 0)  # [Hkv, D, N]
    kmin = bounds.kmin[table[0]].permute(1, 2, 0)
    return q.clamp_min(0) @ kmax + q.clamp_max(0) @ kmin


def _union_select(per_q: torch.Tensor, top_k: int, num_pages: torch.Tensor) -> torch.Tensor:
    """Pages ranked by their best rank in any query head's own ordering (union capped at K)."""
    order = per_q.argsort(dim=-1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
    best = rank.amin(dim=1).float()  # [Hkv, N]
    key = -best + per_q.amax(dim=1) / (per_q.abs().amax() + 1) * 0.5  # ties -> higher score
    return select_top_k(key.unsqueeze(0), top_k, num_pages)


class MassProbe:
    """Dense decoding that measures, per layer, the attention mass each selection would keep."""

    def __init__(self, runner: ReferenceRunner, cache: PagedKVCache, top_k: int) -> None:
        self.dense = runner.policy("dense")
        self.cache, self.spec, self.top_k = cache, runner.spec, top_k
        self.mass: dict[str, torch.Tensor] = {}
        self.count = torch.zeros(runner.num_layers)
        self.sink_mass = torch.zeros(runner.num_layers, runner.spec.num_kv_heads)

    def reset(self) -> None:
        self.dense.reset()

    def select(self, layer, query, bounds, block_table, seq_lens, live=None) -> LayerSelection:
        self._measure(layer, query, bounds, block_table, seq_lens)
        return self.dense.select(layer, query, bounds, block_table, seq_lens, live)

    @torch.no_grad()
    def _measure(self, layer, query, bounds, block_table, seq_lens) -> None:
        spec, total, k = self.spec, int(seq_lens[0]), self.top_k
        num_pages = (seq_lens.long() + spec.page_size - 1) // spec.page_size
        width = int(num_pages[0])
        table = block_table[:, :width]
        keys, _ = self.cache.keys_values(layer, total)
        q = query[0].float().view(spec.num_kv_heads, -1, spec.head_dim)
        weights = (torch.einsum("hgd,thd->hgt", q, keys.float()) * spec.head_dim**-0.5).softmax(-1)
        mass = page_sums(weights, spec.page_size)
        per_q = _group_scores(query, bounds, table)
        scale = spec.head_dim**-0.5
        sets = {
            "max": select_top_k(score_pages(query, bounds, table, num_pages), k, num_pages),
            "max+sink1": select_top_k(per_q.amax(1).unsqueeze(0), k, num_pages, sink_pages=1),
            "max+sink1+win4": select_top_k(
                per_q.amax(1).unsqueeze(0), k, num_pages, sink_pages=1, recent_pages=4
            ),
            "union": _union_select(per_q, k, num_pages),
            "softmax_sum": select_top_k(
                (per_q * scale).softmax(-1).sum(1).unsqueeze(0), k, num_pages
            ),
            "oracle": select_top_k(mass.mean(1).unsqueeze(0), k, num_pages),
        }
        for name, ids in sets.items():
            covered = (mass * page_mask(ids, width)[0].unsqueeze(1)).sum(-1).mean(1)  # [Hkv]
            acc = self.mass.setdefault(name, torch.zeros(len(self.count), spec.num_kv_heads))
            acc[layer] += covered
        self.sink_mass[layer] += mass[:, :, 0].mean(1)
        self.count[layer] += 1

    def summary(self) -> dict:
        n = self.count.clamp_min(1).view(-1, 1)
        out = {
            name: {
                "mean": (m / n).mean().item(),
                "min_head": (m / n).min().item(),
                "per_layer": (m / n).mean(1).tolist(),
            }
            for name, m in self.mass.items()
        }
        out["sink_page_mass_per_layer"] = (self.sink_mass / n).mean(1).tolist()
        return out


def _teacher_forced(runner, pre, targets, policy):
    """Logits (fp32, [T, V]) at each position when feeding ``targets``."""
    pre.cache.rewind(pre.length)
    if policy is not None:
        policy.reset()
    rows = [pre.next_logits]
    for target in targets[:-1]:
        rows.append(runner.forward(pre.cache, torch.tensor([target]), policy=policy)[-1])
    return torch.stack(rows)


def _variants(
    runner: ReferenceRunner, profile, top_k: int, names: list[str]
) -> dict[str, SelectionPolicy]:
    spec_mask = profile.unstable_mask()
    lead2 = profile.unstable_mask(leading_layers=2)
    flexi = {"top_k": top_k, "rerank_interval": 16}
    table = {
        "quest": ("quest", {}),
        "quest+sink1": ("quest", {"sink_pages": 1}),
        "quest+sink1+win4": ("quest", {"sink_pages": 1, "recent_pages": 4}),
        "quest+dense2": ("quest", {"dense_layers": 2}),
        "quest+sink1+win4+dense2": (
            "quest",
            {"sink_pages": 1, "recent_pages": 4, "dense_layers": 2},
        ),
        "flexicache": ("flexicache", {"unstable": spec_mask}),
        "flexi+udense": ("flexicache", {"unstable": spec_mask, "unstable_dense": True}),
        "flexi+udense+lead2": ("flexicache", {"unstable": lead2, "unstable_dense": True}),
        "flexi+udense+lead2+sink1+win4": (
            "flexicache",
            {"unstable": lead2, "unstable_dense": True, "sink_pages": 1, "recent_pages": 4},
        ),
        "flexi+udense+softmax": (
            "flexicache",
            {"unstable": spec_mask, "unstable_dense": True, "group_score": "softmax"},
        ),
        "flexi+udense+lead2+sink1+win4+softmax": (
            "flexicache",
            {
                "unstable": lead2,
                "unstable_dense": True,
                "sink_pages": 1,
                "recent_pages": 4,
                "group_score": "softmax",
            },
        ),
    }
    out = {}
    for name in names:
        mode, kw = table[name]
        extra = flexi if mode == "flexicache" else {"top_k": top_k}
        out[name] = runner.policy(mode, **extra, **kw)
    return out


@app.command()
def main(
    context: int = typer.Option(8192, help="Sequence length (prompt + steps)."),
    steps: int = typer.Option(64, help="Teacher-forced tokens per measurement."),
    top_k: int = typer.Option(64, help="Pages per top-K set."),
    variants: str = typer.Option("quest,flexicache", help="Comma-separated variant names."),
    mass: bool = typer.Option(True, help="Run the attention-mass probe."),
    depths: str = typer.Option("0.1,0.3,0.5,0.7,0.9", help="Passkey depths ('' for none)."),
    output: Annotated[Path, typer.Option(help="JSON results file.")] = ACCURACY_RESULTS
    / "accuracy_diagnose.json",
) -> None:
    """Attention mass per selection rule, and accuracy of decode variants, at one context."""
    start = time.perf_counter()
    model_dir = resolve_model(MODEL)
    runner = ReferenceRunner.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    profile = profile_for_model(model_dir, None)
    result: dict = {"context": context, "steps": steps, "top_k": top_k}
    length = context - steps

    pre = prefill(runner, corpus_window(tokenizer, length, offset=0), steps)
    probe = MassProbe(runner, pre.cache, top_k) if mass else None
    reference = greedy(runner, pre, steps, probe or runner.policy("dense"))
    if probe is not None:
        result["mass"] = probe.summary()
        means = {k: v["mean"] for k, v in result["mass"].items() if "mean" in v}
        print(json.dumps(means), flush=True)
    dense_logits = _teacher_forced(runner, pre, reference, None)
    top2 = dense_logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()

    text = corpus_window(tokenizer, context, offset=context * 3)
    ppl_pre = prefill(runner, text[:length], steps)
    targets = text[length:].tolist()
    idx = torch.arange(steps)
    dense_logits_ppl = _teacher_forced(runner, ppl_pre, targets, None)
    dense_nll = -torch.log_softmax(dense_logits_ppl, -1)[idx, targets]

    depth_list = [float(d) for d in depths.split(",") if d.strip()]
    rng = torch.Generator().manual_seed(context)
    keys = [int(torch.randint(10_000, 100_000, (1,), generator=rng)) for _ in depth_list]
    passkeys = [
        (
            prefill(
                runner, passkey_prompt(tokenizer, context - PASSKEY_TOKENS, d, key), PASSKEY_TOKENS
            ),
            key,
        )
        for d, key in zip(depth_list, keys)
    ]

    def passkey_hits(policy) -> int:
        hits = 0
        for pk_pre, key in passkeys:
            answer = tokenizer.decode(greedy(runner, pk_pre, PASSKEY_TOKENS, policy))
            digits = "".join(ch for ch in answer if ch.isdigit() or ch == " ").split()
            hits += bool(digits) and digits[0] == str(key)
        return hits

    result["dense_passkey"] = passkey_hits(runner.policy("dense")) if passkeys else None
    result["variants"] = {}
    names = [v for v in variants.split(",") if v]
    for name, policy in _variants(runner, profile, top_k, names).items():
        logits = _teacher_forced(runner, pre, reference, policy)
        argmax = logits.argmax(-1).tolist()
        miss = [i for i, (a, r) in enumerate(zip(argmax, reference)) if a != r]
        kl = torch.nn.functional.kl_div(
            torch.log_softmax(logits, -1),
            torch.log_softmax(dense_logits, -1),
            log_target=True,
            reduction="none",
        ).sum(-1)
        ppl_logits = _teacher_forced(runner, ppl_pre, targets, policy)
        nll = -torch.log_softmax(ppl_logits, -1)[idx, targets]
        row = {
            "token_agreement": 1 - len(miss) / steps,
            "mean_kl": kl.mean().item(),
            "miss_dense_margins": [round(margins[i], 3) for i in miss],
            "perplexity_ratio": math.exp((nll - dense_nll).mean().item()),
            "passkey": passkey_hits(policy) / len(passkeys) if passkeys else None,
            "resident_fraction": policy.stats.resident_fraction,
        }
        result["variants"][name] = row
        print(name, json.dumps(row), flush=True)
    result["dense_margin_quantiles"] = (
        torch.tensor(margins).quantile(torch.tensor([0.05, 0.1, 0.25, 0.5])).tolist()
    )
    result["seconds"] = time.perf_counter() - start
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"wrote {output} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    app()
