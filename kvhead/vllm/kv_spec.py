"""Per-layer KV-cache specs: each layer's vLLM cache holds exactly its resident heads.

vLLM's backend hook ``customize_spec`` sees a spec but not its layer, so it can only shrink every
layer alike. The model runner's ``get_kv_cache_spec`` knows layer names; wrapping it lets each
FlexiCache layer declare its own head count:

* layers with resident heads get ``num_kv_heads`` = that count. Full-attention specs that differ
  only in head count form one KV-cache group in vLLM 0.32 (``UniformTypeKVCacheSpecs``): one
  block table, one block id space (which the arena and hot pool key on), and a block's bytes are
  the sum of the layers' pages, so the allocator counts exactly the resident heads;
* layers with none are left out of the specs and registered as reading another layer's cache
  (vLLM's cross-layer KV sharing, ``shared_kv_cache_layers``): they allocate nothing, share the
  group's block table and never write that cache (the backend writes KV inside ``forward``, so
  vLLM's separate cache-update call, skipped for sharing layers, is not needed). vLLM 0.32 adds a
  sharing layer's name to its target's group but not to a ``UniformTypeKVCacheSpecs``' per-layer
  dict, which the runner then looks up; the second wrapper records the target's spec there (the
  layer reads exactly that cache). Block counts were fixed before, from the specs above.
"""

from __future__ import annotations

from dataclasses import replace

from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.kv_cache_interface import FullAttentionSpec, UniformTypeKVCacheSpecs

from kvhead.vllm.config import HeadSplit


def describe_sharing_layers(group: UniformTypeKVCacheSpecs, shared: dict[str, str]) -> None:
    """Give each sharing layer of ``group`` its target's per-layer spec."""
    specs = group.kv_cache_specs
    for name, target in shared.items():
        if target in specs and name not in specs:
            specs[name] = specs[target]


def flexicache_layers(vllm_config) -> dict:
    from vllm.model_executor.layers.attention import Attention

    from kvhead.vllm.backend import FlexiCacheImpl

    layers = vllm_config.compilation_config.static_forward_context
    return {
        name: layer
        for name, layer in layers.items()
        if isinstance(layer, Attention) and isinstance(layer.impl, FlexiCacheImpl)
    }


def per_layer_specs(specs: dict, split: HeadSplit, shared: dict[str, str], layers: dict) -> dict:
    """Specs with each FlexiCache layer cut to its resident heads; head-less layers move to
    ``shared`` (layer -> layer whose cache they read) and out of the returned specs."""
    counts = split.resident_per_layer
    out, headless = {}, []
    for name, spec in specs.items():
        if name not in layers or not isinstance(spec, FullAttentionSpec):
            out[name] = spec
            continue
        count = counts[extract_layer_index(name)]
        if count:
            out[name] = replace(spec, num_kv_heads=count)
        else:
            headless.append(name)
    target = next((n for n in out if n in layers), None)
    if headless and target is None:
        raise ValueError("kvhead: no layer keeps a head in vLLM's cache for others to share")
    for name in headless:
        shared[name] = target
        layers[name].kv_sharing_target_layer_name = target
    return out
