"""What the real-engine tests share: their environment, random token prompts, a seeded profile.

Each engine run is a subprocess (vLLM spawns its engine core), so the tests hand it files: a
tiny model folder (``build_tiny_llama``'s defaults), a prompts JSON and a profile JSON made here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from kvhead.core.stability import HeadProfile, model_fingerprint

# Environment of every engine subprocess: VLLM_CPU_KVCACHE_SPACE would override the tests' fixed
# kv_cache_memory_bytes, and tokenizer threads would fight the engine for the two cores.
ENGINE_ENV = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}
ENGINE_ENV["TOKENIZERS_PARALLELISM"] = "false"


def random_prompts(path: Path, lengths: tuple[int, ...], seed: int) -> Path:
    """Token-id prompts (ids 3..499, clear of the tiny tokenizer's special tokens)."""
    gen = torch.Generator().manual_seed(seed)
    path.write_text(
        json.dumps([torch.randint(3, 500, (n,), generator=gen).tolist() for n in lengths])
    )
    return path


def random_profile(
    model_dir: Path, path: Path, num_layers: int, num_kv_heads: int, fraction: float
) -> Path:
    """A head profile with seeded random instability, fingerprinted for ``model_dir``."""
    scores = torch.rand(num_layers, num_kv_heads, generator=torch.Generator().manual_seed(0))
    return HeadProfile.from_scores(
        scores,
        fraction=fraction,
        per_layer=True,
        model_fingerprint=model_fingerprint(model_dir),
        page_size=32,
        top_k=2,
        window=4,
    ).save(path)


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, server: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    """Wait until a vLLM OpenAI server answers /health (fail the test if it exits first)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"api_server exited: {log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
            return
        except OSError:
            time.sleep(2)
    pytest.fail("api_server did not become ready")
