"""Check an engine configuration before any engine starts.

A replica refuses bad kvhead settings inside its worker, during vLLM's start-up; under Ray Serve
that refusal becomes a silent replica-restart loop. :func:`preflight` runs the same checks in the
caller's process, from the model folder alone, with the plugin's own code (settings parsing,
profile checks, the device budget split and the arena check), so a deployment fails with one
clear message before Ray starts anything.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from kvhead.vllm.config import (
    FlexiCacheConfigError,
    check_arena,
    settings_from_additional_config,
)
from kvhead.vllm.runtime import FlexiRuntime, ModelGeometry

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class EnginePlan:
    """What an engine with these settings will hold (numbers for the start-up banner)."""

    max_model_len: int  # tokens per request (the model's own limit unless set lower)
    num_blocks: int  # vLLM blocks the KV budget buys
    block_size: int
    dense_heads: int | None  # kv heads kept whole in vLLM's cache (None: stock vLLM)
    stable_heads: int | None
    host_arena_bytes: int  # host memory for stable-head pages (0 for stock vLLM)

    @property
    def cached_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class ModelShape:
    """The few facts of a Hugging Face ``config.json`` an engine plan needs."""

    num_layers: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    dtype: str

    @classmethod
    def read(cls, model_dir: str | Path) -> ModelShape:
        path = Path(model_dir) / "config.json"
        try:
            hf = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise FlexiCacheConfigError(f"cannot read the model's {path}: {err}") from None
        heads = hf["num_attention_heads"]
        return cls(
            num_layers=hf["num_hidden_layers"],
            num_q_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads", heads),
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            max_position_embeddings=hf["max_position_embeddings"],
            dtype=str(hf.get("torch_dtype") or hf.get("dtype") or "float32"),
        )


def preflight(
    model_dir: str | Path,
    kvhead: dict | None,
    *,
    max_model_len: int | None,
    max_num_seqs: int,
    block_size: int,
    kv_cache_bytes: int,
    dtype: str = "auto",
) -> EnginePlan:
    """The engine an ``engine_kwargs`` set would start, or :class:`FlexiCacheConfigError`.

    ``kvhead`` is the plugin's ``additional_config["kvhead"]`` block (None: stock vLLM).
    Refuses a context beyond the model's length, a KV budget that cannot hold one request of
    ``max_model_len`` tokens, and everything the plugin refuses at start-up.
    """
    shape = ModelShape.read(model_dir)
    limit = shape.max_position_embeddings
    if max_model_len is None:
        max_model_len = limit
    if max_model_len > limit:
        raise FlexiCacheConfigError(
            f"max_model_len {max_model_len} is beyond the model's context of {limit} tokens"
        )
    torch_dtype = _DTYPES.get(shape.dtype if dtype == "auto" else dtype)
    if torch_dtype is None:
        raise FlexiCacheConfigError(f"dtype {dtype!r} is not one of auto, {', '.join(_DTYPES)}")
    geo = ModelGeometry(
        num_layers=shape.num_layers,
        num_q_heads=shape.num_q_heads,
        num_kv_heads=shape.num_kv_heads,
        head_dim=shape.head_dim,
        page_size=block_size,
        dtype=torch_dtype,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
    )
    if kvhead is None:
        block_bytes = 2 * geo.num_layers * geo.num_kv_heads * geo.head_dim * block_size
        num_blocks = kv_cache_bytes // (block_bytes * torch_dtype.itemsize)
        plan = EnginePlan(max_model_len, num_blocks, block_size, None, None, 0)
    else:
        settings = settings_from_additional_config({"kvhead": kvhead})
        runtime = FlexiRuntime.plan(settings, model_dir, geo, prefix_caching=False)
        num_blocks = runtime.split_budget(kv_cache_bytes).num_blocks
        page_bytes = runtime.spec.head_page_bytes
        arena_pages = check_arena(settings, num_blocks * runtime.split.num_stable, page_bytes)
        plan = EnginePlan(
            max_model_len,
            num_blocks,
            block_size,
            runtime.split.num_resident,
            runtime.split.num_stable,
            arena_pages * page_bytes,
        )
    if plan.cached_tokens < max_model_len:
        raise FlexiCacheConfigError(
            f"a KV budget of {kv_cache_bytes / 2**30:.2f} GiB holds {plan.cached_tokens} tokens, "
            f"fewer than one request of max_model_len {max_model_len}: raise the KV budget or "
            "lower max_model_len"
        )
    return plan
