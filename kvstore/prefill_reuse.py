"""Prefix reuse for a Hugging Face causal LM: fetch shared pages instead of recomputing them.

The reference path for cross-replica reuse (vLLM's plugin does the same through its own cache):
hash the prompt's full pages, ask the store how many leading pages every (layer, head) has,
load those into a ``DynamicCache``, run the model only on the remaining tokens, then publish
the prompt's full pages for the next replica. Keys are post-RoPE, so a page is only valid at
its original positions -- which the chained prefix hash guarantees.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from kvstore.base import PageKeys
from kvstore.manager import TierManager
from kvstore.prefix import prefix_hashes


@dataclass(frozen=True)
class PrefillReport:
    """What one prefill reused and computed; ``saved_fraction`` is the prefill work skipped."""

    prompt_tokens: int
    reused_pages: int
    reused_tokens: int
    computed_tokens: int
    published_pages: int
    seconds: float

    @property
    def saved_fraction(self) -> float:
        return self.reused_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


def _page_keys(store: TierManager, layer: int, prefix: torch.Tensor, first: int = 0) -> PageKeys:
    """Pages ``first..`` of ``prefix``, rows page-major and head-minor; block id = page index
    (the HF path has no block allocator)."""
    heads = store.spec.num_kv_heads
    pages = torch.arange(first, len(prefix)).repeat_interleave(heads)
    return PageKeys(
        layer, pages, torch.arange(heads).repeat(len(prefix) - first), prefix[pages], pages
    )


@torch.no_grad()
def prefill_with_store(
    model: torch.nn.Module, token_ids: torch.Tensor, store: TierManager, *, publish: bool = True
) -> tuple[torch.Tensor, DynamicCache, PrefillReport]:
    """Prefill ``token_ids [T]`` reusing stored pages; returns (last logits, cache, report)."""
    start = time.perf_counter()
    spec, layers = store.spec, model.config.num_hidden_layers
    p, heads, d = spec.page_size, spec.num_kv_heads, spec.head_dim
    prefix = prefix_hashes(token_ids, p)
    reuse = store.match_prefix(prefix, layers)
    reuse = min(reuse, (len(token_ids) - 1) // p)  # keep one token to produce logits
    cache = DynamicCache(config=model.config)
    if reuse:
        for layer in range(layers):
            got = store.get(_page_keys(store, layer, prefix[:reuse]))
            if not bool(got.found.all()):  # evicted since the match: recompute everything
                cache, reuse = DynamicCache(config=model.config), 0
                break
            k, v = (
                x.view(reuse, heads, p, d).transpose(0, 1).reshape(1, heads, reuse * p, d)
                for x in (got.k, got.v)
            )
            cache.update(k.to(model.dtype), v.to(model.dtype), layer)
    out = model(token_ids[reuse * p :].unsqueeze(0), past_key_values=cache, use_cache=True)
    cache = out.past_key_values
    published = 0
    fresh = len(prefix) - reuse  # full pages computed here; reused ones are already shared
    if publish and fresh > 0:
        for layer in range(layers):
            k, v = (
                t[0, :, reuse * p : len(prefix) * p]
                .reshape(heads, fresh, p, d)
                .transpose(0, 1)
                .reshape(-1, p, d)
                for t in (cache.layers[layer].keys, cache.layers[layer].values)
            )
            keys = _page_keys(store, layer, prefix, first=reuse)
            store.put(keys, k.to(spec.dtype), v.to(spec.dtype))
        published = fresh * heads * layers
    report = PrefillReport(
        len(token_ids),
        reuse,
        reuse * p,
        len(token_ids) - reuse * p,
        published,
        time.perf_counter() - start,
    )
    return out.logits[0, -1], cache, report
