"""The per-process FlexiCache runtime: settings, head split, host arena and layers.

vLLM builds attention layers, specs and metadata builders in separate places that share no
object we control, so the worker keeps one runtime per process. It is created when the first
FlexiCache layer is constructed (inside vLLM's start-up, with the config current), which is also
where bad settings stop start-up. Pools are sized on the first forward, when vLLM's block count
is known from the cache tensor.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kvhead.core.online import OnlineStability
from kvhead.core.spec import HeadPageSpec
from kvhead.core.stability import HeadProfile
from kvhead.vllm import patches
from kvhead.vllm.budget import BudgetSplit
from kvhead.vllm.config import (
    FlexiCacheSettings,
    HeadSplit,
    check_arena,
    check_model,
    settings_from_additional_config,
    stable_budgets,
)
from kvhead.vllm.device_bounds import DeviceBounds
from kvhead.vllm.hot_pool import HotPool
from kvhead.vllm.layer import FlexiLayer, StableRanking
from kvhead.vllm.metrics import PUBLISH_INTERVAL_S, HeadMetrics
from kvhead.vllm.request_state import DecodeRows, RequestStates
from kvstore import HostArena, HostArenaConfig
from kvstore.metrics import METRICS_DIR_ENV, MultiprocessPublisher

if TYPE_CHECKING:
    from kvhead.vllm.prefix_io import PrefixMover

logger = logging.getLogger(__name__)

_RUNTIME: FlexiRuntime | None = None


@dataclass(frozen=True)
class ModelGeometry:
    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int
    dtype: torch.dtype
    max_model_len: int
    max_num_seqs: int


class FlexiRuntime:
    """Everything FlexiCache keeps for one vLLM worker process."""

    def __init__(
        self,
        settings: FlexiCacheSettings,
        split: HeadSplit,
        geo: ModelGeometry,
        prefill_isa: str,
        prefill_block: int,
        budgets: torch.Tensor | None = None,
        profile: HeadProfile | None = None,
    ) -> None:
        self.settings, self.split, self.geo = settings, split, geo
        self.profile = profile  # for reports: each head's offline instability
        # pages per (layer, kv head) top-K set: per-head budgets (head_budgets) or top_k each
        self.budgets = (
            budgets
            if budgets is not None
            else torch.full((geo.num_layers, geo.num_kv_heads), settings.top_k)
        ).long()
        self.prefill_isa, self.prefill_block = prefill_isa, prefill_block
        self.spec = HeadPageSpec(
            geo.num_q_heads, geo.num_kv_heads, geo.head_dim, geo.page_size, geo.dtype
        )
        self.arena: HostArena | None = None
        self.layers: dict[int, FlexiLayer] = {}
        self.max_pages = math.ceil(geo.max_model_len / geo.page_size)
        self.requests = RequestStates(settings.rerank_interval, geo.page_size)
        self.budget_split: BudgetSplit | None = None  # set when vLLM sizes its cache
        self.publisher: MultiprocessPublisher | None = None  # kvhead_* metrics, when asked
        self.connector: PrefixMover | None = None  # the KV connector's worker side, if any
        # this step's plan: vLLM builds attention metadata once per KV cache group (layers with
        # the same number of resident heads form one), and every group must see one step
        self._step_plan: tuple[DecodeRows, torch.Tensor] | None = None
        self._publish_at = 0.0

    @classmethod
    def plan(
        cls,
        settings: FlexiCacheSettings,
        model_dir: str | Path,
        geo: ModelGeometry,
        *,
        prefix_caching: bool,
        prefill_isa: str = "",
        prefill_block: int = 0,
    ) -> FlexiRuntime:
        """The runtime a worker would build for this model and vLLM configuration.

        Raises :class:`FlexiCacheConfigError` for settings the model or vLLM's cache cannot
        serve. Also what :mod:`kvhead.vllm.preflight` builds to check settings before any
        engine starts, so both refuse exactly the same things.
        """
        profile = check_model(
            settings,
            model_dir,
            num_layers=geo.num_layers,
            num_kv_heads=geo.num_kv_heads,
            block_size=geo.page_size,
            prefix_caching=prefix_caching,
        )
        split = HeadSplit.from_profile(
            profile,
            settings.max_resident_heads_per_layer,
            settings.leading_layers,
            settings.unstable_heads,
        )
        budgets = stable_budgets(settings, profile, split)
        return cls(settings, split, geo, prefill_isa, prefill_block, budgets, profile)

    # -- sizing ------------------------------------------------------------------------------
    @property
    def tail_pages(self) -> int:
        """Pages a stable head can write between reranks, plus the page partial at the rerank."""
        return math.ceil(self.settings.rerank_interval / self.geo.page_size) + 1

    def _set_pages(self, layer: int | None = None) -> int:
        """Pages one sequence's stable heads hold at most (each its K + tail), in ``layer``
        or in all layers."""
        stable = ~self.split.resident_mask if layer is None else ~self.split.resident_mask[layer]
        budgets = self.budgets if layer is None else self.budgets[layer]
        return int((budgets[stable] + self.tail_pages).clamp(max=self.max_pages).sum())

    @property
    def pool_blocks(self) -> int:
        """Blocks' worth of stable pages the pool is sized for: each running sequence's K + tail
        per stable head (per-head budgets averaged over the stable heads, rounded up)."""
        per_seq = -(-self._set_pages() // max(self.split.num_stable, 1))
        return self.geo.max_num_seqs * per_seq

    def pool_pages(self, num_blocks: int, layer: int) -> int:
        """Hot-pool pages of ``layer``: every running sequence's sets of its stable heads,
        never more than its stable pages of every block (unless set explicitly)."""
        num_stable = len(self.split.stable(layer))
        if self.settings.hot_pool_pages is not None:
            return self.settings.hot_pool_pages if num_stable else 0
        return min(self.geo.max_num_seqs * self._set_pages(layer), num_blocks * num_stable)

    @property
    def open_pages(self) -> int:
        """Entries of the exact-bounds table of pages being written (see DeviceBounds): a few
        per running sequence keeps collisions rare."""
        return 4 * self.geo.max_num_seqs

    def split_budget(self, budget: int) -> BudgetSplit:
        """Share a device KV budget between vLLM's cache and this plugin (see budget.py)."""
        heads, dim, page = self.geo.num_kv_heads, self.geo.head_dim, self.spec.head_page_bytes
        num_stable = self.split.num_stable
        fixed = self.geo.num_layers * DeviceBounds.fixed_bytes(self.open_pages, heads, dim)
        per_block = self.geo.num_layers * DeviceBounds.bytes_per_block(
            heads, dim
        ) + HotPool.bytes_per_block(num_stable)
        if self.settings.compensate:  # a mean value per stable page (summary tokens)
            per_block += num_stable * dim * self.geo.dtype.itemsize
        pool_per_block = pool_blocks = 0
        if self.settings.hot_pool_pages is None:
            pool_per_block = HotPool.fixed_bytes(num_stable, page)  # a block's stable pages
            pool_blocks = self.pool_blocks
        else:
            fixed += sum(
                HotPool.fixed_bytes(self.pool_pages(0, i), page) for i in range(self.geo.num_layers)
            )
        return BudgetSplit.solve(
            budget,
            kv_bytes_per_block=self.split.num_resident * page,
            plugin_bytes_per_block=per_block,
            plugin_fixed_bytes=fixed,
            pool_bytes_per_block=pool_per_block,
            pool_max_blocks=pool_blocks,
        )

    def ensure_arena(self, num_blocks: int) -> HostArena:
        """Create the host arena for ``num_blocks`` vLLM blocks (refusing one that is too small)."""
        if self.arena is None:
            need = num_blocks * self.split.num_stable
            capacity = check_arena(self.settings, need, self.spec.head_page_bytes)
            self.arena = HostArena(
                self.spec,
                HostArenaConfig(
                    capacity_pages=capacity, num_layers=self.geo.num_layers, num_blocks=num_blocks
                ),
            )
        return self.arena

    def layer(self, index: int, num_blocks: int) -> FlexiLayer:
        if index not in self.layers:
            stable = self.split.stable(index)
            self.layers[index] = FlexiLayer(
                index,
                self.split.resident(index),
                stable,
                num_kv_heads=self.geo.num_kv_heads,
                group=self.geo.num_q_heads // self.geo.num_kv_heads,
                num_blocks=num_blocks,
                page_size=self.geo.page_size,
                head_dim=self.geo.head_dim,
                dtype=self.geo.dtype,
                prefill_isa=self.prefill_isa,
                arena=self.ensure_arena(num_blocks),
                pool_pages=self.pool_pages(num_blocks, index),
                open_pages=self.open_pages,
                top_k=self.settings.top_k,
                resident_dense=self.settings.unstable_dense,
                ranking=self.ranking(index),
                summaries=self.settings.compensate,
                kernel_threads=self.settings.decode_kernel_threads,
                prefill_block=self.prefill_block,
                online=OnlineStability(self._expected_rco(index, stable)),
            )
        return self.layers[index]

    def _expected_rco(self, layer: int, stable: torch.Tensor) -> torch.Tensor:
        """1 - the profile's instability of ``layer``'s stable heads (NaN where unknown)."""
        if self.profile is None:
            return torch.full((len(stable),), torch.nan, dtype=torch.float64)
        return 1 - self.profile.instability_tensor()[layer, stable].double()

    def ranking(self, layer: int) -> StableRanking:
        """How ``layer``'s stable heads rank pages (the settings' defaults are the spec's)."""
        opt = self.settings
        return StableRanking(
            budgets=self.budgets[layer],
            sink_pages=opt.sink_pages,
            recent_pages=opt.recent_pages,
            group_score=opt.group_score,
            bound_weight=opt.bound_weight,
        )

    # -- per step ----------------------------------------------------------------------------
    def plan_step(
        self,
        seq_lens: torch.Tensor,
        table: torch.Tensor,
        decode: torch.Tensor,
        prefill: torch.Tensor,
    ) -> tuple[DecodeRows, torch.Tensor]:
        """Account one step's rows to their requests (see :class:`RequestStates`).

        Returns the decode rows' request slots and every block this step's rows hold. When a
        request ended or restarted since the last step, pool pages of blocks no live request
        holds any more are released in every layer. Within one engine step (between vLLM's
        metadata builds, see :func:`end_step`) later calls return the first call's plan: the
        groups' block tables hold the same block ids, and a request's clock must move once.
        """
        if self._step_plan is not None:
            return self._step_plan
        rows = self.requests.plan(seq_lens, table, decode, prefill)
        self.publish(force=False)
        pages = ((seq_lens + self.geo.page_size - 1) // self.geo.page_size).view(-1, 1)
        keep = table[torch.arange(table.shape[1]).view(1, -1) < pages].long()
        if self.requests.changed:
            self.requests.changed = False
            live = torch.cat([self.requests.live_blocks(), keep])
            for layer in self.layers.values():
                layer.pool.release_unreferenced(live)
        if self.requests.step_req_ids is not None:  # inside an engine step: share the plan
            self._step_plan = rows, keep
        return rows, keep

    def end_step(self) -> None:
        """The engine built this step's attention metadata for every group."""
        self._step_plan = None

    # -- reporting ---------------------------------------------------------------------------
    def publish_metrics(self, directory: str, model: str) -> None:
        """Publish ``kvhead_*`` metrics into ``directory`` from the step loop (see
        :mod:`kvhead.vllm.metrics`)."""
        self.publisher = MultiprocessPublisher(directory, [HeadMetrics(self, model)])
        self.publisher.publish()
        atexit.register(self.publisher.publish)  # the last steps' counters, when vLLM exits

    def publish(self, force: bool) -> None:
        """Publish metrics when asked to, at most every ``PUBLISH_INTERVAL_S`` from the step
        loop; ``force`` when requests ended (an idle engine runs no step to report that)."""
        if self.publisher is None or not (force or time.monotonic() >= self._publish_at):
            return
        self._publish_at = time.monotonic() + PUBLISH_INTERVAL_S
        self.publisher.publish()

    def page_steps(self) -> list[float]:
        """(resident, existing) (sequence, head) pages summed over layers and decode steps."""
        totals = sum(
            (l.stats.page_steps for l in self.layers.values()), torch.zeros(2, dtype=torch.float64)
        )
        return totals.tolist()

    def reset_peaks(self) -> None:
        """Start a new measurement window for the hot-pool peak."""
        for layer in self.layers.values():
            layer.pool.peak_in_use = layer.pool.in_use

    def report(self) -> dict:
        """Memory and traffic numbers for benchmarks (bytes are per worker, all layers)."""
        resident, total = self.page_steps()
        layers = list(self.layers.values())
        page = self.spec.head_page_bytes
        meta = sum(l.bounds.nbytes + l.value_means.nbytes for l in layers)
        return {
            "resident_heads_per_layer": self.split.resident_per_layer,
            "resident_heads": self.split.num_resident,
            "stable_heads": self.split.num_stable,
            "resident_page_fraction": resident / total if total else 1.0,
            "resident_page_steps": resident,
            "total_page_steps": total,
            "reranks": sum(l.stats.reranks for l in layers),
            "promoted_pages": sum(l.stats.promoted_pages for l in layers),
            "demoted_pages": sum(l.stats.demoted_pages for l in layers),
            "hot_pool_bytes_allocated": sum(l.pool.nbytes for l in layers),
            "hot_pool_peak_bytes": sum(l.pool.peak_in_use for l in layers) * page,
            "page_meta_bytes": meta,
            "arena_pages_capacity": self.arena.config.capacity_pages if self.arena else 0,
            "budget_split": asdict(self.budget_split) if self.budget_split else None,
            "connector": asdict(self.connector.counters) if self.connector else None,
        }

    def heads_report(self) -> dict:
        """Every (layer, kv head): dense or stable, its profile instability and where its pages
        of the live requests are now (what ``/v1/kvhead/heads`` shows operators).

        A dense head holds every live page in vLLM's cache; a stable head holds its hot-pool
        pages on the device and the rest in the host arena.
        """
        live = torch.unique(self.requests.live_blocks())
        instability = self.profile.instability if self.profile is not None else None
        layers = []
        for index in range(self.geo.num_layers):
            stable = self.split.stable(index).tolist()
            layer = self.layers.get(index)
            heads = []
            for head in range(self.geo.num_kv_heads):
                entry: dict = {
                    "head": head,
                    "state": "stable" if head in stable else "dense",
                    "instability": instability[index][head] if instability else None,
                }
                if head in stable:
                    held = 0
                    if layer is not None and live.numel():
                        column = layer.pool.slot_of[live, stable.index(head)]
                        held = int((column >= 0).sum())
                    entry |= {
                        "budget_pages": int(self.budgets[index, head]),
                        "device_pages": held,
                        "host_pages": live.numel() - held,
                    }
                    if layer is not None:
                        online = layer.online
                        i = stable.index(head)
                        ema = float(online.ema[i])
                        entry |= {
                            "online_instability": None if math.isnan(ema) else 1 - ema,
                            "drifted": bool(online.drifted[i]),
                        }
                else:
                    entry |= {"device_pages": live.numel(), "host_pages": 0}
                heads.append(entry)
            layers.append({"layer": index, "heads": heads})
        return {
            "settings": self.settings.model_dump(mode="json"),
            "page_size": self.geo.page_size,
            "live_requests": len(self.requests),
            "live_pages": live.numel(),
            # vLLM's blocks as the cache tensor has them (None before the first forward)
            "vllm_blocks": self.arena.config.num_blocks if self.arena else None,
            "dense_heads": self.split.num_resident,
            "stable_heads": self.split.num_stable,
            "layers": layers,
        }


def current() -> FlexiRuntime | None:
    return _RUNTIME


def init_runtime(vllm_config, prefill_isa: str, prefill_block: int) -> FlexiRuntime:
    """Create (once per process) the runtime from vLLM's config; raises on bad settings."""
    global _RUNTIME
    if _RUNTIME is not None:
        return _RUNTIME
    settings = settings_from_additional_config(vllm_config.additional_config)
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    hf = model.hf_text_config
    parallel = vllm_config.parallel_config
    geo = ModelGeometry(
        num_layers=hf.num_hidden_layers,
        num_q_heads=model.get_num_attention_heads(parallel),
        num_kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        page_size=cache.block_size,
        dtype=model.dtype,
        max_model_len=model.max_model_len,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
    )
    _RUNTIME = FlexiRuntime.plan(
        settings,
        model.model,
        geo,
        prefix_caching=bool(cache.enable_prefix_caching),
        prefill_isa=prefill_isa,
        prefill_block=prefill_block,
    )
    patches.install_worker_patches()
    logger.warning(
        "kvhead FlexiCache: %d resident + %d stable kv heads (all layers), K=%d, R=%d, page %d",
        _RUNTIME.split.num_resident,
        _RUNTIME.split.num_stable,
        settings.top_k,
        settings.rerank_interval,
        geo.page_size,
    )
    if cache.num_gpu_blocks:  # known in-process: size-check the arena during start-up
        _RUNTIME.ensure_arena(cache.num_gpu_blocks)
    if directory := os.environ.get(METRICS_DIR_ENV):
        _RUNTIME.publish_metrics(directory, model.served_model_name)
    return _RUNTIME
