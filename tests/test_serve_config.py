"""The serving config: every mistake is one clear message before Ray starts anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from deployments.config import ServeConfig, ServeConfigError
from kvhead.models.resolve import resolve_model

SMOLLM = "smollm2-135m-instruct"


def _load(tmp_path: Path, text: str) -> ServeConfig:
    path = tmp_path / "serve.yaml"
    path.write_text(text)
    return ServeConfig.load(path)


def test_defaults_are_the_embedded_model_with_the_accurate_preset() -> None:
    config = ServeConfig()
    assert (config.model, config.preset, config.flexicache) == (SMOLLM, "accurate", True)
    assert config.kvhead_settings == {"preset": "accurate"}
    assert config.replicas.min_replicas == 1 and config.host == "127.0.0.1"


def test_a_file_sets_preset_overrides_and_replicas(tmp_path: Path) -> None:
    config = _load(
        tmp_path,
        "preset: paper\noverrides: {top_k: 32}\nreplicas: {max_replicas: 3}\nport: 9000\n",
    )
    assert config.kvhead_settings == {"preset": "paper", "top_k": 32}
    assert (config.replicas.max_replicas, config.port) == (3, 9000)
    assert ServeConfig.parse({"flexicache": False}).kvhead_settings is None


def _plan():
    from kvhead.vllm.preflight import EnginePlan

    return EnginePlan(8192, 1000, 16, 40, 50, 0)


def test_a_shared_redis_selects_the_kvhead_connector(tmp_path: Path) -> None:
    from deployments.app import engine_kwargs

    config = _load(tmp_path, "kv_connector: {redis: {url: 'redis://10.0.0.5:6379/0'}}\n")
    transfer = engine_kwargs(config, tmp_path, _plan())["kv_transfer_config"]
    assert transfer["kv_connector"] == "KVHeadConnector"
    assert transfer["kv_load_failure_policy"] == "recompute"
    assert transfer["kv_connector_extra_config"] == {"redis": {"url": "redis://10.0.0.5:6379/0"}}
    assert "kv_transfer_config" not in engine_kwargs(ServeConfig(), tmp_path, _plan())


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("presett: paper\n", "presett: Extra inputs are not permitted"),
        ("preset: fast\n", "unknown preset 'fast'"),
        ("overrides: {top_kk: 3}\n", "unknown kvhead settings in overrides: top_kk"),
        ("replicas: {min_replicas: 3, max_replicas: 2}\n", "max_replicas (2) is below"),
        ("port: 70000\n", "port: Input should be less than or equal to 65535"),
        ("kv_cache_gib: -1\n", "kv_cache_gib: Input should be greater than 0"),
        ("dtype: int8\n", "dtype: Input should be"),
        ("- a\n- b\n", "must hold a mapping"),
        ("port: [1\n", "is not valid YAML"),
        ("kv_connector: {redis: {url: 'http://x'}}\n", "redis url must start with redis://"),
        ("kv_connector: {min_match_tokens: 0}\n", "min_match_tokens: Input should be greater"),
        ("flexicache: false\nkv_connector: {}\n", "it needs flexicache: true"),
    ],
)
def test_bad_fields_are_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ServeConfigError) as err:
        _load(tmp_path, text)
    assert message in str(err.value)


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ServeConfigError, match="cannot read .*nope.yaml"):
        ServeConfig.load(tmp_path / "nope.yaml")


@pytest.fixture(scope="module")
def smollm() -> Path:
    return resolve_model(SMOLLM)


def test_check_plans_the_replica_with_the_plugins_own_numbers(smollm: Path) -> None:
    plan = ServeConfig(kv_cache_gib=1.0).check(smollm)
    assert (plan.max_model_len, plan.dense_heads, plan.stable_heads) == (8192, 11, 79)
    # 79 of 90 heads leave vLLM's cache, so one GiB buys about twice stock's blocks
    stock = ServeConfig(kv_cache_gib=1.0, flexicache=False, block_size=32).check(smollm)
    assert stock.host_arena_bytes == 0
    assert 1.8 < plan.cached_tokens / stock.cached_tokens < 2.2
    # the derived host arena holds every stable page of those blocks
    assert plan.host_arena_bytes == plan.num_blocks * 79 * 16 * 64 * 2 * 2


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_model_len": 9000}, "beyond the model's context of 8192 tokens"),
        ({"overrides": {"host_arena_gib": 0.01}}, "host arena of 0.01 GiB holds"),
        ({"kv_cache_gib": 0.001}, "cannot hold kvhead's device memory"),
        (
            {"kv_cache_gib": 0.05, "flexicache": False, "block_size": 32},
            "fewer than one request of max_model_len",
        ),
        ({"flexicache": False}, "stock vLLM's CPU attention needs a multiple of 32"),
        ({"overrides": {"top_k": 0}}, "top_k: Input should be greater than 0"),
        ({"overrides": {"page_size": 32}}, "differs from vLLM's block size 16"),
    ],
)
def test_what_a_replica_would_refuse_is_refused_before_start(
    smollm: Path, fields: dict, message: str
) -> None:
    with pytest.raises(ServeConfigError) as err:
        ServeConfig.parse(fields).check(smollm)
    assert message in str(err.value)


def test_a_profile_of_another_model_is_refused(smollm: Path, tmp_path: Path) -> None:
    import torch

    from kvhead.core.stability import HeadProfile

    other = HeadProfile.from_scores(
        torch.rand(30, 3, generator=torch.Generator().manual_seed(0)),
        fraction=0.25,
        per_layer=True,
        model_fingerprint="another-model",
        page_size=16,
        top_k=64,
        window=16,
    ).save(tmp_path / "other.json")
    with pytest.raises(ServeConfigError, match="taken on another model"):
        ServeConfig.parse({"overrides": {"profile": str(other)}}).check(smollm)


def test_cli_refuses_a_bad_config_without_starting_anything(tmp_path: Path) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("max_model_len: 100000\n")
    proc = subprocess.run(
        [sys.executable, "-m", "kvhead.cli", "serve", str(path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "beyond the model's context of 8192 tokens" in proc.stdout
    assert "Started a local Ray" not in proc.stdout + proc.stderr


def test_a_model_without_a_profile_is_calibrated_on_first_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any Llama-family folder serves: the first start profiles its heads (with the coverage
    curves budgets need) into KVHEAD_HOME; the second finds that profile."""
    from deployments.local import ensure_profile
    from kvhead.models.tiny import build_tiny_llama

    monkeypatch.setenv("KVHEAD_HOME", str(tmp_path / "home"))
    tiny = build_tiny_llama(tmp_path / "tiny", num_layers=4, num_kv_heads=2)
    config = ServeConfig.parse({"model": str(tiny), "preset": "balanced"})
    with pytest.raises(ServeConfigError, match="profile"):
        config.check(tiny)
    stages: list[str] = []
    made = ensure_profile(config, tiny, stages.append)
    assert made is not None and made.parent == tmp_path / "home" / "profiles"
    assert any("profiling" in s for s in stages) and any("coverage" in s for s in stages)
    plan = config.check(tiny)  # balanced: head budgets from the new coverage curves
    assert plan.dense_heads + plan.stable_heads == 8
    assert ensure_profile(config, tiny) is None


def test_rays_own_cli_builds_the_same_app_from_the_file(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """``serve run deployments.app:build config=FILE`` calls this builder, and a bad file stops
    it with the same message. Ray Serve LLM's deployment options read the runtime context,
    which starts a local Ray when none runs: stopped here, so it does not outlive the test."""
    import ray

    from deployments.app import build

    request.addfinalizer(ray.shutdown)
    path = tmp_path / "serve.yaml"
    path.write_text("model_id: tiny-chat\npreset: paper\nreplicas: {max_replicas: 2}\n")
    app = build({"config": str(path)})
    ingress = app._bound_deployment
    assert ingress.name == "KvheadIngress"
    assert ingress.ray_actor_options["num_cpus"] == 0
    server = ingress.init_kwargs["llm_deployments"]["tiny-chat"]._bound_deployment
    llm = server.init_args[0]
    assert llm.engine_kwargs["attention_backend"] == "CUSTOM"
    assert llm.engine_kwargs["additional_config"] == {"kvhead": {"preset": "paper"}}
    assert llm.deployment_config["autoscaling_config"]["max_replicas"] == 2
    path.write_text("max_model_len: 100000\n")
    with pytest.raises(ServeConfigError, match="beyond the model's context"):
        build({"config": str(path)})
