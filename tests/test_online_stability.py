"""Online stability from consecutive reranks and the drift guard (kvhead.core.online)."""

from __future__ import annotations

import math

import torch

from kvhead.core.online import DriftGuard, OnlineStability


def _sets(rows: list[list[list[int]]], width: int) -> torch.Tensor:
    """[B, S, width] page ids padded with -1."""
    out = torch.full((len(rows), len(rows[0]), width), -1, dtype=torch.long)
    for b, heads in enumerate(rows):
        for s, ids in enumerate(heads):
            out[b, s, : len(ids)] = torch.tensor(ids)
    return out


def test_identical_sets_score_one_and_disjoint_sets_zero() -> None:
    online = OnlineStability(torch.tensor([0.9, 0.9], dtype=torch.float64))
    previous = _sets([[[0, 1, 2, 3], [0, 1, 2, 3]]], 4)
    current = _sets([[[0, 1, 2, 3], [4, 5, 6, 7]]], 4)
    online.observe(previous, current, torch.tensor([16]), torch.tensor([4, 4]))
    assert online.observations.tolist() == [1, 1]
    assert online.rco_sum[0].item() == 1.0
    assert online.rco_sum[1].item() == 0.0  # below chance clamps at 0
    assert online.instability().tolist() == [0.0, 1.0]


def test_partial_overlap_is_corrected_for_chance() -> None:
    online = OnlineStability(torch.tensor([0.5], dtype=torch.float64))
    previous = _sets([[[0, 1, 2, 3]]], 4)
    current = _sets([[[0, 1, 6, 7]]], 4)
    online.observe(previous, current, torch.tensor([8]), torch.tensor([4]))
    # o/K = 0.5, K/N = 0.5: no better than chance
    assert online.rco_sum.item() == 0.0
    online.observe(previous, current, torch.tensor([16]), torch.tensor([4]))
    # o/K = 0.5, K/N = 0.25 -> (0.5 - 0.25) / 0.75
    assert math.isclose(online.rco_sum.item(), 1 / 3, rel_tol=1e-6)


def test_sets_that_hold_every_page_or_have_no_past_are_skipped() -> None:
    online = OnlineStability(torch.tensor([0.9, 0.9], dtype=torch.float64))
    previous = _sets([[[0, 1, 2, 3], []]], 4)
    current = _sets([[[0, 1, 2, 3], [0, 1, 2, 3]]], 4)
    online.observe(previous, current, torch.tensor([4]), torch.tensor([4, 4]))  # K = N
    assert online.observations.tolist() == [0, 0]
    online.observe(previous, current, torch.tensor([12]), torch.tensor([4, 4]))
    assert online.observations.tolist() == [1, 0]  # head 1 had no previous set
    assert math.isnan(online.instability()[1].item())


def _drive(online: OnlineStability, steps: int, same: bool) -> list[int]:
    """``steps`` reranks of one row, each either repeating or replacing the set; returns the
    reranks at which a head became drifted."""
    fired = []
    for step in range(steps):
        previous = _sets([[[0, 1, 2, 3]]], 4)
        current = previous if same else _sets([[[10, 11, 12, 13]]], 4)
        if bool(online.observe(previous, current, torch.tensor([64]), torch.tensor([4])).any()):
            fired.append(step)
    return fired


def test_drift_guard_fires_once_after_patience_and_recovers() -> None:
    guard = DriftGuard(margin=0.3, patience=5, alpha=0.5, warmup=3)
    online = OnlineStability(torch.tensor([0.95], dtype=torch.float64), guard)
    assert _drive(online, 10, same=True) == []
    fired = _drive(online, 10, same=False)
    # EMA 1 -> 0.5 (low from the first rerank), low for 5 reranks -> fires at the 5th, once
    assert fired == [4]
    assert bool(online.drifted[0]) and online.drift_events.item() == 1
    assert _drive(online, 10, same=True) == []
    assert not bool(online.drifted[0])  # back inside margin / 2: cleared
    assert _drive(online, 10, same=False) == [4]
    assert online.drift_events.item() == 2


def test_drift_guard_waits_for_warmup_and_ignores_unprofiled_heads() -> None:
    guard = DriftGuard(margin=0.3, patience=2, alpha=1.0, warmup=8)
    online = OnlineStability(torch.tensor([0.95], dtype=torch.float64), guard)
    assert _drive(online, 7, same=False) == []  # low all along, but only 7 reranks seen
    assert _drive(online, 1, same=False) == [0]
    unknown = OnlineStability(torch.tensor([float("nan")], dtype=torch.float64), guard)
    assert _drive(unknown, 20, same=False) == []
    assert unknown.observations.item() == 20  # still measured
