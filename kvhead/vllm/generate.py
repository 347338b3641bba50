"""Greedy generation through real vLLM, stock or with kvhead FlexiCache, in its own process.

vLLM's engine needs a fresh process (spawned engine core, one platform per process), so tests
and the benchmark run this module as a script and read its JSON: token ids per prompt, timing,
KV block counts and, for FlexiCache, the runtime's memory and traffic report.

    python -m kvhead.vllm.generate MODEL_DIR PROMPTS.json OUT.json [--kvhead SETTINGS.json]
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(add_completion=False)


def engine_kwargs(
    model: str,
    kvhead: dict | None,
    *,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    kv_cache_bytes: int | None,
    dtype: str = "auto",
    in_process: bool = False,
    kv_transfer: dict | None = None,
) -> dict:
    """Arguments for ``vllm.LLM``: identical for stock and kvhead apart from the backend."""
    kwargs = {
        "model": model,
        "dtype": dtype,
        "block_size": block_size,
        "max_model_len": max_model_len,
        "max_num_seqs": max_num_seqs,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "seed": 0,
        "max_num_batched_tokens": max(max_model_len, 2048),
    }
    if in_process:  # the worker runs here, so the FlexiCache runtime can be read afterwards
        kwargs["distributed_executor_backend"] = "uni"
    if kv_cache_bytes is not None:
        kwargs["kv_cache_memory_bytes"] = kv_cache_bytes
    if kv_transfer is not None:
        kwargs["kv_transfer_config"] = kv_transfer
    if kvhead is not None:
        kwargs["attention_backend"] = "CUSTOM"
        kwargs["additional_config"] = {"kvhead": kvhead}
    return kwargs


@app.command()
def main(
    model: Path,
    prompts: Path,
    out: Path,
    kvhead: Annotated[
        Path | None, typer.Option(help="JSON file with the kvhead settings; stock if absent.")
    ] = None,
    max_tokens: int = typer.Option(16, help="Tokens generated per prompt (greedy)."),
    block_size: int = typer.Option(16, help="vLLM block size = FlexiCache page size."),
    max_model_len: int = typer.Option(1024),
    max_num_seqs: int = typer.Option(8),
    kv_cache_bytes: int = typer.Option(None, help="Fixed KV budget (vLLM kv_cache_memory_bytes)."),
    dtype: str = typer.Option("auto", help="Model dtype (float32 makes backends comparable)."),
    in_process: bool = typer.Option(False, help="Run engine and worker in this process."),
    redis_url: str = typer.Option(
        None, help="Share prompt pages through this Redis (the kvhead KV connector)."
    ),
    min_match_tokens: int = typer.Option(256, help="Shortest stored prefix a prompt loads."),
    one_by_one: bool = typer.Option(
        False, help="Submit prompts one at a time (per-prompt latency, in order)."
    ),
) -> None:
    if in_process:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    settings = json.loads(kvhead.read_text()) if kvhead else None
    transfer = None
    if redis_url is not None:
        from kvhead.vllm.config import ConnectorSettings

        transfer = ConnectorSettings.on(
            redis_url, min_match_tokens=min_match_tokens
        ).transfer_config()
    llm = LLM(
        **engine_kwargs(
            str(model),
            settings,
            block_size=block_size,
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            kv_cache_bytes=kv_cache_bytes,
            dtype=dtype,
            in_process=in_process,
            kv_transfer=transfer,
        )
    )
    token_prompts = [{"prompt_token_ids": ids} for ids in json.loads(prompts.read_text())]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    start = time.perf_counter()
    if one_by_one:
        results, latencies = [], []
        for prompt in token_prompts:
            begin = time.perf_counter()
            results += llm.generate([prompt], params, use_tqdm=False)
            latencies.append(time.perf_counter() - begin)
    else:
        results = llm.generate(token_prompts, params, use_tqdm=False)
        latencies = None
    seconds = time.perf_counter() - start
    config = llm.llm_engine.vllm_config
    report = {
        "tokens": [list(r.outputs[0].token_ids) for r in results],
        "logprobs": [[_chosen(step) for step in r.outputs[0].logprobs] for r in results],
        "seconds": seconds,
        "latencies": latencies,
        "num_gpu_blocks": config.cache_config.num_gpu_blocks,
        "kvhead": _runtime_report(),
        "vllm_kv_cache_bytes": vllm_kv_cache_bytes(llm) if in_process else None,
    }
    out.write_text(json.dumps(report))


def _chosen(step: dict) -> float:
    """Log-probability of the sampled token (greedy: the top one)."""
    return max(entry.logprob for entry in step.values())


def vllm_kv_cache_bytes(llm) -> int:
    """Bytes of the KV-cache tensors vLLM's in-process worker allocated (shared storage once)."""
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    storages = {}
    for cache in worker.model_runner.kv_caches:
        storage = cache.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def _runtime_report() -> dict | None:
    """The FlexiCache runtime's report when the engine ran in this process, else None."""
    from kvhead.vllm.runtime import current

    runtime = current()
    return runtime.report() if runtime is not None else None


if __name__ == "__main__":
    app()
