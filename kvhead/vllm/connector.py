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

Preemption: vLLM frees a preempted request's blocks and later recomputes its context as a
prefill, which under FlexiCache is not the computation the request ran (its decoded tokens' K/V
came from sparse attention), so its continuation would change. The connector instead copies the
request's whole computed context out (``handle_preemptions``, before the blocks are reused)
under names salted with the request and its preemption count, and on resume loads it back as a
load of every computed token; the runtime then keeps the request's selection state and rerank
clock (:meth:`RequestStates.resume`), so it continues exactly where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorTransferResults,
    KVConnectorWorkerMetadata,
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
SWAP_WAIT_S = 30.0  # longest a preempted request waits for its swap-out before recomputing


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
    """One step's work for the worker: contexts to load, prompts whose prefill just ended, and
    preempted requests whose context must be copied out before their blocks are reused."""

    loads: list[PrefixJob] = field(default_factory=list)
    saves: list[PrefixJob] = field(default_factory=list)
    swaps: list[PrefixJob] = field(default_factory=list)


@dataclass
class SwapResults(KVConnectorWorkerMetadata):
    """Worker -> scheduler: swap-outs written (True) or refused in part (False)."""

    done: dict[str, bool] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        assert isinstance(other, SwapResults)
        merged = dict(self.done)
        for req_id, ok in other.done.items():
            merged[req_id] = merged.get(req_id, True) and ok
        return SwapResults(merged)


@dataclass
class _Swap:
    """A preempted request's context in Redis (or on its way there)."""

    names: torch.Tensor  # [pages, 2] salted names of its pages
    num_tokens: int  # computed tokens at preemption
    since: float
    state: str = "pending"  # pending -> ready | failed (from the worker's report)


@dataclass
class _Tracked:
    """The scheduler's view of one live request."""

    request: Request
    hashes: torch.Tensor  # [full prompt pages, 2]
    blocks: tuple[list[int], ...] = ()  # its blocks per KV cache group, as the worker has them
    computed: int = 0  # tokens computed once the last scheduled step ran
    loaded_pages: int = 0
    load_failed: bool = False
    saved: bool = False
    swap: _Swap | None = None
    loading_swap: bool = False

    @property
    def num_tokens(self) -> int:
        """Prompt tokens."""
        return len(self.request.prompt_token_ids)


class KVHeadConnector(KVConnectorBase_V1):
    """vLLM's connector interface over :mod:`kvhead.vllm.prefix_io` (see the module docstring)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        self.settings = settings_from_vllm(vllm_config)
        parallel = vllm_config.parallel_config
        if parallel.tensor_parallel_size > 1:
            raise ValueError(
                "KVHeadConnector stores pages by KV head index; run it with "
                "tensor_parallel_size 1 (each rank would name other heads alike)"
            )
        model = vllm_config.model_config
        self.page_size = vllm_config.cache_config.block_size
        self.spec = HeadPageSpec(
            model.get_num_attention_heads(parallel),
            model.get_num_kv_heads(parallel),
            model.get_head_size(),
            self.page_size,
            model.dtype,
        )
        self.fingerprint = fingerprint(model.model, model.dtype, self.page_size)
        self.tier = RedisTier(self.spec, self.settings.redis, self.fingerprint)
        self._tracked: dict[str, _Tracked] = {}
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
        state = self._tracked.get(request.request_id)
        if state is None:
            salt = request.lora_request.lora_name.encode() if request.lora_request else b""
            state = self._tracked[request.request_id] = _Tracked(
                request, prefix_hashes(tokens, self.page_size, salt)
            )
        if state.swap is not None:
            swapped = self._swapped_tokens(state)
            if swapped != 0:
                return swapped, swapped is not None
        if state.load_failed:
            return 0, False
        usable = (len(tokens) - 1) // self.page_size  # vLLM must compute at least one token
        if usable * self.page_size < self.settings.min_match_tokens:
            return 0, False
        hits = self.tier.leading_chains(state.hashes[:usable])
        if hits * self.page_size < self.settings.min_match_tokens:
            return 0, False
        return hits * self.page_size, True

    def _swapped_tokens(self, state: _Tracked) -> int | None:
        """A preempted request's whole context, if its swap-out is in Redis; None while it is
        still being written (vLLM asks again next step); 0 to recompute instead."""
        swap = state.swap
        assert swap is not None
        if swap.state == "pending" and time.monotonic() - swap.since < SWAP_WAIT_S:
            return None
        if swap.state == "ready" and self.tier.leading_chains(swap.names) == len(swap.names):
            state.loading_swap = True
            return swap.num_tokens
        state.swap = None  # failed, lost or too slow: recompute
        return 0

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        state = self._tracked.get(request.request_id)
        if state is None:
            return
        state.blocks = tuple(list(g) for g in blocks.get_block_ids())
        if num_external_tokens == 0:
            return
        pages = -(-num_external_tokens // self.page_size)
        ids = tuple(g[:pages] for g in state.blocks)
        if state.loading_swap:
            assert state.swap is not None
            # its prompt pages, if still unsaved, are saved under prompt names at prefill's end
            job = PrefixJob(
                request.request_id, 0, state.swap.names, ids, num_external_tokens, swap=True
            )
        else:
            job = PrefixJob(request.request_id, 0, state.hashes[:pages].clone(), ids)
            state.loaded_pages = pages
        self._loads.append(job)

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        so = scheduler_output
        meta = KVHeadConnectorMetadata(loads=self._loads)
        self._loads = []
        for req_id in so.preempted_req_ids or ():
            job = self._swap_job(req_id)
            if job is not None:
                meta.swaps.append(job)
        cached = so.scheduled_cached_reqs
        for req_id, new_blocks in zip(cached.req_ids, cached.new_block_ids, strict=True):
            state = self._tracked.get(req_id)
            if state is None or new_blocks is None:
                continue
            if req_id in cached.resumed_req_ids:  # a resumed request's blocks are all new
                state.blocks = tuple(list(g) for g in new_blocks)
            else:
                state.blocks = tuple(a + list(b) for a, b in zip(state.blocks, new_blocks))
        rows = [(r.req_id, r.num_computed_tokens) for r in so.scheduled_new_reqs]
        rows += list(zip(cached.req_ids, cached.num_computed_tokens, strict=True))
        for req_id, computed in rows:
            state = self._tracked.get(req_id)
            if state is None:
                continue
            state.computed = computed + so.num_scheduled_tokens.get(req_id, 0)
            if state.loading_swap:  # loaded: the swap is spent
                state.loading_swap, state.swap = False, None
            job = self._save_job(req_id, state)
            if job is not None:
                meta.saves.append(job)
        return meta

    def _save_job(self, req_id: str, state: _Tracked) -> PrefixJob | None:
        """The pages to save once this step completes the prompt's prefill, if it does."""
        if state.saved or state.computed < state.num_tokens:
            return None
        state.saved = True
        full, first = len(state.hashes), state.loaded_pages
        if full <= first or full * self.page_size < self.settings.min_match_tokens:
            return None
        hashes = state.hashes[first:full].clone()
        return PrefixJob(req_id, first, hashes, tuple(g[first:full] for g in state.blocks))

    def _swap_job(self, req_id: str) -> PrefixJob | None:
        """Copy a preempted request's computed context out before its blocks are reused, so it
        resumes exactly where it stopped instead of recomputing (dense) what it decoded."""
        state = self._tracked.get(req_id)
        if state is None or state.computed == 0:
            return None
        tokens = list(state.request.all_token_ids[: state.computed])
        pages = -(-len(tokens) // self.page_size)
        tokens += [-1] * (pages * self.page_size - len(tokens))  # the last page's free slots
        salt = f"swap/{req_id}/{state.request.num_preemptions}".encode()
        names = prefix_hashes(tokens, self.page_size, salt)
        state.swap = _Swap(names, state.computed, time.monotonic())
        ids = tuple(g[:pages] for g in state.blocks)
        return PrefixJob(req_id, 0, names, ids, state.computed, swap=True)

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        for req_id in connector_output.failed_recving or ():
            state = self._tracked.get(req_id)
            if state is None:
                continue
            if state.loading_swap or state.swap is not None:  # recomputed from token 0
                state.swap, state.loading_swap = None, False
            else:  # never offered a prompt load again; its prefill re-saves (repairs) it
                state.load_failed = True
            state.loaded_pages = 0
        results = connector_output.kv_connector_worker_meta
        if isinstance(results, SwapResults):
            for req_id, ok in results.done.items():
                state = self._tracked.get(req_id)
                if state is not None and state.swap is not None:
                    state.swap.state = "ready" if ok else "failed"

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        self._tracked.pop(request.request_id, None)
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

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert isinstance(kv_connector_metadata, KVHeadConnectorMetadata)
        if kv_connector_metadata.swaps and self._mover is not None:
            self._mover.save(kv_connector_metadata.swaps)  # before this step reuses the blocks

    def build_connector_worker_meta(self) -> KVConnectorWorkerMetadata | None:
        done = self._mover.take_swapped() if self._mover is not None else {}
        return SwapResults(done) if done else None

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
