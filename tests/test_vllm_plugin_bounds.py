"""Device page bounds (int8 + scale): upper bounds, tightness, selection vs fp32 bounds."""

from __future__ import annotations

import pytest
import torch

from kvhead.core.pages import PageBounds, score_pages, select_top_k
from kvhead.vllm.device_bounds import DeviceBounds
from tests.selection_oracle import CompactSelectionPolicy

P, D, HKV, NB = 16, 32, 3, 64


def _write_token_by_token(
    bounds: DeviceBounds, fp32: PageBounds, keys: torch.Tensor, blocks: torch.Tensor
) -> None:
    """Two sequences decoding in lock-step: one token per sequence per write."""
    for t in range(keys.shape[1]):
        slots = blocks[:, t // P] * P + t % P
        bounds.update(keys[:, t], slots, P)
        fp32.update(keys[:, t], slots, P)


def _setup(open_slots: int, tokens: int = 100, seed: int = 0):
    torch.manual_seed(seed)
    blocks = torch.randperm(NB)[:16].view(2, 8)
    keys = torch.randn(2, tokens, HKV, D) * torch.linspace(0.1, 3, D)
    bounds = DeviceBounds(NB, HKV, D, open_slots)
    fp32 = PageBounds.empty(NB, HKV, D)
    _write_token_by_token(bounds, fp32, keys, blocks)
    return bounds, fp32, keys, blocks


def _boxes(bounds: DeviceBounds, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    kmax, kmin = bounds.boxes(blocks)
    return kmin, kmax


def test_boxes_hold_every_key_and_match_the_exact_box_rounded_once() -> None:
    bounds, fp32, _, blocks = _setup(open_slots=8)
    used = blocks[:, :6].flatten()  # 100 tokens close pages 0..5 (page 6, open, is never ranked)
    lo, hi = _boxes(bounds, used)
    assert bool((lo <= fp32.kmin[used]).all()) and bool((hi >= fp32.kmax[used]).all())
    # with a table entry per open page the box is the exact one rounded once: within one step
    step = bounds.scale[:, used].t().unsqueeze(-1)
    assert bool((fp32.kmin[used] - lo <= step * 1.001).all())
    assert bool((hi - fp32.kmax[used] <= step * 1.001).all())


def test_colliding_open_pages_stay_upper_bounds() -> None:
    bounds, fp32, keys, blocks = _setup(open_slots=1)  # both sequences fight for one entry
    used = blocks[:, :6].flatten()
    lo, hi = _boxes(bounds, used)
    assert bool((lo <= fp32.kmin[used]).all()) and bool((hi >= fp32.kmax[used]).all())
    q = torch.randn(2, HKV, D)
    for b in range(2):
        for page in range(6):
            k = keys[b, page * P : (page + 1) * P]  # [P, Hkv, D]
            true = torch.einsum("hd,thd->ht", q[b], k).amax(-1)
            bound = (
                q[b].clamp_min(0) * hi[b * 6 + page] + q[b].clamp_max(0) * lo[b * 6 + page]
            ).sum(-1)
            assert bool((bound >= true - 1e-4).all())


def test_a_reused_block_starts_afresh() -> None:
    bounds = DeviceBounds(NB, HKV, D, 4)
    slots = torch.arange(5 * P, 6 * P)
    bounds.update(torch.full((P, HKV, D), 100.0), slots, P)  # a whole page: closed, settled
    bounds.update(torch.ones(P, HKV, D), slots, P)  # offset 0 again: a new request's page
    lo, hi = _boxes(bounds, torch.tensor([5]))
    assert float(hi.max()) < 1.1 and float(lo.min()) > 0.9


def test_selection_matches_fp32_bounds_selection() -> None:
    """The int8 top-K picks (nearly) the pages the fp32 bounds pick: measured, 4 heads x 2 seqs."""
    torch.manual_seed(1)
    tokens = 8 * P
    bounds, fp32, _, blocks = _setup(open_slots=8, tokens=tokens, seed=1)
    num_pages = torch.tensor([8, 8])
    agree = total = 0
    for _ in range(20):
        q = torch.randn(2, HKV * 2, D)
        ours = bounds.select(q, blocks, num_pages, top_k=3)
        ref = select_top_k(score_pages(q, fp32, blocks, num_pages), 3, num_pages)
        for b in range(2):
            for h in range(HKV):
                agree += len(set(ours[b, h].tolist()) & set(ref[b, h].tolist()))
                total += 3
    assert agree / total >= 0.95
    heads = torch.tensor([1])
    only = bounds.select(q, blocks, num_pages, top_k=3, heads=heads)
    assert bool((only[:, [0, 2]] == -1).all())
    assert torch.equal(only[:, 1], bounds.select(q, blocks, num_pages, top_k=3)[:, 1])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"sink_pages": 1, "recent_pages": 2},
        {"group_score": "softmax"},
        {"bound_weight": 0.5, "group_score": "softmax", "sink_pages": 1, "recent_pages": 2},
    ],
)
def test_selection_options_score_the_dequantised_boxes_as_fp32_scoring_does(options: dict) -> None:
    """Every flexicache+ option on int8 boxes: the same pages as kvhead.core.pages' fp32 scoring of
    the dequantised boxes, per-head budgets and a subset of heads included."""
    bounds, _, _, blocks = _setup(open_slots=8, tokens=8 * P)
    kmax, kmin = bounds.boxes(torch.arange(NB))
    boxes = PageBounds(kmin=kmin, kmax=kmax)
    num_pages = torch.tensor([8, 6])
    budgets = torch.tensor([3, 5, 4])
    score_opts = {k: v for k, v in options.items() if k in ("group_score", "bound_weight")}
    force_opts = {k: v for k, v in options.items() if k in ("sink_pages", "recent_pages")}
    for seed in range(10):
        q = torch.randn(2, HKV * 2, D, generator=torch.Generator().manual_seed(seed))
        for top_k in (3, budgets):
            ours = bounds.select(q, blocks, num_pages, top_k, **options)
            ref = select_top_k(
                score_pages(q, boxes, blocks, num_pages, **score_opts),
                top_k,
                num_pages,
                **force_opts,
            )
            assert torch.equal(ours, ref)
        heads = torch.tensor([0, 2])
        only = bounds.select(q, blocks, num_pages, budgets, heads, **options)
        assert bool((only[:, 1] == -1).all())
        full = bounds.select(q, blocks, num_pages, budgets, **options)
        width = only.shape[2]  # the subset's largest budget
        assert torch.equal(only[:, heads], full[:, heads, :width])
        assert bool((full[:, heads, width:] == -1).all())


def test_compact_policy_keeps_flexicache_rules() -> None:
    """Scoring is the only step the int8 policy replaces: stable heads keep their set between
    reranks while unstable ones rerank, exactly as in kvhead.core.policy."""
    bounds, _, _, blocks = _setup(open_slots=8)
    unstable = torch.tensor([[True, False, False]])
    args = {
        "mode": "flexicache",
        "num_layers": 1,
        "num_kv_heads": HKV,
        "page_size": P,
        "top_k": 2,
        "rerank_interval": 4,
        "unstable": unstable,
    }
    policy = CompactSelectionPolicy(**args)
    seq_lens = torch.tensor([100, 100])
    selections = [
        policy.select(0, torch.randn(2, 6, D), bounds, blocks, seq_lens) for _ in range(3)
    ]
    assert selections[0].reranked.all()  # the first step ranks every head
    for sel in selections[1:]:  # then only the unstable head, until the next rerank
        assert sel.reranked[:, 0].all() and not sel.reranked[:, 1:].any()
        assert torch.equal(sel.page_ids[:, 1:], selections[0].page_ids[:, 1:])
        assert (sel.resident[:, 0] == 7).all()  # the unstable head keeps all 7 pages
