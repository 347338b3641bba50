"""RCO, the stability accumulator and head profiles."""

import pytest
import torch

from kvhead.core.stability import HeadProfile, StabilityAccumulator, random_corrected_overlap


def test_rco_bounds():
    assert random_corrected_overlap(torch.tensor(8), 8, torch.tensor(64)).item() == pytest.approx(
        1.0
    )
    chance = torch.tensor(1)  # 8 * 8 / 64 pages shared by chance
    assert random_corrected_overlap(chance, 8, torch.tensor(64)).item() == pytest.approx(0.0)
    assert random_corrected_overlap(torch.tensor(0), 8, torch.tensor(64)).item() == 0.0  # clamped


def _observe_sequence(acc, make_ids, steps, num_pages):
    for step in range(steps):
        acc.observe(0, make_ids(step), num_pages)


def test_identical_sets_have_zero_instability():
    acc = StabilityAccumulator(num_layers=1, num_kv_heads=2, top_k=8, window=4)
    fixed = torch.arange(8).repeat(2, 1)
    _observe_sequence(acc, lambda step: fixed, 16, 128)
    assert acc.instability().tolist() == [[0.0, 0.0]]


def test_random_sets_have_instability_near_one():
    g = torch.Generator().manual_seed(0)
    acc = StabilityAccumulator(num_layers=1, num_kv_heads=3, top_k=8, window=16)
    rand = lambda step: torch.stack([torch.randperm(256, generator=g)[:8] for _ in range(3)])
    _observe_sequence(acc, rand, 160, 256)
    assert torch.all(acc.instability() > 0.9)


def test_half_overlap_sits_between():
    acc = StabilityAccumulator(num_layers=1, num_kv_heads=1, top_k=8, window=2)
    ids = lambda step: torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7]]) + (4 if step % 2 else 0)
    _observe_sequence(acc, ids, 10, 100)
    expected = 1 - (0.5 - 0.08) / (1 - 0.08)
    assert acc.instability().item() == pytest.approx(expected, rel=1e-6)


def test_windows_with_all_pages_selected_are_skipped():
    acc = StabilityAccumulator(num_layers=1, num_kv_heads=1, top_k=8, window=4)
    _observe_sequence(acc, lambda step: torch.arange(6).view(1, -1), 8, 6)
    assert torch.isnan(acc.instability()).all()


def _profile(scores, **kw):
    meta = {"model_fingerprint": "abc", "page_size": 16, "top_k": 64, "window": 16}
    return HeadProfile.from_scores(torch.tensor(scores), **meta, **kw)


def test_profile_ranks_and_rounds_down():
    p = _profile([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]], fraction=0.25)
    assert p.unstable == [(0, 1)]  # int(0.25 * 6) = 1
    assert p.unstable_mask().tolist() == [[False, True, False], [False, False, False]]
    p = _profile([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]], fraction=0.34, per_layer=True)
    assert sorted(p.unstable) == [(0, 1), (1, 0)]


def test_profile_json_round_trip(tmp_path):
    p = _profile([[0.1, float("nan")], [0.3, 0.2]], fraction=0.5)
    assert p.unstable[0] == (0, 1)  # never-measured heads count as unstable
    loaded = HeadProfile.load(p.save(tmp_path / "p.json"))
    assert loaded.unstable == p.unstable and loaded.model_fingerprint == "abc"


def test_profile_rejects_bad_shapes_and_fractions():
    with pytest.raises(ValueError):
        _profile([[0.1, 0.2]], fraction=1.5)
    with pytest.raises(ValueError):
        HeadProfile(
            model_fingerprint="x",
            num_layers=2,
            num_kv_heads=2,
            page_size=16,
            top_k=4,
            window=4,
            instability=[[0.0, 0.0]],
            unstable_fraction=0.0,
            unstable=[],
        )
