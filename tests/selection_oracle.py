"""The FlexiCache policy over the device's int8 bounds, in torch: the native decode's oracle.

:class:`kvhead.core.policy.SelectionPolicy` owns the flexicache rules (unstable heads rerank every
step, stable heads every R steps and keep their tail) and the selection options (sink and window
pages, group score, bound weight, per-head budgets); it scores fp32 ``PageBounds``. This subclass
replaces only the scoring step (``_top_k``) with the int8 boxes of
:class:`~kvhead.vllm.device_bounds.DeviceBounds` and inherits every rule. The plugin's decode
runs the same rules in C++ and :mod:`kvhead.vllm.layer`; tests hold it to this policy.
"""

from __future__ import annotations

import torch

from kvhead.core.policy import Mode, SelectionPolicy
from kvhead.vllm.device_bounds import DeviceBounds


class CompactSelectionPolicy(SelectionPolicy):
    """flexicache-mode :class:`SelectionPolicy` over int8 page bounds."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode is not Mode.flexicache:
            raise ValueError("CompactSelectionPolicy implements the flexicache mode only")

    def _top_k(
        self,
        query: torch.Tensor,
        bounds: DeviceBounds,
        block_table: torch.Tensor,  # type: ignore[override]
        num_pages: torch.Tensor,
        heads: torch.Tensor | None,
    ) -> torch.Tensor:
        top_k = self.top_k if self.head_top_k is None else self.head_top_k[self._layer]
        return bounds.select(
            query,
            block_table,
            num_pages,
            top_k,
            heads,
            sink_pages=self.sink_pages,
            recent_pages=self.recent_pages,
            group_score=self.group_score,
            bound_weight=self.bound_weight,
        )
