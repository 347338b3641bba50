"""Run a Hugging Face Llama-family model with kvhead attention over its own paged cache.

transformers lets a model call a registered attention function by name; ours, ``"kvhead"``,
writes each layer's new keys/values into a :class:`PagedKVCache`, attends densely (causal) for
prefill and through a :class:`SelectionPolicy` for single-token decode. Prefill is always dense,
as in FlexiCache: only decode steps read a subset of pages. This runner is the accuracy oracle,
the profiler's driver and the GPU end-to-end benchmark's engine.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AutoModelForCausalLM, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface

from kvhead import kernels
from kvhead.core.attention import sparse_decode_attention
from kvhead.core.policy import LayerSelection, SelectionPolicy
from kvhead.core.spec import HeadPageSpec
from kvhead.core.summaries import compensate
from kvhead.eval.paged_cache import PagedKVCache

ATTN_NAME = "kvhead"
SelectionObserver = Callable[[int, LayerSelection], None]


def _decode_kernel(device: torch.device) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """Triton sparse decode on CUDA when the kernels package is importable; torch otherwise."""
    if device.type == "cuda":
        try:
            from kvhead.kernels import sparse_decode_attention as triton_decode
        except ImportError:
            return sparse_decode_attention
        return triton_decode
    return sparse_decode_attention


@dataclass
class _ForwardContext:
    """What the attention function needs for one forward pass; passed through model kwargs."""

    cache: PagedKVCache
    policy: SelectionPolicy | None
    observer: SelectionObserver | None
    decode_kernel: Callable[..., tuple[torch.Tensor, torch.Tensor]]

    def attend(
        self,
        layer: int,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        batch, _, count, _ = query.shape
        if batch != 1:
            raise ValueError("the reference runner decodes one sequence at a time")
        cache = self.cache
        cache.write(layer, key[0].transpose(0, 1), value[0].transpose(0, 1))
        total = cache.length + count
        if count == 1 and self.policy is not None:
            seq_lens = torch.tensor([total], device=query.device)
            q = query[:, :, 0]
            sel = self.policy.select(
                layer, q, cache.bounds[layer], cache.block_table, seq_lens, live=cache.live[layer]
            )  # int8 bounds (CUDA), else None
            if self.observer is not None:
                self.observer(layer, sel)
            out, lse = self.decode_kernel(
                q, cache.k[layer], cache.v[layer], cache.block_table, seq_lens, sel.page_ids, scale
            )
            if sel.compensate:
                out = compensate(
                    out,
                    lse,
                    q,
                    cache.bounds[layer],
                    cache.value_sums[layer],
                    cache.block_table,
                    seq_lens,
                    sel.page_ids,
                    cache.spec.page_size,
                    scale,
                )
            return out.unsqueeze(1)
        keys, values = cache.keys_values(layer, total)
        keys = keys.transpose(0, 1).unsqueeze(0).to(query.dtype)
        values = values.transpose(0, 1).unsqueeze(0).to(query.dtype)
        if cache.length == 0:
            out = F.scaled_dot_product_attention(
                query, keys, values, is_causal=True, scale=scale, enable_gqa=True
            )
        else:
            rows = torch.arange(cache.length, total, device=query.device).view(-1, 1)
            mask = torch.arange(total, device=query.device).view(1, -1) <= rows
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=mask, scale=scale, enable_gqa=True
            )
        return out.transpose(1, 2)


def _kvhead_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    ctx: _ForwardContext = kwargs["kvhead_ctx"]
    return ctx.attend(module.layer_idx, query, key, value, scaling), None


def _no_mask(*args, **kwargs) -> None:
    """kvhead attention builds its own causal structure; skip transformers' mask."""
    return


AttentionInterface.register(ATTN_NAME, _kvhead_attention)
AttentionMaskInterface.register(ATTN_NAME, _no_mask)


class ReferenceRunner:
    """Prefill and decode one sequence at a time, choosing the decode policy per call."""

    def __init__(self, model: PreTrainedModel, page_size: int = 16) -> None:
        config = model.config
        model.set_attn_implementation(ATTN_NAME)
        self.model = model.eval()
        self.num_layers = config.num_hidden_layers
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        self.spec = HeadPageSpec(
            num_q_heads=config.num_attention_heads,
            num_kv_heads=config.num_key_value_heads,
            head_dim=head_dim,
            page_size=page_size,
            dtype=model.dtype,
        )
        self.device = next(model.parameters()).device
        self._decode_kernel = _decode_kernel(self.device)
        self._threads = torch.get_num_threads()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        page_size: int = 16,
    ) -> ReferenceRunner:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
        return cls(model, page_size=page_size)

    def new_cache(self, max_tokens: int) -> PagedKVCache:
        return PagedKVCache(self.num_layers, self.spec, max_tokens, device=self.device)

    def policy(self, mode: str, **kwargs) -> SelectionPolicy:
        """A selection policy sized for this model, with the kernel dispatch for the spec's
        selection on CUDA."""
        return SelectionPolicy(
            mode=mode,
            num_layers=self.num_layers,
            num_kv_heads=self.spec.num_kv_heads,
            page_size=self.spec.page_size,
            kernels=kernels,
            **kwargs,
        )

    @torch.inference_mode()
    def forward(
        self,
        cache: PagedKVCache,
        token_ids: torch.Tensor,
        *,
        policy: SelectionPolicy | None = None,
        observer: SelectionObserver | None = None,
        all_logits: bool = False,
    ) -> torch.Tensor:
        """Append ``token_ids [T]`` and return fp32 logits for the last (or every) position.

        Single-token calls with a policy decode sparsely; everything else attends densely.
        """
        count = token_ids.shape[0]
        # A CPU decode step is hundreds of tiny ops: OpenMP fork/join costs more than it saves
        # (10-20x slower on a loaded 2-core machine), while prefill matmuls do use the cores.
        if self.device.type == "cpu":
            torch.set_num_threads(1 if count == 1 else self._threads)
        positions = torch.arange(cache.length, cache.length + count, device=self.device)
        ctx = _ForwardContext(cache, policy, observer, self._decode_kernel)
        out = self.model(
            input_ids=token_ids.to(self.device).unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=0 if all_logits else 1,
            kvhead_ctx=ctx,
        )
        cache.advance(count)
        return out.logits[0].float()
