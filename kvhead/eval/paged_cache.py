"""A paged KV cache for one sequence in vLLM's layout, with page bounds kept on append.

The reference runner owns its cache instead of using transformers' so that the page layout,
the bounds and the block table are exactly what the vLLM plugin and the GPU kernels see.

fp32 page bounds are kept everywhere (the reference selection reads them), and fp32 per-page
value sums (the summary tokens of :mod:`kvhead.core.summaries`). On CUDA (or when
asked) each layer also keeps :class:`~kvhead.core.bounds.live.LiveBounds` (int8 page and super-page
bounds, what the rerank kernels read): built from the fp32 bounds after every multi-token write
(prefill) and advanced by ``kernels.append_bounds`` on single-token writes (decode).
"""

from __future__ import annotations

import torch

from kvhead.core.bounds.compact import DEFAULT_GROUP, FLAT_MAX_PAGES
from kvhead.core.bounds.live import LiveBounds
from kvhead.core.pages import PageBounds
from kvhead.core.spec import HeadPageSpec
from kvhead.core.summaries import PageValueSums


class PagedKVCache:
    """K/V pools ``[num_blocks, page_size, Hkv, D]`` per layer; logical page i is block i."""

    def __init__(
        self,
        num_layers: int,
        spec: HeadPageSpec,
        max_tokens: int,
        device: torch.device | str = "cpu",
        live_bounds: bool | None = None,
    ) -> None:
        """``live_bounds``: keep int8 live bounds too (None: on CUDA; True on CPU runs the
        kernels through Triton's interpreter when it is on, else their torch reference)."""
        self.spec = spec
        self.num_blocks = spec.num_pages(max_tokens)
        shape = (self.num_blocks, spec.page_size, spec.num_kv_heads, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=device) for _ in range(num_layers)]
        self.bounds = [
            PageBounds.empty(self.num_blocks, spec.num_kv_heads, spec.head_dim, device=device)
            for _ in range(num_layers)
        ]
        self.value_sums = [
            PageValueSums.empty(self.num_blocks, spec.num_kv_heads, spec.head_dim, device=device)
            for _ in range(num_layers)
        ]
        self.block_table = torch.arange(self.num_blocks, device=device).unsqueeze(0)
        self.live_bounds = (
            torch.device(device).type == "cuda" if live_bounds is None else live_bounds
        )
        self.live: list[LiveBounds | None] = [None] * num_layers  # see the module doc
        # Super-pages only where a two-level selection can be asked for (the table's width).
        self._group = DEFAULT_GROUP if self.num_blocks > FLAT_MAX_PAGES else None
        self.length = 0  # tokens committed by completed forward passes

    @property
    def capacity(self) -> int:
        return self.num_blocks * self.spec.page_size

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Store ``[T, Hkv, D]`` keys/values at positions ``length .. length+T-1``."""
        count = keys.shape[0]
        if self.length + count > self.capacity:
            raise ValueError(
                f"sequence of {self.length + count} tokens exceeds the cache's {self.capacity}"
            )
        slots = torch.arange(self.length, self.length + count, device=keys.device)
        self.k[layer].view(-1, *keys.shape[1:])[slots] = keys.to(self.spec.dtype)
        self.v[layer].view(-1, *values.shape[1:])[slots] = values.to(self.spec.dtype)
        from kvhead import kernels

        if keys.is_cuda:
            kernels.update_bounds(self.bounds[layer], keys, slots, self.spec.page_size)
        else:
            self.bounds[layer].update(keys, slots, self.spec.page_size)
        self.value_sums[layer].update(values, slots, self.spec.page_size)
        if not self.live_bounds:
            return
        if count == 1 and self.live[layer] is not None:
            kernels.append_bounds(self.live[layer], keys, slots, slots)  # slot == position
        else:
            self._build_live(layer, self.length + count)

    def _build_live(self, layer: int, length: int) -> None:
        """int8 bounds of ``layer`` from its fp32 bounds, for a sequence of ``length`` tokens."""
        seq_lens = torch.tensor([length], device=self.block_table.device)
        self.live[layer] = LiveBounds.from_bounds(
            self.bounds[layer], self.block_table, seq_lens, self.spec.page_size, self._group
        )

    def keys_values(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views ``[length, Hkv, D]`` of the first ``length`` positions."""
        flat = (-1, self.spec.num_kv_heads, self.spec.head_dim)
        return self.k[layer].view(flat)[:length], self.v[layer].view(flat)[:length]

    def advance(self, count: int) -> None:
        self.length += count

    def rewind(self, length: int) -> None:
        """Drop positions ``>= length`` (to decode again from a shared prefill).

        The page that becomes partial gets its bounds and value sum recomputed from what it keeps,
        so selections after a rewind equal those of a cache that never held the dropped tokens;
        int8 live bounds are rebuilt from the fp32 ones.
        """
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot rewind to {length}: cache holds {self.length} tokens")
        self.length = length
        start = length - length % self.spec.page_size
        slots = torch.arange(start, length, device=self.block_table.device)
        for layer in range(len(self.k)):
            if start < length:
                keys, values = self.keys_values(layer, length)
                self.bounds[layer].update(keys[start:], slots, self.spec.page_size)
                self.value_sums[layer].update(values[start:], slots, self.spec.page_size)
            if self.live[layer] is not None:
                self._build_live(layer, length)
