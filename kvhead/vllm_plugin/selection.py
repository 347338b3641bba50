"""The FlexiCache policy scoring pages from the device's int8 bounds.

:class:`kvhead.policy.SelectionPolicy` owns the flexicache rules (unstable heads rerank every
step, stable heads every R steps and keep their tail); it scores fp32 ``PageBounds``. Inside vLLM
the device holds only :class:`~kvhead.vllm_plugin.bounds.DeviceBounds`, so this subclass replaces
the scoring step (``_top_k``) and inherits every rule of the parent.
"""

from __future__ import annotations

import torch

from kvhead.policy import Mode, SelectionPolicy
from kvhead.vllm_plugin.bounds import DeviceBounds


class CompactSelectionPolicy(SelectionPolicy):
    """flexicache-mode :class:`SelectionPolicy` over int8 page bounds."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode is not Mode.flexicache:
            raise ValueError("CompactSelectionPolicy implements the flexicache mode only")
        if (self.sink_pages, self.recent_pages, self.group_score) != (0, 1, "max"):
            raise ValueError("int8 page bounds score the spec's selection only (no sink/window "
                             "pages, max over the GQA group)")

    def _top_k(
        self, query: torch.Tensor, bounds: DeviceBounds, block_table: torch.Tensor,  # type: ignore[override]
        num_pages: torch.Tensor, heads: torch.Tensor | None,
    ) -> torch.Tensor:
        return bounds.select(query, block_table, num_pages, self.top_k, heads)
