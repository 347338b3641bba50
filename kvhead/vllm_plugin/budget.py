"""Take the plugin's device memory out of the KV budget vLLM sizes its cache with.

FlexiCache keeps device memory of its own next to vLLM's cache: int8 page bounds of every head
for every vLLM block, the hot-pool index (both grow with the block count), the hot pool's pages
and the open-page table (both sized from ``max_num_seqs``). If vLLM spent its whole budget on
blocks, that memory would come on top and "admitted requests" would be arithmetic, not what the
engine does. So the worker's ``determine_available_memory`` (what vLLM divides by a block's
bytes to get its block count) is wrapped: it still asks vLLM for the budget, then hands back only
``blocks x kv_bytes_per_block`` with

    blocks = (budget - plugin_fixed) // (kv_bytes_per_block + plugin_bytes_per_block)

so vLLM's cache plus everything the plugin allocates stays inside the budget.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from kvhead.vllm_plugin.config import FlexiCacheConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BudgetSplit:
    """How one device KV budget is shared between vLLM's blocks and the plugin."""

    budget: int  # bytes vLLM would have used for its KV cache
    kv_bytes_per_block: int  # vLLM's cache bytes of one block (resident heads, all layers)
    plugin_bytes_per_block: int  # plugin bytes that grow with each block (bounds, pool index)
    plugin_fixed_bytes: int  # plugin bytes independent of blocks (hot pool, open-page table)
    num_blocks: int  # blocks vLLM gets

    @classmethod
    def solve(cls, budget: int, *, kv_bytes_per_block: int, plugin_bytes_per_block: int,
              plugin_fixed_bytes: int) -> BudgetSplit:
        """The largest block count whose cache and plugin memory fit ``budget``."""
        free = budget - plugin_fixed_bytes
        blocks = free // (kv_bytes_per_block + plugin_bytes_per_block) if free > 0 else 0
        if blocks < 2:  # vLLM needs its null block plus one usable block
            raise FlexiCacheConfigError(
                f"KV budget of {budget / 2**20:.1f} MiB cannot hold kvhead's fixed device memory "
                f"({plugin_fixed_bytes / 2**20:.1f} MiB: hot pool and open-page table, sized "
                "from max_num_seqs) plus two blocks; raise the KV budget or lower max_num_seqs, "
                "top_k or hot_pool_pages"
            )
        return cls(budget, kv_bytes_per_block, plugin_bytes_per_block, plugin_fixed_bytes,
                   blocks)

    @property
    def vllm_bytes(self) -> int:
        """What vLLM is told it may use: exactly ``num_blocks`` blocks of its cache."""
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def plugin_bytes(self) -> int:
        return self.plugin_fixed_bytes + self.num_blocks * self.plugin_bytes_per_block

    def describe(self) -> str:
        mib = 2**20
        return (f"kvhead KV budget {self.budget / mib:.1f} MiB = vLLM cache "
                f"{self.vllm_bytes / mib:.1f} MiB ({self.num_blocks} blocks x "
                f"{self.kv_bytes_per_block} B) + plugin {self.plugin_bytes / mib:.1f} MiB "
                f"(bounds and pool index {self.plugin_bytes_per_block} B/block, hot pool and "
                f"open-page table {self.plugin_fixed_bytes / mib:.1f} MiB)")


def install() -> None:
    """Wrap this platform's worker ``determine_available_memory`` once per process."""
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker as worker_cls
    else:
        from vllm.v1.worker.gpu_worker import Worker as worker_cls
    original = worker_cls.determine_available_memory
    if getattr(original, "_kvhead_wrapped", False):
        return

    def determine_available_memory(self) -> int:
        from kvhead.vllm_plugin.runtime import current

        budget = original(self)
        runtime = current()
        if runtime is None:
            return budget
        split = runtime.split_budget(budget)
        runtime.budget_split = split
        logger.warning(split.describe())
        return split.vllm_bytes

    determine_available_memory._kvhead_wrapped = True
    worker_cls.determine_available_memory = determine_available_memory
