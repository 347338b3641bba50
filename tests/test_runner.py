"""Reference runner: kvhead attention over the paged cache reproduces transformers' own."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvhead.models.tiny import build_tiny_llama
from kvhead.runner import ReferenceRunner


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=2, num_q_heads=4, num_kv_heads=2)


def _reference_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    with torch.inference_mode():
        return model(ids.unsqueeze(0)).logits[0]


def test_prefill_and_dense_decode_match_transformers(tiny_dir):
    ids = torch.randint(3, 500, (75,), generator=torch.Generator().manual_seed(0))
    ref = _reference_logits(tiny_dir, ids)
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = runner.new_cache(100)
    prefill = runner.forward(cache, ids[:50], all_logits=True)
    assert (prefill - ref[:50]).abs().max() < 1e-4
    extend = runner.forward(cache, ids[50:60], all_logits=True)  # chunked prefill after a prefix
    assert (extend - ref[50:60]).abs().max() < 1e-4
    policy = runner.policy("dense")
    for t in range(60, 75):
        logits = runner.forward(cache, ids[t : t + 1], policy=policy)
        assert (logits[0] - ref[t]).abs().max() < 1e-4


def test_sparse_with_k_covering_everything_equals_dense(tiny_dir):
    ids = torch.randint(3, 500, (90,), generator=torch.Generator().manual_seed(1))
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = runner.new_cache(100)
    runner.forward(cache, ids[:70])
    mask = torch.tensor([[True, False], [False, False]])
    outputs = {}
    for mode, kw in [("dense", {}), ("quest", {"top_k": 64}), ("flexicache", {"top_k": 64, "unstable": mask})]:
        cache.rewind(70)
        policy = runner.policy(mode, **kw)
        outputs[mode] = torch.stack(
            [runner.forward(cache, ids[t : t + 1], policy=policy)[0] for t in range(70, 90)]
        )
    assert (outputs["quest"] - outputs["dense"]).abs().max() <= 1e-5
    assert (outputs["flexicache"] - outputs["dense"]).abs().max() <= 1e-5


def test_small_k_changes_logits_and_rewind_restores_bounds(tiny_dir):
    ids = torch.randint(3, 500, (130,), generator=torch.Generator().manual_seed(2))
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = runner.new_cache(140)
    runner.forward(cache, ids[:100])
    before = [b.kmax.clone() for b in cache.bounds]
    policy = runner.policy("quest", top_k=2)
    runner.forward(cache, ids[100:101], policy=policy)
    sparse = runner.forward(cache, ids[101:102], policy=policy)
    cache.rewind(100)
    assert all(torch.equal(b.kmax[:13], a[:13]) for a, b in zip(before, cache.bounds))
    runner.forward(cache, ids[100:101], policy=runner.policy("dense"))
    dense = runner.forward(cache, ids[101:102], policy=runner.policy("dense"))
    assert (sparse - dense).abs().max() > 1e-4  # 2 of 13 pages really is a different computation


def test_cache_overflow_is_a_clear_error(tiny_dir):
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = runner.new_cache(16)
    with pytest.raises(ValueError, match="exceeds"):
        runner.forward(cache, torch.arange(3, 20))
    with pytest.raises(ValueError, match="rewind"):
        cache.rewind(5)
