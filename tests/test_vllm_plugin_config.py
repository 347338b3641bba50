"""FlexiCache settings, start-up checks, head split and plugin registration (no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvhead.core.budgets import PageCoverage
from kvhead.core.stability import HeadProfile, model_fingerprint
from kvhead.models.tiny import build_tiny_llama
from kvhead.vllm import BACKEND_PATH, register
from kvhead.vllm.config import (
    FlexiCacheConfigError,
    HeadSplit,
    check_arena,
    check_model,
    settings_from_additional_config,
    stable_budgets,
)
from kvhead.vllm.kv_spec import per_layer_specs


def _profile(
    model_dir: Path, path: Path, scores: list[list[float]], *, per_layer: bool, fraction: float
) -> Path:
    return HeadProfile.from_scores(
        torch.tensor(scores),
        fraction=fraction,
        per_layer=per_layer,
        model_fingerprint=model_fingerprint(model_dir),
        page_size=16,
        top_k=4,
        window=4,
    ).save(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny") / "m",
        num_layers=2,
        num_q_heads=8,
        num_kv_heads=4,
        head_dim=32,
    )


def _check(profile: Path, model_dir: Path, **overrides) -> HeadProfile:
    settings = settings_from_additional_config({"kvhead": {"profile": str(profile), **overrides}})
    args = {"num_layers": 2, "num_kv_heads": 4, "block_size": 16, "prefix_caching": False}
    return check_model(settings, model_dir, **args)


def test_presets_and_invalid_settings() -> None:
    """No settings are the default preset; a preset's values yield to the keys beside it; a
    profile without a preset is taken as given; an unknown preset or a bad value is refused."""
    default = settings_from_additional_config({})
    assert default == settings_from_additional_config({"kvhead": {"preset": "accurate"}})
    assert (default.top_k, default.unstable_heads, default.compensate) == (129, 11, True)
    assert default.profile is None and default.host_arena_gib is None  # both derived
    paper = settings_from_additional_config({"kvhead": {"preset": "paper", "top_k": 32}})
    assert (paper.top_k, paper.rerank_interval, paper.compensate) == (32, 16, False)
    given = settings_from_additional_config({"kvhead": {"profile": "p.json", "top_k": 8}})
    assert (given.top_k, given.rerank_interval, given.unstable_dense) == (8, 16, False)
    with pytest.raises(FlexiCacheConfigError, match="unknown preset 'fast'"):
        settings_from_additional_config({"kvhead": {"preset": "fast"}})
    with pytest.raises(FlexiCacheConfigError, match="top_k: Input should be greater than 0"):
        settings_from_additional_config({"kvhead": {"profile": "p.json", "top_k": 0}})
    with pytest.raises(FlexiCacheConfigError, match="rerank_interval"):
        settings_from_additional_config({"kvhead": {"profile": "p.json", "rerank_interval": -1}})


def test_profile_checks(model_dir: Path, tmp_path: Path) -> None:
    scores = [[0.9, 0.1, 0.2, 0.3], [0.1, 0.8, 0.2, 0.3]]
    good = _profile(model_dir, tmp_path / "good.json", scores, per_layer=True, fraction=0.25)
    assert _check(good, model_dir).unstable == [(0, 0), (1, 1)]
    with pytest.raises(FlexiCacheConfigError, match="not found"):
        _check(tmp_path / "missing.json", model_dir)
    other = build_tiny_llama(
        tmp_path / "other", num_layers=2, num_q_heads=8, num_kv_heads=4, head_dim=32, hidden=128
    )
    with pytest.raises(FlexiCacheConfigError, match="taken on another model"):
        _check(
            _profile(other, tmp_path / "other.json", scores, per_layer=True, fraction=0.25),
            model_dir,
        )
    with pytest.raises(FlexiCacheConfigError, match="--block-size 32"):
        _check(good, model_dir, page_size=32)
    settings = settings_from_additional_config({"kvhead": {"profile": str(good)}})
    with pytest.raises(FlexiCacheConfigError, match="--no-enable-prefix-caching"):
        check_model(
            settings, model_dir, num_layers=2, num_kv_heads=4, block_size=16, prefix_caching=True
        )
    with pytest.raises(FlexiCacheConfigError, match="2 layers x 4 kv heads, the model has 3 x 4"):
        check_model(
            settings, model_dir, num_layers=3, num_kv_heads=4, block_size=16, prefix_caching=False
        )


def test_arena_is_derived_or_refused_when_too_small() -> None:
    derived = settings_from_additional_config({"kvhead": {"profile": "p.json"}})
    assert check_arena(derived, 12345, 4096) == 12345
    settings = settings_from_additional_config(
        {"kvhead": {"profile": "p.json", "host_arena_gib": 1 / 1024}}
    )
    assert check_arena(settings, 256, 4096) == 256  # exactly 1 MiB of 4 KiB pages fits
    with pytest.raises(FlexiCacheConfigError, match="holds 256 stable-head pages.*needs 257"):
        check_arena(settings, 257, 4096)


def test_head_split_keeps_exactly_the_unstable_heads_per_layer(
    model_dir: Path, tmp_path: Path
) -> None:
    scores = [[0.9, 0.8, 0.1, 0.3], [0.1, 0.2, 0.05, 0.7]]
    profile = HeadProfile.load(
        _profile(model_dir, tmp_path / "g.json", scores, per_layer=False, fraction=0.375)
    )
    split = HeadSplit.from_profile(profile)  # unstable: (0,0) (0,1) (1,3)
    assert [split.resident(i).tolist() for i in range(2)] == [[0, 1], [3]]
    assert [split.stable(i).tolist() for i in range(2)] == [[2, 3], [0, 1, 2]]
    assert split.resident_per_layer == [2, 1] and split.num_stable == 5
    capped = HeadSplit.from_profile(profile, cap=1)  # layer 0 demotes its less unstable head 1
    assert [capped.resident(i).tolist() for i in range(2)] == [[0], [3]]
    fewer = HeadSplit.from_profile(profile, count=2)  # unstable_heads: the two most unstable stay
    assert [fewer.resident(i).tolist() for i in range(2)] == [[0, 1], []]
    with pytest.raises(FlexiCacheConfigError, match="unstable_heads: .*got 4"):
        HeadSplit.from_profile(profile, count=4)
    everything = HeadProfile.load(
        _profile(model_dir, tmp_path / "all.json", scores, per_layer=True, fraction=1.0)
    )
    with pytest.raises(FlexiCacheConfigError, match="no stable head"):
        HeadSplit.from_profile(everything)
    with pytest.raises(FlexiCacheConfigError, match="no unstable head"):
        HeadSplit.from_profile(profile, cap=0)


def test_layers_without_resident_heads_share_another_layers_cache() -> None:
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    split = HeadSplit(torch.tensor([[False, False], [True, False], [True, True]]))
    spec = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=32, dtype=torch.float32)
    names = [f"model.layers.{i}.self_attn.attn" for i in range(3)]
    layers = {n: type("Layer", (), {"kv_sharing_target_layer_name": None})() for n in names}
    shared: dict[str, str] = {}
    out = per_layer_specs(dict.fromkeys(names, spec), split, shared, layers)
    assert list(out) == names[1:]
    assert [s.num_kv_heads for s in out.values()] == [1, 2]
    assert shared == {names[0]: names[1]}
    assert layers[names[0]].kv_sharing_target_layer_name == names[1]
    # one KV-cache group whose block holds exactly the resident heads of every layer
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs

    group = UniformTypeKVCacheSpecs.from_specs(out)
    assert group is not None and group.page_size_bytes == 3 * spec.page_size_bytes // 2


def test_register_points_custom_at_flexicache_and_keeps_stock_cpu_choice() -> None:
    from vllm.platforms import current_platform
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    register()
    register()  # vLLM may call it more than once per process
    assert AttentionBackendEnum.CUSTOM.get_path() == BACKEND_PATH
    selector = type(current_platform).get_attn_backend_cls
    config = _selector_config()
    assert selector(AttentionBackendEnum.CUSTOM, config) == BACKEND_PATH
    assert selector(None, config) == AttentionBackendEnum.CPU_ATTN.get_path()


def _selector_config():
    from vllm.v1.attention.selector import AttentionSelectorConfig

    return AttentionSelectorConfig(
        head_size=64, dtype=torch.bfloat16, kv_cache_dtype="auto", block_size=16
    )


def test_flexicache_plus_settings_and_their_refusals() -> None:
    plus = {
        "profile": "p.json",
        "top_k": 70,
        "rerank_interval": 8,
        "unstable_dense": True,
        "leading_layers": 2,
        "sink_pages": 1,
        "recent_pages": 4,
        "group_score": "softmax",
        "bound_weight": 0.5,
        "head_budgets": True,
    }
    got = settings_from_additional_config({"kvhead": plus})
    assert (got.group_score, got.bound_weight, got.recent_pages) == ("softmax", 0.5, 4)
    for bad, message in (
        ({"unstable_dense": False}, "need unstable_dense"),
        ({"rerank_lag": True}, "applies reranks at once"),
        ({"dense_heads": "coverage"}, "dense_heads must be 'profile'"),
        ({"top_k": 4}, r"must fit in top_k \(4\)"),
        ({"group_score": "mean"}, "group_score"),
        ({"bound_weight": 1.5}, "bound_weight"),
        ({"unstable_heads": -1}, "unstable_heads"),
    ):
        with pytest.raises(FlexiCacheConfigError, match=message):
            settings_from_additional_config({"kvhead": plus | bad})


def test_leading_layers_stay_in_vllms_cache_and_budgets_need_matching_coverage(
    model_dir: Path, tmp_path: Path
) -> None:
    scores = [[0.9, 0.8, 0.1, 0.3], [0.1, 0.2, 0.05, 0.7]]
    profile = HeadProfile.load(
        _profile(model_dir, tmp_path / "g.json", scores, per_layer=False, fraction=0.375)
    )
    lead = HeadSplit.from_profile(profile, leading_layers=1)  # layer 0 whole, in the same 3 + 1
    assert [lead.resident(i).tolist() for i in range(2)] == [[0, 1, 2, 3], []]
    with pytest.raises(FlexiCacheConfigError, match="cannot keep the 4 kv heads"):
        HeadSplit.from_profile(profile, cap=2, leading_layers=1)
    with pytest.raises(FlexiCacheConfigError, match="leading_layers must be in"):
        HeadSplit.from_profile(profile, leading_layers=3)

    split = HeadSplit.from_profile(profile)  # stable: (0,2) (0,3) (1,0) (1,1) (1,2)
    settings = settings_from_additional_config(
        {"kvhead": {"profile": "p.json", "top_k": 16, "unstable_dense": True, "head_budgets": True}}
    )
    with pytest.raises(FlexiCacheConfigError, match="head_budgets: .*coverage"):
        stable_budgets(settings, profile, split)
    # coverage: heads of layer 1 gain most from more pages, layer 0's are covered at 8
    grid = [8, 16, 24, 32]
    broad, narrow = [0.4, 0.6, 0.8, 0.95], [0.99, 1.0, 1.0, 1.0]
    profile.coverage = PageCoverage(
        context=512,
        offsets=[0],
        steps=4,
        group_score="max",
        sink_pages=0,
        recent_pages=1,
        pages=grid,
        mass=[[narrow] * 4, [broad] * 4],
    )
    budgets = stable_budgets(settings, profile, split)
    stable = ~split.resident_mask
    assert int(budgets[stable].sum()) == 5 * 16  # the stable heads' pool, reshared
    assert budgets[0, 2] < 16 < budgets[1, 0]
    wrong = settings.model_copy(update={"group_score": "softmax"})
    with pytest.raises(FlexiCacheConfigError, match="ranked with group_score=max"):
        stable_budgets(wrong, profile, split)
