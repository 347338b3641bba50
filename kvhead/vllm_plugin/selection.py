"""The FlexiCache policy scoring pages from the device's int8 bounds.

:class:`kvhead.policy.SelectionPolicy` owns the flexicache rules (unstable heads rerank every
step, stable heads every R steps and keep their tail); it scores fp32 ``PageBounds``. Inside vLLM
the device holds only :class:`~kvhead.vllm_plugin.bounds.DeviceBounds`, so this subclass swaps
the scoring step and keeps every rule of the parent.
"""

from __future__ import annotations

import torch

from kvhead.policy import LayerSelection, Mode, SelectionPolicy
from kvhead.vllm_plugin.bounds import DeviceBounds


class CompactSelectionPolicy(SelectionPolicy):
    """flexicache-mode :class:`SelectionPolicy` over int8 page bounds."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode is not Mode.flexicache:
            raise ValueError("CompactSelectionPolicy implements the flexicache mode only")

    def select(
        self, layer: int, query: torch.Tensor, bounds: DeviceBounds,
        block_table: torch.Tensor, seq_lens: torch.Tensor,
    ) -> LayerSelection:
        """Pages to attend to for decode queries ``[B, Hq, D]`` of ``layer``."""
        num_pages = (seq_lens.long() + self.page_size - 1) // self.page_size
        if not block_table.is_cuda:  # score only the pages that exist (tables are padded)
            block_table = block_table[:, : max(int(num_pages.max()), 1)]
        state = self._state.get(layer)
        due = state is None or state.steps % self.rerank_interval == 0
        # Between reranks only unstable heads need scores: stable ones reuse their set.
        heads = None if due else self._unstable_heads[layer]
        top = bounds.select(query, block_table, num_pages, self.top_k, heads)
        sel = self._flexicache(layer, top, num_pages, block_table.shape[1], due)
        self.stats.record(layer, sel)
        return sel
