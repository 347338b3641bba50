"""Can a richer summary token per skipped page buy 8k agreement? A screen on attention outputs.

``flexicache+`` lets every page a stable head skips enter its attention as one token (key: the
page box's centre, value: the page's mean value, logit + log tokens; :mod:`kvhead.core.summaries`).
On the two hardest license windows at 8k an oracle page ranking gets no more agreement than the
practical one, and without summaries even the oracle loses 3-4 tokens per window
(docs/accuracy.md), so the summary's fidelity is the one lever left inside the pages' budget. This
screen decodes dense's greedy continuation densely and, at every (step, layer), compares each
stable head's exact attention output with the sparse output (the w = 0.5 selection, or the
oracle's, at K pages) plus one token per skipped page in these forms:

* ``none``: no summaries; ``centre``: what ``kvhead eval --compensate`` runs;
* ``mean``: the keys' mean instead of the box centre (one more vector per page);
* ``mean+var``: plus the second cumulant ``scale^2 q^2 . var / 2`` in the logit (Gaussian keys),
  capped at the page's Quest bound (two more vectors);
* ``exact-lse+mean``: the page's true log-sum-exp with the mean value (the logit made perfect);
* ``first-order``: value ``mean + scale * C q`` with C the page's value/key cross-covariance, the
  first-order term of the softmax-weighted mean (``D x D`` per page: a bound, not a design),
  and its rank-1 / rank-2 truncations (2 / 4 more vectors per page).

A form with the exact logit and the exact weighted value reproduces dense: that is checked
(``exact``, error 0) so the harness cannot flatter a form.

Run: ``python benchmarks/accuracy/accuracy_summaries.py --windows 1,3`` (CPU, ~2-6 min per 8k
window); writes ``benchmarks/results/accuracy/accuracy_summaries.json``.
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

app = typer.Typer(add_completion=False)
Form = tuple[torch.Tensor, torch.Tensor]  # (logit [H, G, N], value [H, G, N, D]) per page


def _paged(per_token: torch.Tensor, page_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T, H, D]`` -> ``[N, P, H, D]`` zero-padded, and the valid-token mask ``[N, P, 1, 1]``."""
    total = per_token.shape[0]
    pages = -(-total // page_size)
    padded = torch.nn.functional.pad(per_token, (0, 0, 0, 0, 0, pages * page_size - total))
    valid = (torch.arange(pages * page_size) < total).view(pages, page_size, 1, 1)
    return padded.view(pages, page_size, *per_token.shape[1:]), valid


def summary_forms(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    bounds: PageBounds,
    blocks: torch.Tensor,
    page_size: int,
    scale: float,
) -> dict[str, Form]:
    """Every candidate summary token of every page, for queries ``q [H, G, D]``."""
    kp, valid = _paged(keys, page_size)
    vp, _ = _paged(values, page_size)
    count = valid.sum(1).clamp_min(1).float()  # [N, 1, 1]
    kmean, vmean = (kp * valid).sum(1) / count, (vp * valid).sum(1) / count  # [N, H, D]
    dk, dv = (kp - kmean.unsqueeze(1)) * valid, (vp - vmean.unsqueeze(1)) * valid
    kvar = (dk * dk).sum(1) / count
    cross = torch.einsum("nphd,nphe->nhde", dv, dk) / count.unsqueeze(-1)  # [N, H, D, D]
    kmax, kmin = bounds.kmax[blocks].float(), bounds.kmin[blocks].float()
    log_count = count.view(1, 1, -1).log()
    group = q.shape[1]

    def logit(key: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hgd,nhd->hgn", q, key) * scale + log_count

    def per_page(value: torch.Tensor) -> torch.Tensor:  # [N, H, D] -> [H, G, N, D]
        return value.permute(1, 0, 2).unsqueeze(1).expand(-1, group, -1, -1)

    quest = (
        torch.einsum("hgd,nhd->hgn", q.clamp_min(0), kmax)
        + torch.einsum("hgd,nhd->hgn", q.clamp_max(0), kmin)
    ) * scale + log_count
    token_logits = torch.einsum("hgd,nphd->hgnp", q, kp) * scale
    token_logits = token_logits.masked_fill(~valid.view(1, 1, *valid.shape[:2]), float("-inf"))
    page_lse = torch.logsumexp(token_logits, -1)
    weighted = torch.einsum("hgnp,nphd->hgnd", (token_logits - page_lse.unsqueeze(-1)).exp(), vp)
    centre = logit((kmax + kmin) / 2)
    u, s, vh = torch.linalg.svd(cross)
    forms = {
        "centre": (centre, per_page(vmean)),
        "mean": (logit(kmean), per_page(vmean)),
        "mean+var": (
            torch.minimum(
                logit(kmean) + 0.5 * scale**2 * torch.einsum("hgd,nhd->hgn", q * q, kvar), quest
            ),
            per_page(vmean),
        ),
        "exact-lse+mean": (page_lse, per_page(vmean)),
        "first-order": (centre, per_page(vmean) + scale * torch.einsum("nhde,hge->hgnd", cross, q)),
        "exact": (page_lse, weighted),
    }
    for rank in (1, 2):
        low = torch.einsum("nhdr,nhr,nhre->nhde", u[..., :rank], s[..., :rank], vh[..., :rank, :])
        forms[f"first-order-r{rank}"] = (
            centre,
            per_page(vmean) + scale * torch.einsum("nhde,hge->hgnd", low, q),
        )
    return forms


class SummaryProbe(StableHeadProbe):
    """Measures every summary form on the stable heads, under two page rankings."""

    @torch.no_grad()
    def _measure(
        self, layer: int, query: torch.Tensor, bounds: PageBounds, block_table, seq_lens
    ) -> None:
        spec, total = self.spec, int(seq_lens[0])
        num_pages = (seq_lens.long() + spec.page_size - 1) // spec.page_size
        width = int(num_pages[0])
        table = block_table[:, :width]
        keys, values = (t.float() for t in self.cache.keys_values(layer, total))
        scale = spec.head_dim**-0.5
        heads = spec.num_kv_heads
        q = query[0].float().view(heads, -1, spec.head_dim)
        logits = torch.einsum("hgd,thd->hgt", q, keys) * scale
        dense = logits.softmax(-1) @ values.transpose(0, 1)  # [H, G, D]
        forms = summary_forms(q, keys, values, bounds, table[0].long(), spec.page_size, scale)
        rankings = {
            "w50": score_pages(
                query, bounds, table, num_pages, group_score="softmax", bound_weight=0.5
            ),
            "oracle": page_sums(logits.softmax(-1), spec.page_size).mean(1).unsqueeze(0),
        }
        vp, _ = _paged(values, spec.page_size)
        token_values = vp.flatten(0, 1).transpose(0, 1).unsqueeze(1)  # [H, 1, N*P, D]
        paged_logits = torch.nn.functional.pad(
            logits, (0, width * spec.page_size - total), value=float("-inf")
        )
        stable = self.stable[layer]
        for ranking, scores in rankings.items():
            chosen = page_mask(select_top_k(scores, self.top_k, num_pages), width)[0]  # [H, N]
            read = paged_logits.masked_fill(
                ~chosen.repeat_interleave(spec.page_size, -1).unsqueeze(1), float("-inf")
            )
            for name, (page_logit, page_value) in [("none", (None, None)), *forms.items()]:
                out = _attend(read, token_values, page_logit, page_value, chosen)
                err = ((out - dense).norm(dim=-1) / dense.norm(dim=-1)).mean(1)
                self.error.setdefault(f"{ranking}/{name}", []).extend(err[stable].tolist())


def _attend(
    read: torch.Tensor,
    token_values: torch.Tensor,
    page_logit: torch.Tensor | None,
    page_value: torch.Tensor | None,
    chosen: torch.Tensor,
) -> torch.Tensor:
    """Softmax over the read tokens ``[H, G, T]`` plus one summary token per skipped page."""
    if page_logit is None:
        return read.softmax(-1) @ token_values.squeeze(1)
    skipped = page_logit.masked_fill(chosen.unsqueeze(1), float("-inf"))  # [H, G, N]
    weights = torch.cat([read, skipped], -1).softmax(-1)
    tokens = read.shape[-1]
    return weights[..., :tokens] @ token_values.squeeze(1) + torch.einsum(
        "hgn,hgnd->hgd", weights[..., tokens:], page_value
    )


@app.command()
def main(
    context: int = typer.Option(8192, help="Sequence length (prompt + steps)."),
    steps: int = typer.Option(16, help="Dense decode steps measured per window."),
    top_k: int = typer.Option(70, help="Pages per top-K set."),
    windows: str = typer.Option("1,3", help="Corpus windows (as kvhead eval numbers them)."),
    output: Annotated[Path, typer.Option(help="JSON results file.")] = ACCURACY_RESULTS
    / "accuracy_summaries.json",
) -> None:
    """Stable heads' attention-output error per summary form, under two page rankings."""
    screen_windows(
        SummaryProbe,
        lambda probe: {k: mean5(v) for k, v in probe.error.items()},
        context=context,
        steps=steps,
        top_k=top_k,
        windows=windows,
        output=output,
    )


if __name__ == "__main__":
    app()
