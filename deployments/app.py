"""The Ray Serve application: vLLM replicas with the kvhead plugin behind the OpenAI ingress.

Built from ``ray.serve.llm`` alone (``LLMConfig``, ``LLMServer``, the OpenAI ingress); kvhead adds
its settings to vLLM's engine arguments and its routes to the ingress. Run it with
``kvhead serve config.yaml`` or Ray's own ``serve run deployments.app:build config=config.yaml``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.deployment import Application
from ray.serve.llm import LLMConfig
from ray.serve.llm.deployment import LLMServer

from deployments.config import ServeConfig
from deployments.ingress import ingress_class
from kvhead.vllm.preflight import EnginePlan
from kvstore.metrics import METRICS_DIR_ENV

# Replica processes must not be niced (they starve beside any load) and the plugin's native
# kernels are built before Ray starts (kvhead.cli.serve), so no request waits for a compiler.
REPLICA_ENV = {"RAY_worker_niceness": "0"}


def engine_kwargs(config: ServeConfig, model_dir: Path, plan: EnginePlan) -> dict[str, Any]:
    """vLLM's engine arguments: the same for stock and kvhead apart from the plugin's two."""
    kwargs: dict[str, Any] = {
        "dtype": config.dtype,
        "block_size": config.block_size,
        "max_model_len": plan.max_model_len,
        "max_num_seqs": config.max_num_seqs,
        "kv_cache_memory_bytes": config.kv_cache_bytes,
        "enable_prefix_caching": False,
        "enforce_eager": True,
        "tokenizer": str(model_dir),
    }
    if config.kvhead_settings is not None:
        kwargs["attention_backend"] = "CUSTOM"
        kwargs["additional_config"] = {"kvhead": config.kvhead_settings}
    if config.kv_connector is not None:
        kwargs["kv_transfer_config"] = config.kv_connector.transfer_config()
    return kwargs


def llm_config(config: ServeConfig, model_dir: Path, plan: EnginePlan) -> LLMConfig:
    replicas = config.replicas
    return LLMConfig(
        model_loading_config={
            "model_id": config.served_model_id(model_dir),
            "model_source": str(model_dir),
        },
        engine_kwargs=engine_kwargs(config, model_dir, plan),
        accelerator_config={"kind": config.accelerator},
        runtime_env={"env_vars": REPLICA_ENV | {METRICS_DIR_ENV: config.metrics_dir}},
        deployment_config={
            "autoscaling_config": {
                "min_replicas": replicas.min_replicas,
                "max_replicas": replicas.max_replicas,
                "target_ongoing_requests": replicas.target_ongoing_requests,
            },
            "max_ongoing_requests": replicas.max_ongoing_requests,
            "max_queued_requests": replicas.max_queued_requests,
        },
    )


def build_app(
    config: ServeConfig, model_dir: Path | None = None, plan: EnginePlan | None = None
) -> Application:
    """Build the application from ``config``, checking it first (every replica refusal happens
    here) unless the caller passes the resolved model folder and the plan it already checked."""
    from ray.llm._internal.serve.core.configs.openai_api_models import to_model_metadata

    if model_dir is None or plan is None:
        model_dir = config.model_dir()
        plan = config.check(model_dir)
    llm = llm_config(config, model_dir, plan)
    server = serve.deployment(LLMServer).options(**LLMServer.get_deployment_options(llm)).bind(llm)
    # The ingress only forwards; at 0 CPUs it never competes with the replicas for a core
    # (on a 2-core machine a CPU-holding ingress deadlocks the replica's placement group).
    replicas = config.replicas
    ingress = serve.deployment(ingress_class()).options(
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=4 * replicas.max_replicas * replicas.max_ongoing_requests,
    )
    return ingress.bind(
        llm_deployments={llm.model_id: server},
        model_cards={llm.model_id: to_model_metadata(llm.model_id, llm)},
        kvhead={llm.model_id: config.kvhead_settings},
    )


def build(args: dict[str, str]) -> Application:
    """Ray's application-builder entry: ``serve run deployments.app:build config=FILE``."""
    path = args.get("config")
    config = ServeConfig.load(path) if path else ServeConfig()
    return build_app(config)
