"""The plugin's device memory comes out of vLLM's KV budget (kvhead.vllm.budget)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvhead.core.stability import HeadProfile, model_fingerprint
from kvhead.models.tiny import build_tiny_llama
from kvhead.vllm.budget import BudgetSplit
from kvhead.vllm.config import FlexiCacheConfigError

BUDGET = 16 * 2**20
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
ENV.pop("VLLM_CPU_KVCACHE_SPACE", None)  # it would override the fixed kv_cache_memory_bytes


def test_split_solves_for_blocks_and_stays_in_budget() -> None:
    split = BudgetSplit.solve(
        10_000, kv_bytes_per_block=100, plugin_bytes_per_block=25, plugin_fixed_bytes=1_000
    )
    assert split.num_blocks == 72  # (10000 - 1000) // 125
    assert split.vllm_bytes == 7_200
    assert split.plugin_bytes == 1_000 + 72 * 25
    assert (
        split.vllm_bytes + split.plugin_bytes
        <= 10_000
        < (split.vllm_bytes + split.plugin_bytes + 125)
    )


def test_hot_pool_never_costs_more_than_every_stable_page_of_every_block() -> None:
    # pool sized for 100 blocks' pages: more blocks than that fit, so it is a fixed 100 x 50
    large = BudgetSplit.solve(
        100_000,
        kv_bytes_per_block=100,
        plugin_bytes_per_block=25,
        plugin_fixed_bytes=1_000,
        pool_bytes_per_block=50,
        pool_max_blocks=100,
    )
    assert large.num_blocks == (100_000 - 1_000 - 5_000) // 125 == 752
    assert large.pool_bytes == 5_000
    # a small budget holds fewer blocks than the pool is sized for: it costs 50 per block
    small = BudgetSplit.solve(
        10_000,
        kv_bytes_per_block=100,
        plugin_bytes_per_block=25,
        plugin_fixed_bytes=1_000,
        pool_bytes_per_block=50,
        pool_max_blocks=100,
    )
    assert small.num_blocks == 9_000 // 175 == 51
    assert (
        small.vllm_bytes + small.plugin_bytes
        <= 10_000
        < (small.vllm_bytes + small.plugin_bytes + 175)
    )


def test_budget_below_fixed_memory_is_a_clear_error() -> None:
    with pytest.raises(FlexiCacheConfigError, match="raise the KV budget"):
        BudgetSplit.solve(
            1_100, kv_bytes_per_block=100, plugin_bytes_per_block=25, plugin_fixed_bytes=1_000
        )


def test_hot_pool_sized_by_per_head_budgets_stays_inside_the_split() -> None:
    """With head budgets each layer's pool holds its own stable heads' K + tail per sequence,
    and the pools of all layers stay inside what the budget split charged for them."""
    from kvhead.vllm.config import FlexiCacheSettings, HeadSplit
    from kvhead.vllm.runtime import FlexiRuntime, ModelGeometry

    resident = torch.tensor([[True, True, True], [True, False, False], [False, False, False]])
    budgets = torch.tensor([[64, 64, 64], [64, 100, 20], [8, 60, 60]])  # stable: 5 x 60 pages
    settings = FlexiCacheSettings(
        profile="p.json", top_k=60, rerank_interval=16, unstable_dense=True, head_budgets=True
    )
    geo = ModelGeometry(
        num_layers=3,
        num_q_heads=6,
        num_kv_heads=3,
        head_dim=32,
        page_size=16,
        dtype=torch.bfloat16,
        max_model_len=4096,
        max_num_seqs=4,
    )
    runtime = FlexiRuntime(settings, HeadSplit(resident), geo, "vec", 16, budgets)
    assert runtime.tail_pages == 2
    assert [runtime.pool_pages(10_000, i) for i in range(3)] == [0, 4 * 124, 4 * 134]
    assert runtime.pool_pages(100, 2) == 300  # never more than every stable page of the blocks
    assert runtime.ranking(1).budgets.tolist() == [64, 100, 20]
    split = runtime.split_budget(64 * 2**20)
    pools = sum(runtime.pool_pages(split.num_blocks, i) for i in range(3))
    assert pools * runtime.spec.head_page_bytes <= split.pool_bytes
    spec_runtime = FlexiRuntime(
        settings.model_copy(update={"unstable_dense": False, "head_budgets": False}),
        HeadSplit(resident),
        geo,
        "vec",
        16,
    )
    spec = spec_runtime.ranking(1)  # the spec's ranking: K pages each, Quest's bound, newest kept
    assert spec.budgets.tolist() == [60, 60, 60]
    assert (spec.sink_pages, spec.recent_pages, spec.group_score, spec.bound_weight) == (
        0,
        1,
        "max",
        1.0,
    )


def _run(tmp: Path, name: str, model: Path, prompts: Path, kvhead: dict | None) -> dict:
    out = tmp / f"{name}.json"
    cmd = [
        sys.executable,
        "-m",
        "kvhead.vllm.generate",
        str(model),
        str(prompts),
        str(out),
        "--block-size",
        "32",
        "--kv-cache-bytes",
        str(BUDGET),
        "--max-model-len",
        "512",
        "--max-num-seqs",
        "8",
        "--max-tokens",
        "8",
        "--in-process",
    ]
    if kvhead is not None:
        settings = tmp / f"{name}-settings.json"
        settings.write_text(json.dumps(kvhead))
        cmd += ["--kvhead", str(settings)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=900, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()) | {"log": proc.stderr}


@pytest.mark.slow
def test_engine_allocates_the_solved_block_count_within_budget(tmp_path: Path) -> None:
    layers, kv_heads, dim, page, elem = 2, 2, 32, 32, 2  # tiny Llama in bf16
    model = build_tiny_llama(
        tmp_path / "tiny",
        num_layers=layers,
        num_q_heads=4,
        num_kv_heads=kv_heads,
        head_dim=dim,
        hidden=64,
    )
    scores = torch.rand(layers, kv_heads, generator=torch.Generator().manual_seed(0))
    profile = HeadProfile.from_scores(  # one resident and one stable head per layer
        scores,
        fraction=0.5,
        per_layer=True,
        model_fingerprint=model_fingerprint(model),
        page_size=page,
        top_k=2,
        window=4,
    ).save(tmp_path / "profile.json")
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([[5 + i] * n for i, n in enumerate((40, 77, 150))]))
    settings = {"profile": str(profile), "top_k": 4, "rerank_interval": 4, "host_arena_gib": 0.25}
    stock = _run(tmp_path, "stock", model, prompts, None)
    run = _run(tmp_path, "kvhead", model, prompts, settings)

    head_page = 2 * page * dim * elem
    stock_block = layers * kv_heads * head_page
    assert stock["num_gpu_blocks"] == BUDGET // stock_block
    assert stock["vllm_kv_cache_bytes"] == stock["num_gpu_blocks"] * stock_block

    # hot pool: 8 sequences x 1 stable head x (K=4 + 2 tail pages), page + owner + free entry
    # (fewer than the blocks, so a fixed size); open-page table: 4 x 8 entries x (fp32 min and
    # max of 2 heads + tag and clock)
    fixed = layers * (8 * 6 * (head_page + 16) + 32 * (2 * kv_heads * dim * 4 + 16))
    kv_block = layers * 1 * head_page
    plugin_block = layers * (kv_heads * (2 * dim + 4) + 1 * 8)  # int8 boxes + scales, pool index
    blocks = (BUDGET - fixed) // (kv_block + plugin_block)
    assert run["num_gpu_blocks"] == blocks
    assert run["kvhead"]["budget_split"]["num_blocks"] == blocks
    assert "kvhead KV budget 16.0 MiB = vLLM cache" in run["log"]

    # measured: vLLM's cache tensors plus the bounds and hot pools the runtime allocated
    vllm_bytes = run["vllm_kv_cache_bytes"]
    plugin_bytes = run["kvhead"]["page_meta_bytes"] + run["kvhead"]["hot_pool_bytes_allocated"]
    assert vllm_bytes == blocks * kv_block
    assert plugin_bytes == fixed + blocks * plugin_block
    assert BUDGET - (kv_block + plugin_block) < vllm_bytes + plugin_bytes <= BUDGET
