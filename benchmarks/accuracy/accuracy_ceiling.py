"""How far can page selection go at 8k? The practical selection against an oracle and a noise floor.

On corpus windows of ``kvhead eval`` (same text, same 256-token dense greedy continuation, fp32 on
CPU), every variant is teacher-forced on dense's tokens and scored by agreement and mean KL to
dense, with the same stable heads, page budgets (``--head-budgets`` from the w = 0.5 coverage),
sink / window pages, R and residency as ``flexicache+`` of ``accuracy_compensate.sh``:

* ``practical``: bound weight 0.5 + summary tokens (what ``kvhead eval`` ran);
* ``practical+lag``: the same with ``rerank_lag`` (reranks take effect one step late, as a
  pipelined engine would apply them);
* ``oracle`` / ``oracle+summaries``: each rerank picks the pages with the most true attention
  mass (it reads every key: a ceiling for any page score at this budget, not a method);
* ``dense-bf16``: dense attention with the same weights in bf16: how many of dense fp32's tokens
  are near-ties that any perturbation flips.

Run: ``python benchmarks/accuracy/accuracy_ceiling.py --window 1`` (CPU, ~15 min per window; one
process per window in parallel; ``--variants dense-bf16`` for the floor alone); writes
``benchmarks/results/accuracy/accuracy_ceiling_w{window}.json``
(``accuracy_ceiling_python_docs_w{window}.json`` with ``--corpus python-docs``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import torch
import typer
from transformers import AutoTokenizer

from benchmarks.common import ACCURACY_RESULTS, MODEL, PROFILE
from kvhead.core.budgets import allocate_budgets
from kvhead.core.pages import PAD, page_sums, select_top_k
from kvhead.core.policy import SelectionPolicy
from kvhead.core.stability import HeadProfile
from kvhead.eval.inputs import corpus_window
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.eval.tasks import Prefilled, greedy, prefill, teacher_forced
from kvhead.models import resolve_model

app = typer.Typer(add_completion=False)


class OraclePolicy(SelectionPolicy):
    """Ranks pages by the true attention mass of the current query (mean over the GQA group).

    Budgets, forced pages, reranking and residency are the parent's; only the ranking differs.
    """

    cache: PagedKVCache | None = None

    def _top_k(self, query, bounds, block_table, num_pages, heads):
        total = self.cache.length + 1  # the decode token is written before selection
        keys, _ = self.cache.keys_values(self._layer, total)
        num_kv, dim = keys.shape[1], keys.shape[2]
        q = query[0].float().view(num_kv, -1, dim)
        weights = (torch.einsum("hgd,thd->hgt", q, keys.float()) * dim**-0.5).softmax(-1).mean(1)
        mass = page_sums(weights, self.page_size)
        scores = mass.new_full((1, num_kv, block_table.shape[1]), float("-inf"))
        scores[0, :, : mass.shape[-1]] = mass
        ids = select_top_k(
            scores,
            self.head_top_k[self._layer],
            num_pages,
            sink_pages=self.sink_pages,
            recent_pages=self.recent_pages,
        )
        if heads is not None:
            asked = torch.zeros(num_kv, dtype=torch.bool)
            asked[heads] = True
            ids = ids.masked_fill(~asked.view(1, -1, 1), PAD)
        return ids


def _oracle(
    runner: ReferenceRunner, pre: Prefilled, options: dict, budgets: torch.Tensor, summaries: bool
):
    policy = OraclePolicy(
        mode="flexicache",
        num_layers=runner.num_layers,
        num_kv_heads=runner.spec.num_kv_heads,
        page_size=runner.spec.page_size,
        head_top_k=budgets,
        compensate=summaries,
        **options,
    )
    policy.cache = pre.cache
    return policy


@app.command()
def main(
    window: int = typer.Option(1, help="Corpus window, numbered as kvhead eval numbers them."),
    corpus: str = typer.Option(
        "licenses", help="Corpus the window is cut from (kvhead eval --corpus)."
    ),
    context: int = 8192,
    gen_tokens: int = 256,
    top_k: int = 70,
    rerank_interval: int = 8,
    profile: Annotated[
        Path, typer.Option(help="Profile with coverage ranked at bound weight 0.5.")
    ] = PROFILE,
    variants: str = typer.Option(
        "practical,practical+lag,oracle,oracle+summaries,dense-bf16",
        help="Comma-separated variants.",
    ),
    output: Annotated[Path | None, typer.Option(help="JSON results file.")] = None,
) -> None:
    """Agreement and KL to dense: the practical selection, its lagged form, the oracle, bf16."""
    start = time.perf_counter()
    model_dir = resolve_model(MODEL)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    head_profile = HeadProfile.model_validate_json(profile.read_text())
    unstable = head_profile.unstable_mask(leading_layers=2)
    budgets = allocate_budgets(head_profile.coverage, ~unstable, top_k)
    options = {
        "top_k": top_k,
        "rerank_interval": rerank_interval,
        "unstable": unstable,
        "unstable_dense": True,
        "sink_pages": 1,
        "recent_pages": 4,
        "group_score": "softmax",
    }
    prompt = corpus_window(
        tokenizer,
        context - gen_tokens,
        offset=window * 7919,  # eval's window
        corpus=corpus,
    )

    runner = ReferenceRunner.from_pretrained(model_dir)
    pre = prefill(runner, prompt, gen_tokens)
    dense_logprobs: list[torch.Tensor] = []
    reference = greedy(runner, pre, gen_tokens, runner.policy("dense"), logprobs=dense_logprobs)
    policies = {
        "practical": runner.policy(
            "flexicache", **options, bound_weight=0.5, compensate=True, head_top_k=budgets
        ),
        "practical+lag": runner.policy(
            "flexicache",
            **options,
            bound_weight=0.5,
            compensate=True,
            head_top_k=budgets,
            rerank_lag=True,
        ),
        "oracle": _oracle(runner, pre, options, budgets, summaries=False),
        "oracle+summaries": _oracle(runner, pre, options, budgets, summaries=True),
    }
    result: dict = {
        "window": window,
        "corpus": corpus,
        "context": context,
        "gen_tokens": gen_tokens,
        "top_k": top_k,
        "rerank_interval": rerank_interval,
        "variants": {},
    }

    def score(
        name: str, run: ReferenceRunner, prefilled: Prefilled, policy: SelectionPolicy
    ) -> None:
        forced = teacher_forced(run, prefilled, reference, policy, reference=dense_logprobs)
        row = {
            "agreement": sum(a == r for a, r in zip(forced.argmax, reference)) / gen_tokens,
            "mean_kl": sum(forced.kl) / gen_tokens,
            "resident_fraction": policy.stats.resident_fraction,
        }
        result["variants"][name] = row
        print(window, name, json.dumps(row), flush=True)

    chosen = [v.strip() for v in variants.split(",") if v.strip()]
    unknown = set(chosen) - {*policies, "dense-bf16"}
    if unknown:
        raise typer.BadParameter(f"unknown variants {sorted(unknown)}")
    for name in chosen:
        if name in policies:
            score(name, runner, pre, policies[name])
    if "dense-bf16" in chosen:
        del pre, runner
        bf16 = ReferenceRunner.from_pretrained(model_dir, dtype=torch.bfloat16)
        score("dense-bf16", bf16, prefill(bf16, prompt, gen_tokens), bf16.policy("dense"))
    result["seconds"] = round(time.perf_counter() - start)
    stem = "accuracy_ceiling"
    if corpus != "licenses":
        stem += f"_{corpus.replace('-', '_')}"
    output = output or ACCURACY_RESULTS / f"{stem}_w{window}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=1))
    print(f"wrote {output}")


if __name__ == "__main__":
    app()
