"""Reference runner: kvhead attention over the paged cache reproduces transformers' own."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from kvhead import kernels
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.models.tiny import build_tiny_llama


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(
        tmp_path_factory.mktemp("tiny"), num_layers=2, num_q_heads=4, num_kv_heads=2
    )


def _reference_logits(model_dir, ids):
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
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
    for mode, kw in [
        ("dense", {}),
        ("quest", {"top_k": 64}),
        ("flexicache", {"top_k": 64, "unstable": mask}),
    ]:
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


def _decode_observed(runner, cache, ids, start, policy):
    """Logits and (stable-head) selections of decoding ``ids[start:]`` one token at a time."""
    picks = []

    def observe(layer, sel):
        picks.append((layer, sel.page_ids.clone(), sel.num_pages.clone()))

    logits = torch.stack(
        [
            runner.forward(cache, ids[t : t + 1], policy=policy, observer=observe)[0]
            for t in range(start, len(ids))
        ]
    )
    return logits, picks


def test_kernel_route_end_to_end(tiny_dir, monkeypatch):
    """The GPU route (int8 live bounds kept by the cache, Triton selection in the policy) run
    through the runner; without CUDA the kernels are interpreted (tests/conftest.py)."""
    calls = []
    select_pages = kernels.select_pages

    def counted(*args, **kwargs):
        calls.append(args[0].shape)
        return select_pages(*args, **kwargs)

    monkeypatch.setattr(kernels, "select_pages", counted)

    ids = torch.randint(3, 500, (104,), generator=torch.Generator().manual_seed(3))
    runner = ReferenceRunner.from_pretrained(tiny_dir, page_size=8)
    cache = PagedKVCache(runner.num_layers, runner.spec, 110, live_bounds=True)
    runner.forward(cache, ids[:96])
    mask = torch.tensor([[True, False], [False, False]])
    everything = runner.policy("flexicache", top_k=64, unstable=mask, use_kernels=True)
    covered, _ = _decode_observed(runner, cache, ids[:100], 96, everything)
    cache.rewind(96)
    dense, _ = _decode_observed(runner, cache, ids[:100], 96, runner.policy("dense"))
    assert (covered - dense).abs().max() <= 1e-5

    small = {"top_k": 3, "unstable": mask, "rerank_interval": 2, "use_kernels": True}
    cache.rewind(96)
    first, picks = _decode_observed(runner, cache, ids, 96, runner.policy("flexicache", **small))
    cache.rewind(96)  # rebuilds the live bounds: the same decode must select the same pages
    again, picks_again = _decode_observed(
        runner, cache, ids, 96, runner.policy("flexicache", **small)
    )
    assert torch.equal(first, again)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(picks, picks_again))
    assert (first - dense[:1]).abs().max() > 0  # 3 of 13 pages: really sparse
    for _layer, page_ids, num_pages in picks:
        stable = page_ids[0, 1]  # layer's head 1 is stable in both layers
        chosen = stable[stable >= 0]
        newest = int(num_pages[0]) - 1
        assert newest in chosen.tolist()  # the newest (partial) page is always attended
        assert len(chosen) <= 3 + 2  # top-K plus the pages written since the last rerank
    assert calls  # the selections above came from the kernels, not the fp32 reference
