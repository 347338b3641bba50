"""The FLEXICACHE attention backend: vLLM's CPU attention with head-aware KV placement.

It subclasses vLLM's CPU backend so every capability probe, block-size rule and ISA choice stays
vLLM's, and changes two things:

* ``forward`` first splits each new token's heads between vLLM's cache and the arena (the
  backend declares ``forward_includes_kv_cache_update``: layers that keep no head in vLLM's cache
  are registered as sharing another layer's cache, and vLLM skips the separate update for those),
  then runs prefill rows densely and decode rows through the FlexiCache policy;
* the per-layer KV spec is cut to the layer's resident heads by :mod:`kvhead.vllm.kv_spec`
  (vLLM's ``customize_spec`` hook does not say which layer it is asked about).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from vllm.config import VllmConfig, get_current_vllm_config
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionLayer, CommonAttentionMetadata, MultipleOf
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadataBuilder,
    _get_attn_isa,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from kvhead.vllm.request_state import DecodeRows
from kvhead.vllm.runtime import FlexiRuntime, current, init_runtime

PREFILL_BLOCK = 32  # stock vLLM's CPU block size; its AMX attention kernel needs multiples of it


@dataclass
class FlexiMetadata:
    """Per-step batch layout, split into prefill and decode rows once for all layers."""

    num_actual_tokens: int
    slot_mapping: torch.Tensor  # [num_actual_tokens] flat cache slot of each new token
    seq_lens: torch.Tensor  # [R] int64
    block_table: torch.Tensor  # [R, max_pages] int32, cut or padded to the model's pages
    prefill_rows: torch.Tensor  # rows with more than one query token
    prefill_tokens: list[torch.Tensor]  # their token indices
    decode_tokens: torch.Tensor  # the query token of each row with one (decode rows)
    decode_table: torch.Tensor  # [decode rows, max_pages] int32, contiguous
    decode_seq_lens: torch.Tensor  # [decode rows] int64, contiguous
    decode_rows: DecodeRows  # whose each decode row is (request slots, who reranks)
    step_blocks: torch.Tensor  # every block this step's rows hold (their pool pages stay)


class FlexiCacheMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(
        self,
        kv_cache_spec: AttentionSpec,
        layer_names: list[str],
        vllm_config: VllmConfig,
        device: torch.device,
    ) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        runtime = current()
        if runtime is not None and vllm_config.cache_config.num_gpu_blocks:
            runtime.ensure_arena(vllm_config.cache_config.num_gpu_blocks)

    def build(
        self,
        common_prefix_len: int,
        common_attn_metadata: CommonAttentionMetadata,
        fast_build: bool = False,
    ) -> FlexiMetadata:
        m = common_attn_metadata
        runtime = current()
        starts = m.query_start_loc.long()
        qlens = starts[1:] - starts[:-1]
        seq_lens = m.seq_lens.long()
        table = _fixed_width(m.block_table_tensor.to(torch.int32), runtime.max_pages)
        decode = (qlens == 1).nonzero().flatten()
        prefill = (qlens > 1).nonzero().flatten()
        decode_table = table[decode].contiguous()
        rows, step_blocks = runtime.plan_step(seq_lens, table, decode, prefill)
        return FlexiMetadata(
            num_actual_tokens=m.num_actual_tokens,
            slot_mapping=m.slot_mapping,
            seq_lens=seq_lens,
            block_table=table,
            prefill_rows=prefill,
            prefill_tokens=[
                torch.arange(int(starts[r]), int(starts[r + 1])) for r in prefill.tolist()
            ],
            decode_tokens=starts[decode],
            decode_table=decode_table,
            decode_seq_lens=seq_lens[decode].contiguous(),
            decode_rows=rows,
            step_blocks=step_blocks,
        )


class FlexiCacheImpl(CPUAttentionBackendImpl):
    """Decoder self-attention with resident heads in vLLM's cache and stable heads pooled."""

    def __init__(
        self, num_heads: int, head_size: int, scale: float, num_kv_heads: int, *args, **kwargs
    ) -> None:
        super().__init__(num_heads, head_size, scale, num_kv_heads, *args, **kwargs)
        config = get_current_vllm_config()
        if self.sliding_window != -1 or self.alibi_slopes is not None or self.sinks is not None:
            raise ValueError(
                "kvhead FlexiCache supports plain causal attention only "
                "(no sliding window, ALiBi or sinks)"
            )
        dtype, block = config.model_config.dtype, config.cache_config.block_size
        # prefill stages into scratch blocks of stock's CPU size (32: vLLM's AMX kernel)
        prefill_block = PREFILL_BLOCK if PREFILL_BLOCK % block == 0 else block
        self.runtime: FlexiRuntime = init_runtime(
            config, _get_attn_isa(dtype, prefill_block, head_size), prefill_block
        )

    def forward(
        self,
        layer: AttentionLayer,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        kv_cache: torch.Tensor,
        attn_metadata: FlexiMetadata | None,
        output: torch.Tensor,
        output_scale: torch.Tensor | None = None,
        output_block_scale: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if attn_metadata is None:  # vLLM's warm-up and profiling runs carry no metadata
            return output
        flexi = self.runtime.layer(extract_layer_index(layer.layer_name), kv_cache.shape[0])
        m = attn_metadata
        count = m.num_actual_tokens
        flexi.write(key[:count], value[:count], m.slot_mapping[:count], kv_cache, m.step_blocks)
        q, out = query[:count], output[:count]
        if m.prefill_tokens:
            rows = m.prefill_rows
            flexi.prefill(
                q,
                out,
                m.prefill_tokens,
                m.seq_lens[rows],
                m.block_table[rows],
                kv_cache,
                self.scale,
            )
        if m.decode_tokens.numel():
            flexi.decode(
                q,
                out,
                m.decode_tokens,
                m.decode_seq_lens,
                m.decode_table,
                kv_cache,
                self.scale,
                m.decode_rows,
                m.step_blocks,
            )
        return output


def _fixed_width(block_table: torch.Tensor, width: int) -> torch.Tensor:
    """The block table cut or padded to the model's page count: one width for every step."""
    if block_table.shape[1] >= width:
        return block_table[:, :width]
    pad = block_table.new_zeros(block_table.shape[0], width - block_table.shape[1])
    return torch.cat([block_table, pad], dim=1)


class FlexiCacheBackend(CPUAttentionBackend):
    """Registered as vLLM's CUSTOM attention backend by :func:`kvhead.vllm.register`."""

    forward_includes_kv_cache_update = True

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        # vLLM's CPU kernels also run 16-token blocks (the vec16 path); FlexiCache pages are
        # usually 16 tokens, so K pages stay a small share of a long context.
        return [MultipleOf(16)]

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == "decoder"

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @staticmethod
    def get_impl_cls() -> type[FlexiCacheImpl]:
        return FlexiCacheImpl

    @staticmethod
    def get_builder_cls() -> type[FlexiCacheMetadataBuilder]:
        return FlexiCacheMetadataBuilder
