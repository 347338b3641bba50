"""Cross-replica reuse: two kvhead processes on one Redis; the second skips the shared prefix.

The model is a tiny Llama built from a config with seeded random weights (nothing downloaded)
and saved once, so both processes load the same folder and compute the same fingerprint.
"""

from __future__ import annotations

import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch

PAGE = 16


def replica(model_dir: str, url: str, tokens: list[int], check_dense: bool) -> dict:
    """One kvhead process: prefill ``tokens`` through the store; report what it reused."""
    from transformers import AutoModelForCausalLM

    from kvhead.core.spec import HeadPageSpec
    from kvhead.core.stability import model_fingerprint
    from kvstore import HostArenaConfig, KVStoreConfig, RedisTierConfig, build_store
    from kvstore.prefill_reuse import prefill_with_store

    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    spec = HeadPageSpec(
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
        page_size=PAGE,
        dtype=torch.float32,
    )
    store = build_store(
        KVStoreConfig(
            host=HostArenaConfig(
                capacity_pages=512, num_layers=cfg.num_hidden_layers, num_blocks=64
            ),
            redis=RedisTierConfig(url=url),
        ),
        spec,
        model_fingerprint(model_dir),
    )
    ids = torch.tensor(tokens)
    logits, _, report = prefill_with_store(model, ids, store)
    assert store.flush(30)
    result = {
        "reused_pages": report.reused_pages,
        "reused_tokens": report.reused_tokens,
        "computed_tokens": report.computed_tokens,
        "saved": report.saved_fraction,
        "published": report.published_pages,
    }
    if check_dense:
        with torch.no_grad():
            dense = model(ids.unsqueeze(0)).logits[0, -1]
        result["max_logit_diff"] = float((dense - logits).abs().max())
        result["same_argmax"] = bool(dense.argmax() == logits.argmax())
    store.close()
    return result


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        max_position_embeddings=1024,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.mark.slow
def test_second_process_reuses_the_first_ones_prefix_pages(redis_srv, tiny_model):
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(0, 512, (80,), generator=g).tolist()  # 5 full pages
    first = shared + torch.randint(0, 512, (7,), generator=g).tolist()
    second = shared[:72] + torch.randint(0, 512, (40,), generator=g).tolist()
    ctx = mp.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # a fresh process per replica
        a = pool.submit(replica, str(tiny_model), redis_srv.url, first, False).result()
    with ProcessPoolExecutor(1, mp_context=ctx) as pool:  # nothing shared with a but Redis
        b = pool.submit(replica, str(tiny_model), redis_srv.url, second, True).result()
    assert a["reused_pages"] == 0 and a["published"] == 5 * 2 * 2
    # 72 shared tokens = 4 full shared pages (page 4 differs from token 72 on)
    assert b["reused_pages"] == 4 and b["reused_tokens"] == 64
    assert b["computed_tokens"] == len(second) - 64
    assert b["saved"] == pytest.approx(64 / len(second))
    assert b["same_argmax"] and b["max_logit_diff"] < 1e-4
    print(
        f"\nreplica 2 skipped {b['reused_tokens']} of {len(second)} prefill tokens "
        f"({b['saved']:.0%}); max |logit diff| vs dense {b['max_logit_diff']:.2e}"
    )
