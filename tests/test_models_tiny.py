"""The tiny random Llama loads in transformers with the asked-for shape; same seed, same bytes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvhead.models.tiny import CHAT_TEMPLATE, build_tiny_llama


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


def test_loads_in_transformers_with_requested_shapes(tmp_path):
    out = build_tiny_llama(
        tmp_path,
        num_layers=3,
        num_q_heads=6,
        num_kv_heads=3,
        head_dim=32,
        hidden=96,
        vocab_size=400,
        max_position_embeddings=2048,
        seed=7,
    )
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (3, 6, 3)
    assert (cfg.head_dim, cfg.hidden_size, cfg.vocab_size) == (32, 96, 400)
    assert cfg.max_position_embeddings == 2048
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (6 * 32, 96)
    assert attn.k_proj.weight.shape == (3 * 32, 96)
    assert attn.o_proj.weight.shape == (96, 6 * 32)
    assert len(model.model.layers) == 3
    # Tied embeddings: the LM head is the embedding table, not a second random matrix.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert len(AutoTokenizer.from_pretrained(out)) == 400


def test_same_seed_same_bytes_other_seed_other_weights(tmp_path, tiny):
    again = build_tiny_llama(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny / name).read_bytes(), name
    other = load_file(str(build_tiny_llama(tmp_path / "seed1", seed=1) / "model.safetensors"))
    base = load_file(str(tiny / "model.safetensors"))
    assert not torch.equal(other["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    # Pinned values: a silent change of the drawing order would break other teams' pinned logits.
    emb = base["model.embed_tokens.weight"]
    assert emb.dtype == torch.float32
    assert emb.std().item() == pytest.approx(0.02, rel=0.05)
    expected = torch.randn(512, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    assert torch.equal(emb, expected)


def test_generation_is_deterministic_and_in_vocab(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    a = model.generate(ids, max_new_tokens=6, do_sample=False)
    b = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert torch.equal(a, b) and a.shape[1] == ids.shape[1] + 6
    assert int(a.max()) < len(tok)


def test_tokenizer_round_trips_and_chat_template(tiny):
    tok = AutoTokenizer.from_pretrained(tiny)
    text = "The pass key is 67890. What is the pass key?"
    ids = tok(text).input_ids
    assert tok.decode(ids) == text
    assert len(ids) < len(text) / 2  # merges were learned, not just bytes
    assert tok.chat_template == CHAT_TEMPLATE
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    config = json.loads((tiny / "config.json").read_text())
    assert tok.eos_token_id == config["eos_token_id"] == tok.convert_tokens_to_ids("<|im_end|>")


def test_small_vocab_is_padded_with_reserved_tokens(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tiny_llama(tmp_path, vocab_size=2000))
    assert len(tok) == 2000
    assert "<|reserved_0|>" in tok.get_vocab()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_q_heads": 4, "num_kv_heads": 3}, "multiple of num_kv_heads"),
        ({"vocab_size": 100}, "vocab_size must be at least"),
        ({"dtype": "int8"}, "dtype must be one of"),
    ],
)
def test_bad_arguments_are_refused(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_tiny_llama(tmp_path, **kwargs)
