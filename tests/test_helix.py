"""Helix decode on 1, 2 and 4 gloo ranks against one device, the layout planner and placement.

Each world size is one launch of forked ranks that runs every case of that size (a launch costs
far more than a tiny decode); the results are cached and each test asserts one case.
"""

from __future__ import annotations

import functools

import pytest
import torch

from kvhead.core.helix import (
    HelixLayout,
    comm_bytes_per_token,
    kv_owner,
    local_len,
    local_positions,
    plan_layout,
)
from kvhead.eval.helix import HelixRank, OneDevice, run_ranks
from kvhead.eval.llama_layers import BlockShape, Llama, random_layer
from kvhead.models.tiny import build_tiny_llama

GQA8 = BlockShape(hidden=32, intermediate=64, num_q_heads=8, num_kv_heads=2, head_dim=8)
GQA4 = BlockShape(hidden=32, intermediate=64, num_q_heads=4, num_kv_heads=2, head_dim=8)
LAYERS, STEPS = 2, 6
LENS = [0, 3, 13]  # with B = 4 and KVP 2 or 4, some ranks start with no token of a sequence

# world size -> (layout, shape, dtype) cases run in that world's one launch
CASES = {
    1: [(HelixLayout(kvp=1, tp=1, block=4), GQA8, torch.float32)],
    2: [
        (HelixLayout(kvp=2, tp=1, block=4), GQA8, torch.float32),
        (HelixLayout(kvp=1, tp=2, block=4), GQA8, torch.float32),
        (HelixLayout(kvp=2, tp=1, block=4), GQA8, torch.bfloat16),
    ],
    4: [
        (HelixLayout(kvp=4, tp=1, block=4), GQA8, torch.float32),
        (HelixLayout(kvp=2, tp=2, block=4), GQA4, torch.float32),
    ],
}
CASE_IDS = [(w, i) for w, cases in CASES.items() for i in range(len(cases))]
LLAMA_LAYOUTS = {2: HelixLayout(kvp=2, tp=1, block=2), 4: HelixLayout(kvp=2, tp=2, block=2)}


def _inputs(shape: BlockShape, dtype: torch.dtype, seed: int = 0):
    """Weights, a ragged context (post-RoPE K/V per layer) and the hidden inputs of STEPS steps."""
    g = torch.Generator().manual_seed(seed)
    layers = [random_layer(shape, seed + i, dtype, std=0.3) for i in range(LAYERS)]
    kv = (len(LENS), max(LENS), shape.num_kv_heads, shape.head_dim)
    keys = [torch.randn(*kv, generator=g).to(dtype) for _ in range(LAYERS)]
    values = [torch.randn(*kv, generator=g).to(dtype) for _ in range(LAYERS)]
    xs = torch.randn(STEPS, len(LENS), shape.hidden, generator=g).to(dtype)
    return layers, keys, values, xs


def _one_device(shape, layers, keys, values, xs) -> torch.Tensor:
    dec = OneDevice(shape, layers, len(LENS), max(LENS) + STEPS)
    dec.load_context(keys, values, LENS)
    return torch.stack([dec.step(x) for x in xs])


def _rank_job(cases, llama_dir, llama_layout, prompt):
    """On every rank: each block case's decode outputs and all-to-all bytes, then the tiny
    Llama's logits at every prompt position (the prompt fed token by token)."""
    results = []
    for layout, shape, dtype in cases:
        layers, keys, values, xs = _inputs(shape, dtype)
        dec = HelixRank(shape, layers, layout, len(LENS), max(LENS) + STEPS, page=2)
        dec.load_context(keys, values, LENS)
        results.append((torch.stack([dec.step(x) for x in xs]), dec.bytes_sent))
    if llama_layout is None:
        return results, None
    llama = Llama.load(llama_dir)
    dec = HelixRank(llama.shape, llama.layers, llama_layout, prompt.shape[0], prompt.shape[1])
    return results, torch.stack([llama.logits(dec, tokens) for tokens in prompt.T], dim=1)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=2, hidden=64)


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def launch(llama_dir, prompt):
    """``launch(world)``: that world's per-rank results, computed once."""

    @functools.cache
    def run(world: int):
        layout = LLAMA_LAYOUTS.get(world)
        return run_ranks(world, _rank_job, CASES[world], llama_dir, layout, prompt)

    return run


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max() / expected.float().abs().max())


@pytest.mark.parametrize(("world", "case"), CASE_IDS)
def test_helix_decode_equals_one_device(launch, world, case):
    layout, shape, dtype = CASES[world][case]
    expected = _one_device(shape, *_inputs(shape, dtype))
    tolerance = 1e-5 if dtype == torch.float32 else 5e-2
    for rank, (results, _) in enumerate(launch(world)):
        assert _rel(results[case][0], expected) <= tolerance, f"rank {rank}"


@pytest.mark.parametrize(("world", "case"), CASE_IDS)
def test_all_to_all_bytes_match_formula(launch, world, case):
    layout, shape, dtype = CASES[world][case]
    dtype_bytes = torch.empty((), dtype=dtype).element_size()
    per_step = comm_bytes_per_token(
        layout, shape.num_q_heads, shape.head_dim, len(LENS), dtype_bytes
    )
    assert (per_step == 0) == (layout.kvp == 1)
    for results, _ in launch(world):
        assert results[case][1] == STEPS * LAYERS * per_step


@pytest.mark.parametrize("world", sorted(LLAMA_LAYOUTS))
def test_helix_tiny_llama_matches_transformers(launch, llama_dir, prompt, world):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        expected = hf(input_ids=prompt).logits
    llama = Llama.load(llama_dir)
    one = OneDevice(llama.shape, llama.layers, prompt.shape[0], prompt.shape[1])
    single = torch.stack([llama.logits(one, tokens) for tokens in prompt.T], dim=1)
    assert _rel(single, expected) <= 1e-5
    for _, logits in launch(world):
        assert _rel(logits, expected) <= 1e-5


def test_the_cases_leave_some_ranks_empty():
    layout = HelixLayout(kvp=4, tp=1, block=4)
    assert [local_len(layout, k, LENS[1]) for k in range(4)] == [3, 0, 0, 0]
    assert [local_len(layout, k, LENS[2]) for k in range(4)] == [4, 4, 4, 1]


def test_round_robin_placement_example():
    layout = HelixLayout(kvp=3, tp=1, block=2)
    shards = [local_positions(layout, k, 13).tolist() for k in range(3)]
    assert shards == [[0, 1, 6, 7, 12], [2, 3, 8, 9], [4, 5, 10, 11]]
    assert kv_owner(layout, 7) == 0 and kv_owner(layout, 10) == 2


@pytest.mark.parametrize("kvp", [1, 2, 3, 4])
@pytest.mark.parametrize("block", [1, 3, 4])
def test_placement_partitions_every_sequence(kvp, block):
    layout = HelixLayout(kvp=kvp, tp=1, block=block)
    for seq_len in range(0, 3 * kvp * block + 2):
        shards = [local_positions(layout, k, seq_len) for k in range(kvp)]
        assert sorted(torch.cat(shards).tolist()) == list(range(seq_len))
        for k, positions in enumerate(shards):
            assert len(positions) == local_len(layout, k, seq_len)
            assert (kv_owner(layout, positions) == k).all()


def test_heads_are_owned_once():
    layout = HelixLayout(kvp=2, tp=2)
    owned = [h for r in range(4) for h in layout.owned_q_heads(8, r)]
    assert sorted(owned) == list(range(8))
    assert [layout.coords(r) for r in range(4)] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert layout.kvp_group(1) == [1, 3]
    assert list(layout.kv_heads(4, 3)) == [2, 3] and list(layout.slice_q_heads(8, 3)) == [
        4,
        5,
        6,
        7,
    ]
    assert list(layout.owned_q_heads(8, 3)) == [6, 7]  # second KVP chunk of slice 1


def test_comm_bytes_formula():
    # (KVP - 1)/KVP * batch * Hq/TP * (d * dtype_bytes + 4): 1/2 * 1 * 32 * (2 * 128 + 4)
    assert comm_bytes_per_token(HelixLayout(kvp=2, tp=1), 32, 128, 1, 2) == 4160
    # 3/4 * 8 * 32/2 * (4 * 64 + 4)
    assert comm_bytes_per_token(HelixLayout(kvp=4, tp=2), 32, 64, 8, 4) == 24960
    assert comm_bytes_per_token(HelixLayout(kvp=1, tp=8), 32, 128, 4, 2) == 0


def test_planner_choices():
    assert plan_layout(8, 32, 16) == HelixLayout(kvp=2, tp=8)
    assert plan_layout(2, 8, 4, block=4) == HelixLayout(kvp=2, tp=2, block=4)
    assert plan_layout(8, 32, 4, tp=1) == HelixLayout(kvp=4, tp=1)
    assert plan_layout(8, 32, 1) == HelixLayout(kvp=1, tp=1)


@pytest.mark.parametrize(
    ("kv", "q", "world", "tp", "rule"),
    [
        (2, 8, 4, 4, "TP ≤ KV heads"),
        (4, 8, 6, 3, "TP divides the heads"),
        (4, 8, 6, 4, "N = KVP × TP"),
        (2, 8, 6, 2, "N divides the query heads"),
        (2, 8, 16, None, "N divides the query heads"),
        (3, 8, 3, None, "multiple of num_kv_heads"),
        (2, 8, 0, None, "world_size must be at least 1"),
    ],
)
def test_planner_refusals_name_the_rule(kv, q, world, tp, rule):
    with pytest.raises(ValueError, match=rule):
        plan_layout(kv, q, world, tp=tp)


def test_layout_refuses_bad_sizes():
    with pytest.raises(ValueError, match="block must be at least 1"):
        HelixLayout(kvp=2, tp=1, block=0)
    with pytest.raises(ValueError, match="outside a world of 4"):
        HelixLayout(kvp=2, tp=2).coords(4)
