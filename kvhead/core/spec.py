"""Head and page geometry: the single checked place where head-awareness lives.

Every module that sizes a buffer or reports bytes asks a :class:`HeadPageSpec` instead of
multiplying shapes itself, so the memory numbers in benchmarks and metrics agree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class HeadPageSpec:
    """Geometry of one layer's paged KV cache.

    A *page* holds ``page_size`` consecutive tokens of one sequence; vLLM calls it a block.
    Head-aware code keeps pages per (block, kv head), so byte sizes are given per head.
    """

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    page_size: int = 16
    dtype: torch.dtype = torch.bfloat16

    def __post_init__(self) -> None:
        for name in ("num_q_heads", "num_kv_heads", "head_dim", "page_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"HeadPageSpec.{name} must be positive, got {getattr(self, name)}")
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )

    @property
    def group_size(self) -> int:
        """Query heads that share one KV head (GQA group)."""
        return self.num_q_heads // self.num_kv_heads

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @property
    def head_page_bytes(self) -> int:
        """Bytes of K and V for one page of one KV head."""
        return 2 * self.page_size * self.head_dim * self.element_bytes

    @property
    def head_meta_bytes(self) -> int:
        """Bytes of the per-page key bounds (elementwise min and max) of one KV head."""
        return 2 * self.head_dim * self.element_bytes

    def num_pages(self, num_tokens: int) -> int:
        """Pages needed to hold ``num_tokens`` tokens (the last one may be partial)."""
        return -(-num_tokens // self.page_size)
