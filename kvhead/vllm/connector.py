"""The kvhead KV connector: prompts served by one replica skip prefill on every other.

Selected with vLLM's own option (the plugin registers the name)::

    --kv-transfer-config '{"kv_connector": "KVHeadConnector", "kv_role": "kv_both",
                           "kv_connector_extra_config": {"redis": {"url": "redis://host:6379/0"}}}'

Keys are the kvstore's content addresses: page i of a prompt is named by the chained hash of its
first ``(i + 1) * page`` tokens, per layer and KV head
(``{fingerprint}:{hash}:{layer}:{head}:{page}``), plus one *chain marker* per page that says all
of its layers and heads were stored. The scheduler asks Redis for the markers of a new prompt
(one ``MGET``) and claims the leading run; the worker fetches those pages on a thread and writes
them through FlexiCache's own write path (dense heads into vLLM's cache, stable heads into the
host arena, with their page bounds and summaries), then vLLM prefills only the rest. When a
prompt's prefill completes, its pages beyond the loaded ones are copied out and written behind.

Loads are asynchronous in vLLM's sense (the request waits in ``WAITING_FOR_REMOTE_KVS`` while
other requests keep decoding) because that is also vLLM's only recovery path that works with
several KV cache groups, which FlexiCache layouts usually have: a load that finds any page
missing, corrupt or from another model reports the request as failed, and vLLM recomputes it
from its first token (the connector sets ``kv_load_failure_policy`` to ``recompute``). A prompt
whose load failed is not offered a load again; its prefill re-saves (repairs) its pages.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
)
from vllm.model_executor.models.utils import extract_layer_index

from kvhead.core.spec import HeadPageSpec
from kvhead.core.stability import model_fingerprint
from kvhead.vllm.config import ConnectorSettings
from kvhead.vllm.prefix_io import PrefixJob, PrefixMover
from kvhead.vllm.runtime import current
from kvstore.prefix import prefix_hashes
from kvstore.redis_tier import RedisTier

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = logging.getLogger(__name__)


def settings_from_vllm(vllm_config: VllmConfig) -> ConnectorSettings:
    extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
    return ConnectorSettings.model_validate(extra)


def fingerprint(model_dir: str, dtype: torch.dtype, page_size: int) -> str:
    """16 hex characters naming what makes pages interchangeable: the model's weights and
    architecture, the cache dtype and the page size (the Redis key prefix and page header)."""
    text = f"{model_fingerprint(model_dir)}:{dtype}:{page_size}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class KVHeadConnectorMetadata(KVConnectorMetadata):
    """One step's work for the worker: prompts to load, prompts whose prefill just ended."""

    loads: list[PrefixJob] = field(default_factory=list)
    saves: list[PrefixJob] = field(default_factory=list)


@dataclass
class _Prompt:
    """The scheduler's view of one request's prompt."""

    hashes: torch.Tensor  # [full prompt pages, 2]
    num_tokens: int
    loaded_pages: int = 0
    load_failed: bool = False
    saved: bool = False


class KVHeadConnector(KVConnectorBase_V1):
    """vLLM's connector interface over :mod:`kvhead.vllm.prefix_io` (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = settings_from_vllm(vllm_config)
        model = vllm_config.model_config
        self.page_size = vllm_config.cache_config.block_size
        self.spec = HeadPageSpec(
            model.get_num_attention_heads(vllm_config.parallel_config),
            model.get_num_kv_heads(vllm_config.parallel_config),
            model.get_head_size(),
            self.page_size,
            model.dtype,
        )
        self.fingerprint = fingerprint(model.model, model.dtype, self.page_size)
        self.tier = RedisTier(self.spec, self.settings.redis, self.fingerprint)
        self._prompts: dict[str, _Prompt] = {}
        self._loads: list[PrefixJob] = []
        self._mover: PrefixMover | None = None
        if role == KVConnectorRole.SCHEDULER:
            transfer = vllm_config.kv_transfer_config
            if transfer.kv_load_failure_policy != "recompute":
                logger.info("kvhead connector: a failed load recomputes the prompt")
                transfer.kv_load_failure_policy = "recompute"

    # -- scheduler side ------------------------------------------------------------------
    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        tokens = request.prompt_token_ids
        if num_computed_tokens or not tokens or request.mm_features:
            return 0, False  # multimodal prompts: their tokens do not name their K/V
        state = self._prompts.get(request.request_id)
        if state is None:
            salt = request.lora_request.lora_name.encode() if request.lora_request else b""
            state = self._prompts[request.request_id] = _Prompt(
                prefix_hashes(tokens, self.page_size, salt), len(tokens)
            )
        if state.load_failed:
            return 0, False
        usable = (len(tokens) - 1) // self.page_size  # vLLM must compute at least one token
        if usable * self.page_size < self.settings.min_match_tokens:
            return 0, False
        hits = self.tier.leading_chains(state.hashes[:usable])
        if hits * self.page_size < self.settings.min_match_tokens:
            return 0, False
        return hits * self.page_size, True

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if num_external_tokens == 0:
            return
        state = self._prompts[request.request_id]
        pages = num_external_tokens // self.page_size
        state.loaded_pages = pages
        ids = blocks.get_block_ids()
        self._loads.append(
            PrefixJob(
                request.request_id, 0, state.hashes[:pages].clone(), tuple(g[:pages] for g in ids)
            )
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        so = scheduler_output
        meta = KVHeadConnectorMetadata(loads=self._loads)
        self._loads = []
        rows = [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs]
        cached = so.scheduled_cached_reqs
        rows += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id, computed in rows:
            job = self._save_job(req_id, computed + so.num_scheduled_tokens.get(req_id, 0))
            if job is not None:
                meta.saves.append(job)
        return meta

    def _save_job(self, req_id: str, computed_after: int) -> PrefixJob | None:
        """The pages to save once this step completes the prompt's prefill, if it does."""
        state = self._prompts.get(req_id)
        if state is None or state.saved or computed_after < state.num_tokens:
            return None
        state.saved = True
        full, first = len(state.hashes), state.loaded_pages
        if full <= first or full * self.page_size < self.settings.min_match_tokens:
            return None
        assert self._kv_cache_manager is not None
        ids = self._kv_cache_manager.get_block_ids(req_id)
        hashes = state.hashes[first:full].clone()
        return PrefixJob(req_id, first, hashes, tuple(g[first:full] for g in ids))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for req_id in connector_output.failed_recving or ():
            state = self._prompts.get(req_id)
            if state is not None:  # recomputed from token 0: never offered a load again
                state.load_failed, state.loaded_pages = True, 0

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._prompts.pop(request.request_id, None)
        return False, None  # saves copy their pages out in the step that ends prefill

    # -- worker side ---------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        runtime = current()
        if runtime is None:
            raise RuntimeError(
                "KVHeadConnector stores kvhead FlexiCache pages: run it with "
                "--attention-backend CUSTOM and the kvhead plugin's settings"
            )
        group_of = {
            name: g
            for g, group in enumerate(self._kv_cache_config.kv_cache_groups)
            for name in group.layer_names
        }
        by_storage = {kv_caches[n].data_ptr(): g for n, g in group_of.items() if n in kv_caches}
        layers = []
        for name, cache in kv_caches.items():
            group = group_of.get(name, by_storage.get(cache.data_ptr()))
            if group is None:
                raise RuntimeError(f"kvhead connector: layer {name} is in no KV cache group")
            layers.append((extract_layer_index(name), cache, group))
        queue_pages = self.settings.save_queue_mib * 2**20 // self.spec.head_page_bytes
        self._mover = PrefixMover(self.tier, runtime, queue_pages)
        self._mover.register(layers)
        runtime.connector = self._mover

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVHeadConnectorMetadata) and self._mover is not None
        self._mover.start_loads(meta.loads)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # loads complete between steps (see get_transfer_results)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # every layer is saved at once in wait_for_save

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVHeadConnectorMetadata) and self._mover is not None
        if meta.saves:
            self._mover.save(meta.saves)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        assert self._mover is not None
        loaded, failed = self._mover.finish_loads()
        return KVConnectorTransferResults(finished_recving=loaded | failed, failed_recving=failed)

    def shutdown(self) -> None:
        if self._mover is not None:
            self._mover.close()
        else:
            self.tier.close()
