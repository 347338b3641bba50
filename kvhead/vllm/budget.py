"""Take the plugin's device memory out of the KV budget vLLM sizes its cache with.

FlexiCache keeps device memory of its own next to vLLM's cache: int8 page bounds of every head
for every vLLM block, the hot-pool index (both grow with the block count), the hot pool's pages
and the open-page table (both sized from ``max_num_seqs``). If vLLM spent its whole budget on
blocks, that memory would come on top and "admitted requests" would be arithmetic, not what the
engine does. So the worker's ``determine_available_memory`` (what vLLM divides by a block's
bytes to get its block count) is wrapped: it still asks vLLM for the budget, then hands back only
``blocks x kv_bytes_per_block`` with

    blocks = (budget - hot_pool - plugin_fixed) // (kv_bytes_per_block + plugin_bytes_per_block)

(the hot pool never exceeds every stable page of every block, see :class:`BudgetSplit`), so
vLLM's cache plus everything the plugin allocates stays inside the budget.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvhead.vllm.config import FlexiCacheConfigError


@dataclass(frozen=True)
class BudgetSplit:
    """How one device KV budget is shared between vLLM's blocks and the plugin.

    The hot pool holds at most every stable page of every block, so its bytes are
    ``min(blocks, pool_max_blocks) x pool_bytes_per_block``: per block while the cache is small
    (few blocks, many sequences), fixed once it is larger than the pool sized for max_num_seqs.
    """

    budget: int  # bytes vLLM would have used for its KV cache
    kv_bytes_per_block: int  # vLLM's cache bytes of one block (resident heads, all layers)
    plugin_bytes_per_block: int  # plugin bytes that grow with each block (bounds, pool index,
    # mean values with summary tokens)
    plugin_fixed_bytes: int  # plugin bytes independent of blocks (open-page table, set pools)
    pool_bytes_per_block: int  # hot-pool bytes of one block's stable pages (all layers)
    pool_max_blocks: int  # blocks' worth of pages the pool is sized for (max_num_seqs x pages)
    num_blocks: int  # blocks vLLM gets

    @classmethod
    def solve(
        cls,
        budget: int,
        *,
        kv_bytes_per_block: int,
        plugin_bytes_per_block: int,
        plugin_fixed_bytes: int,
        pool_bytes_per_block: int = 0,
        pool_max_blocks: int = 0,
    ) -> BudgetSplit:
        """The largest block count whose cache and plugin memory fit ``budget``."""
        per_block = kv_bytes_per_block + plugin_bytes_per_block
        free = budget - plugin_fixed_bytes
        blocks = free // (per_block + pool_bytes_per_block) if free > 0 else 0
        if blocks >= pool_max_blocks:  # the pool stops growing at pool_max_blocks blocks
            blocks = (free - pool_max_blocks * pool_bytes_per_block) // per_block
        if blocks < 2:  # vLLM needs its null block plus one usable block
            raise FlexiCacheConfigError(
                f"KV budget of {budget / 2**20:.1f} MiB cannot hold kvhead's device memory "
                f"(open-page table and hot pool, sized from max_num_seqs) plus two blocks; "
                "raise the KV budget or lower max_num_seqs, top_k or hot_pool_pages"
            )
        return cls(
            budget,
            kv_bytes_per_block,
            plugin_bytes_per_block,
            plugin_fixed_bytes,
            pool_bytes_per_block,
            pool_max_blocks,
            blocks,
        )

    @property
    def pool_bytes(self) -> int:
        return min(self.num_blocks, self.pool_max_blocks) * self.pool_bytes_per_block

    @property
    def vllm_bytes(self) -> int:
        """What vLLM is told it may use: exactly ``num_blocks`` blocks of its cache."""
        return self.num_blocks * self.kv_bytes_per_block

    @property
    def plugin_bytes(self) -> int:
        return (
            self.plugin_fixed_bytes
            + self.num_blocks * self.plugin_bytes_per_block
            + self.pool_bytes
        )

    def describe(self) -> str:
        mib = 2**20
        return (
            f"kvhead KV budget {self.budget / mib:.1f} MiB = vLLM cache "
            f"{self.vllm_bytes / mib:.1f} MiB ({self.num_blocks} blocks x "
            f"{self.kv_bytes_per_block} B) + plugin {self.plugin_bytes / mib:.1f} MiB "
            f"(bounds and pool index {self.plugin_bytes_per_block} B/block, hot pool "
            f"{self.pool_bytes / mib:.1f} MiB, open-page table "
            f"{self.plugin_fixed_bytes / mib:.1f} MiB)"
        )
