"""Real runs: pull SmolLM2 from PyPI and convert it; serve the tiny model with the real vLLM.

Both take minutes on a shared 2-core machine, hence ``slow``; both still run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from kvhead.models import pull, store
from kvhead.models.convert import inspect_gguf
from kvhead.models.registry import REGISTRY
from kvhead.models.tiny import build_tiny_llama

# Runs in a fresh interpreter: vLLM starts worker processes, which needs a __main__ guard.
_VLLM_SCRIPT = textwrap.dedent("""
    import json, sys

    if __name__ == "__main__":
        from vllm import LLM, SamplingParams

        llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=512, enforce_eager=True,
                  seed=0)
        params = SamplingParams(temperature=0.0, max_tokens=8, logprobs=0, ignore_eos=True)
        prompts = ["The capital of France is", "The pass key is 12345. What is the pass key?"]
        result = []
        for out in llm.generate(prompts, params):
            gen = out.outputs[0]
            result.append({
                "prompt_ids": list(out.prompt_token_ids),
                "ids": list(gen.token_ids),
                "logprobs": [step[t].logprob for t, step in zip(gen.token_ids, gen.logprobs)],
                "text": gen.text,
            })
        print("RESULT " + json.dumps(result))
""")


@pytest.mark.slow
def test_pull_smollm2_into_fresh_home(tmp_path, monkeypatch):
    monkeypatch.setenv("KVHEAD_HOME", str(tmp_path / "home"))
    folder = pull("smollm2-135m-instruct")
    assert folder == tmp_path / "home" / "models" / "smollm2-135m-instruct"

    manifest = store.verify_manifest(folder)
    entry = REGISTRY["smollm2-135m-instruct"]
    assert manifest.source == entry.requirement
    gguf_path = store.pkgs_dir() / f"{entry.package}-{entry.version}" / entry.file
    assert manifest.source_sha256 == store.sha256_file(gguf_path)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest.files)

    config = json.loads((folder / "config.json").read_text())
    assert config["num_hidden_layers"] == 30
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["head_dim"] == 64 and config["max_position_embeddings"] == 8192
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    with safe_open(str(folder / "model.safetensors"), "pt") as weights:
        names = weights.keys()  # a safe_open handle is not iterable itself
        dtypes = {weights.get_slice(k).get_dtype() for k in names}
    assert dtypes == {"BF16"}

    tok = AutoTokenizer.from_pretrained(folder)
    assert tok.chat_template == inspect_gguf(gguf_path).chat_template
    assert "<|im_start|>" in tok.chat_template

    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.bfloat16
    inputs = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # Re-running is a verified no-op: same folder, manifest untouched.
    before = (folder / store.MANIFEST_NAME).read_bytes()
    assert pull("smollm2-135m-instruct") == folder
    assert (folder / store.MANIFEST_NAME).read_bytes() == before


@pytest.mark.slow
def test_tiny_model_generates_in_real_vllm_like_transformers(tmp_path):
    tiny = build_tiny_llama(tmp_path / "tiny")
    script = tmp_path / "run_vllm.py"
    script.write_text(_VLLM_SCRIPT)
    # Only stock vLLM here: the kvhead plugin has its own tests, and this one checks the folder.
    env = {**os.environ, "VLLM_PLUGINS": "", "VLLM_CPU_KVCACHE_SPACE": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tiny)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    results = json.loads(line.removeprefix("RESULT "))

    model = AutoModelForCausalLM.from_pretrained(tiny)
    tok = AutoTokenizer.from_pretrained(tiny)
    for res in results:
        assert len(res["ids"]) == 8 and max(res["ids"]) < len(tok)
        ids = torch.tensor([res["prompt_ids"] + res["ids"]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
        steps = range(len(res["prompt_ids"]) - 1, ids.shape[1] - 1)
        # Same weights read the same way: greedy picks and their log-probs agree with transformers.
        assert [int(logprobs[i].argmax()) for i in steps] == res["ids"]
        hf = [float(logprobs[i, t]) for i, t in zip(steps, res["ids"])]
        assert hf == pytest.approx(res["logprobs"], abs=1e-3)
        assert res["text"] == tok.decode(res["ids"])
