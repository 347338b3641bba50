"""Tiny random Llama checkpoints for fast tests.

Unit tests of the reference runner and the vLLM plugin need a real Hugging Face folder (config,
safetensors, tokenizer, chat template) that loads in seconds and never touches the network. This
module writes one from nothing: the tokenizer is a byte-level BPE trained in-process on a short
built-in text, and the weights are drawn from a seeded generator in a fixed order, so the same
arguments always give byte-identical files (tests can pin logits, and two engineers' folders match).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Built-in training text for the tokenizer. Plain prose, digits and a little code, so the merges
# cover what tests typically feed in (chat prompts, numbers for passkey-style checks).
_CORPUS = """\
The capital of France is Paris. The capital of Italy is Rome. The capital of Japan is Tokyo.
A language model reads a prompt and writes one token at a time. Each new token attends to the
keys and values of every token before it, which the server keeps in a paged cache.
Some attention heads look at the same pages step after step; others jump around the context.
The pass key is 12345. Remember it. The pass key is 67890. What is the pass key?
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 32 64 128 256 512 1024 2048 4096.
def add(a, b):
    return a + b
for i in range(10):
    print(i, add(i, i))
The user asks a question and the assistant answers it politely and briefly.
Hello! How are you today? I am fine, thank you. What is the weather like?
It is sunny in the morning, cloudy in the afternoon and raining in the evening.
Water boils at one hundred degrees Celsius at sea level and freezes at zero.
The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.
"""

BOS_TOKEN = "<|endoftext|>"
CHAT_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [BOS_TOKEN, CHAT_START, EOS_TOKEN]

# ChatML, the same shape SmolLM2 uses, so prompts built for the tiny model look like real ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)


def _build_tokenizer(vocab_size: int) -> Tokenizer:
    """Byte-level BPE with exactly ``vocab_size`` entries.

    The embedding table and the tokenizer must agree in size: vLLM detokenizes whatever id the
    random model samples, and an id with no token would fail there. When the short corpus runs
    out of merges, the remainder is filled with reserved special tokens.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.splitlines(), trainer=trainer)
    missing = vocab_size - tok.get_vocab_size()
    if missing > 0:
        tok.add_special_tokens([f"<|reserved_{i}|>" for i in range(missing)])
    return tok


def _random_weights(
    *,
    num_layers: int,
    hidden: int,
    intermediate: int,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    vocab_size: int,
    seed: int,
    dtype: torch.dtype,
) -> dict[str, torch.Tensor]:
    """Llama tensors under Hugging Face names, drawn in a fixed order from one seeded generator.

    Norm weights are ones (as a freshly initialised model has); everything else is N(0, 0.02).
    Embeddings are tied to the LM head, so there is no ``lm_head.weight``.
    """
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    tensors = {"model.embed_tokens.weight": normal(vocab_size, hidden)}
    for i in range(num_layers):
        p = f"model.layers.{i}."
        tensors[p + "self_attn.q_proj.weight"] = normal(num_q_heads * head_dim, hidden)
        tensors[p + "self_attn.k_proj.weight"] = normal(num_kv_heads * head_dim, hidden)
        tensors[p + "self_attn.v_proj.weight"] = normal(num_kv_heads * head_dim, hidden)
        tensors[p + "self_attn.o_proj.weight"] = normal(hidden, num_q_heads * head_dim)
        tensors[p + "mlp.gate_proj.weight"] = normal(intermediate, hidden)
        tensors[p + "mlp.up_proj.weight"] = normal(intermediate, hidden)
        tensors[p + "mlp.down_proj.weight"] = normal(hidden, intermediate)
        tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
        tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=dtype)
    tensors["model.norm.weight"] = torch.ones(hidden, dtype=dtype)
    return tensors


def build_tiny_llama(
    out_dir: str | Path,
    *,
    num_layers: int = 2,
    num_q_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 32,
    hidden: int = 64,
    vocab_size: int = 512,
    max_position_embeddings: int = 4096,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write a complete random Llama checkpoint folder and return its path.

    ``head_dim`` defaults to 32 because vLLM's CPU attention backend supports no smaller head
    size; a smaller one still works in transformers. ``dtype`` is the stored weight dtype
    (float32 by default, so reference-vs-sparse comparisons are not blurred by rounding).
    """
    if num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a multiple of num_kv_heads ({num_kv_heads})"
        )
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"vocab_size must be at least {_MIN_VOCAB} (256 bytes + specials)")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, not {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = _build_tokenizer(vocab_size)
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    intermediate = 2 * hidden
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_q_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[BOS_TOKEN],
        "dtype": dtype,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {
        "bos_token_id": ids[BOS_TOKEN],
        "eos_token_id": ids[EOS_TOKEN],
        "pad_token_id": ids[BOS_TOKEN],
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")

    weights = _random_weights(
        num_layers=num_layers,
        hidden=hidden,
        intermediate=intermediate,
        num_q_heads=num_q_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        vocab_size=vocab_size,
        seed=seed,
        dtype=_DTYPES[dtype],
    )
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    _save_tokenizer(tok, out, max_position_embeddings)
    return out


def _save_tokenizer(tok: Tokenizer, out: Path, model_max_length: int) -> None:
    """Save through transformers' fast-tokenizer wrapper, so the files (tokenizer_config.json,
    chat template) are in exactly the layout the installed transformers and vLLM read back."""
    from transformers import PreTrainedTokenizerFast

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=BOS_TOKEN,
        model_max_length=model_max_length,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    wrapped.save_pretrained(str(out))
