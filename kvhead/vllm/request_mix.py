"""A seeded mix of ordinary traffic through the real vLLM engine, stock or with kvhead.

Serving breaks where requests meet: a block handed from a finished request to a new one, a
prompt ending on a page boundary, a chunked prefill, a preempted request recomputing, a client
that disconnects mid-stream. This module builds such a mix (:func:`build_mix`, seeded, prompts
cut from the shipped corpora and rendered as chat or completion prompts) and replays it through
vLLM's ``LLMEngine`` stepped in this process (:func:`replay`): arrivals and aborts happen at
fixed engine steps, so stock vLLM and kvhead see the same schedule whenever they have the same
number of blocks, and their tokens can be compared request by request (:func:`compare`).

    python -m kvhead.vllm.request_mix MODEL MIX.json OUT.json [--kvhead SETTINGS.json]

Each replay runs in its own process (one vLLM engine and one FlexiCache runtime per process).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from kvhead.vllm.generate import engine_kwargs

PAGE_EDGES = (1, 15, 16, 17, 31, 32, 33, 47, 48, 49, 63, 64, 65, 127, 128, 129, 255, 256, 257)
STOP_STRINGS = ("\n\n", ".", " the")
TOO_LONG = "mix-too-long"  # the request beyond the model's limit
SOLO_GAP = 1000  # engine steps between solo arrivals: more than any one request needs
app = typer.Typer(add_completion=False)


@dataclass
class MixRequest:
    """One request of the mix: what a client sends and when it hangs up."""

    id: str
    arrive: int  # engine step at which it is added
    prompt: list[int]  # token ids (chat prompts already rendered with the chat template)
    kind: str  # "chat" or "completion" (how the prompt was made)
    max_tokens: int
    n: int = 1
    stop: list[str] | None = None
    ignore_eos: bool = True
    abort_after: int | None = None  # tokens received (first sample) before the client leaves


@dataclass
class MixResult:
    """What a client of one request saw."""

    id: str
    samples: list[list[int]] = field(default_factory=list)
    finish: list[str | None] = field(default_factory=list)
    # per sample and token: the top-2 candidates' log-probabilities ({token id: logprob})
    logprobs: list[list[dict[str, float]]] = field(default_factory=list)
    aborted: bool = False
    rejected: str | None = None  # refused before it reached the engine (bad input)


def corpus_tokens(tokenizer: Any) -> list[int]:
    """Token ids of the shipped text corpora, concatenated (a source of natural prompts)."""
    data = Path(__file__).parents[1] / "data"
    texts = [p.read_text(encoding="utf-8") for p in sorted((data / "python_docs").glob("*.txt"))]
    texts += [p.read_text(encoding="utf-8") for p in sorted((data / "corpus").glob("*.txt"))]
    return tokenizer("\n\n".join(texts))["input_ids"]


def build_mix(
    tokenizer: Any,
    count: int,
    max_model_len: int,
    seed: int,
    *,
    max_tokens: int = 48,
    waves: int = 6,
    page_size: int = 16,
    solo_share: float = 1 / 3,
) -> list[MixRequest]:
    """``count`` seeded requests: prompt lengths from 1 token to the model's limit (page
    edges included), chat and completion prompts, 1 to ``max_tokens`` tokens, stop strings,
    ``n`` = 2, clients that hang up mid-stream; arrivals in ``waves`` bursts, then a
    ``solo_share`` of the requests one at a time, each after the one before has finished, half
    of them short (one block): the next request takes over that block in a batch of the same
    size. Plus one request longer than ``max_model_len`` that the engine must refuse on its own.
    """
    rng = random.Random(seed)
    source = corpus_tokens(tokenizer)
    chat_overhead = len(_chat(tokenizer, []))
    requests: list[MixRequest] = []
    solo_at = waves * 40 + 5000  # after the bursts, one request every SOLO_GAP steps
    after_short = False
    for i in range(count):
        solo = after_short or rng.random() < solo_share
        short = solo and not after_short and rng.random() < 0.5
        if short:  # one block, a few decode steps: the next solo request takes that block
            budget, length = rng.randint(2, 5), rng.randint(1, 10)
        elif after_short:  # longer than the short one's pages, decoding past its rerank
            budget = rng.randint(8, max_tokens)
            length = rng.randint(2 * page_size, max_model_len - budget)
        else:
            budget = rng.choice([1, 1, 2, 5, rng.randint(1, max_tokens), max_tokens])
            length = _length(rng, max_model_len - budget)
        kind = "chat" if rng.random() < 0.4 and length > chat_overhead + 1 else "completion"
        start = rng.randrange(0, len(source) - length)
        if kind == "chat":
            prompt = _chat(tokenizer, source[start : start + length - chat_overhead])[:length]
        else:
            prompt = source[start : start + length]
        if solo:
            solo_at += SOLO_GAP
        requests.append(
            MixRequest(
                id=f"mix-{i}",
                prompt=prompt,
                kind=kind,
                max_tokens=budget,
                arrive=solo_at if solo else rng.randrange(waves) * 40 + rng.randrange(8),
                n=2 if rng.random() < 0.1 and not (short or after_short) else 1,
                stop=[rng.choice(STOP_STRINGS)] if rng.random() < 0.15 else None,
                ignore_eos=rng.random() < 0.8 or short,
                abort_after=rng.randint(1, budget - 1)
                if budget > 1 and rng.random() < 0.15
                else None,
            )
        )
        after_short = short
    too_long = source[: max_model_len + 10]
    requests.append(
        MixRequest(id=TOO_LONG, arrive=1, prompt=too_long, kind="completion", max_tokens=4)
    )
    return sorted(requests, key=lambda r: r.arrive)


def _length(rng: random.Random, limit: int) -> int:
    """A prompt length up to ``limit``: a page edge, near the limit, or anywhere."""
    pick = rng.random()
    if pick < 0.35:
        return min(rng.choice(PAGE_EDGES), limit)
    if pick < 0.45:
        return rng.randint(max(1, limit - 40), limit)
    return rng.randint(1, limit)


def _chat(tokenizer: Any, tokens: list[int]) -> list[int]:
    """A one-message chat prompt around ``tokens`` (decoded), rendered by the model's template."""
    text = tokenizer.decode(tokens)
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}],
        tokenize=True,
        add_generation_prompt=True,
        return_dict=False,
    )


def replay(engine: Any, mix: list[MixRequest], max_steps: int = 100_000) -> list[MixResult]:
    """Run ``mix`` through an in-process ``LLMEngine``: add each request at its step, abort
    clients that hang up, step until nothing is left (at most ``max_steps``)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind

    results = {r.id: MixResult(id=r.id) for r in mix}
    pending = list(mix)
    step = 0
    while pending or engine.has_unfinished_requests():
        if step >= max_steps:
            raise RuntimeError(f"request mix did not finish in {max_steps} engine steps")
        if pending and not engine.has_unfinished_requests():
            step = max(step, pending[0].arrive)  # an idle engine: skip to the next arrival
        while pending and pending[0].arrive <= step:
            r = pending.pop(0)
            # greedy as top-1 sampling: vLLM refuses n > 1 at temperature 0
            params = SamplingParams(
                temperature=1.0,
                top_k=1,
                max_tokens=r.max_tokens,
                n=r.n,
                stop=r.stop,
                ignore_eos=r.ignore_eos,
                logprobs=2,
                output_kind=RequestOutputKind.DELTA,
            )
            res = results[r.id]
            res.samples = [[] for _ in range(r.n)]
            res.finish = [None] * r.n
            res.logprobs = [[] for _ in range(r.n)]
            try:
                engine.add_request(r.id, {"prompt_token_ids": r.prompt}, params)
            except (ValueError, VLLMValidationError) as err:  # refused before the engine
                res.rejected = str(err)
        for out in engine.step():
            res = results[out.request_id]
            for sample in out.outputs:
                res.samples[sample.index] += list(sample.token_ids)
                res.logprobs[sample.index] += [
                    {str(t): lp.logprob for t, lp in step_lps.items()}
                    for step_lps in sample.logprobs or []
                ]
                if sample.finish_reason is not None:
                    res.finish[sample.index] = sample.finish_reason
        for r in mix:
            res = results[r.id]
            if (
                r.abort_after is not None
                and not res.aborted
                and res.samples
                and len(res.samples[0]) >= r.abort_after
                and None in res.finish
            ):
                engine.abort_request([r.id])
                res.aborted = True
        step += 1
    return [results[r.id] for r in mix]


def served(req: MixRequest, res: MixResult) -> bool:
    """Whether the client of ``req`` got what it asked for: a prompt beyond the model's limit
    refused, every other request finished by length (all its tokens), stop string or end of
    text, or left by its client after the tokens it waited for (counted on the first sample:
    with ``n > 1`` vLLM runs the samples as separate requests, and the others may lag)."""
    if req.id == TOO_LONG:
        return res.rejected is not None and "maximum context length" in res.rejected
    if res.rejected is not None or len(res.samples) != req.n:
        return False
    for index, (tokens, finish) in enumerate(zip(res.samples, res.finish, strict=True)):
        if res.aborted:
            ok = index > 0 or len(tokens) >= (req.abort_after or 0)
        elif finish == "length":
            ok = len(tokens) == req.max_tokens
        else:
            ok = finish == "stop" and 1 <= len(tokens) <= req.max_tokens
        if not ok:
            return False
    return True


@dataclass
class Mismatch:
    id: str
    sample: int
    position: int
    reason: str


def compare(
    mix: list[MixRequest], stock: list[MixResult], other: list[MixResult], tie: float = 1e-3
) -> list[Mismatch]:
    """Requests whose tokens differ from stock's, except where stock's top two candidates at
    the first difference lie within ``tie`` nats (a near tie that rounding may flip; the rest
    of that sample is then not compared). Aborted requests compare the tokens both received."""
    found = []
    for req, a, b in zip(mix, stock, other, strict=True):
        if (a.rejected is None) != (b.rejected is None):
            found.append(Mismatch(req.id, 0, 0, f"rejected: {a.rejected!r} vs {b.rejected!r}"))
            continue
        for s, (x, y) in enumerate(zip(a.samples, b.samples, strict=True)):
            common = min(len(x), len(y)) if req.abort_after is not None else max(len(x), len(y))
            for pos in range(common):
                if pos < len(x) and pos < len(y) and x[pos] == y[pos]:
                    continue
                lps = a.logprobs[s][pos] if pos < len(a.logprobs[s]) else {}
                mine = lps.get(str(y[pos])) if pos < len(y) else None
                if mine is not None and pos < len(x) and lps[str(x[pos])] - mine < tie:
                    break  # a near tie: both continuations are right
                found.append(
                    Mismatch(req.id, s, pos, f"stock {x[pos : pos + 4]} vs {y[pos : pos + 4]}")
                )
                break
    return found


def engine_args(
    model: str,
    kvhead: dict | None,
    *,
    max_model_len: int,
    num_blocks: int,
    block_size: int,
    max_num_seqs: int,
    chunk_tokens: int,
    dtype: str,
    redis_url: str | None = None,
) -> dict:
    """``EngineArgs`` for a replay: :func:`~kvhead.vllm.generate.engine_kwargs` (the same for
    stock and kvhead apart from the backend) with a fixed block count, so both preempt alike,
    and a small token budget per step, so prompts prefill in chunks."""
    kwargs = engine_kwargs(
        model,
        kvhead,
        block_size=block_size,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        kv_cache_bytes=2**30,
        dtype=dtype,
        kv_transfer=_connector(redis_url),
    )
    return kwargs | {
        "max_num_batched_tokens": chunk_tokens,
        "enable_chunked_prefill": True,
        "num_gpu_blocks_override": num_blocks,
        "max_logprobs": 2,
    }


def _connector(redis_url: str | None) -> dict | None:
    """The kvhead KV connector's transfer config on ``redis_url`` (None: no connector)."""
    if redis_url is None:
        return None
    from kvhead.vllm.config import ConnectorSettings

    return ConnectorSettings.on(redis_url).transfer_config()


def replay_in_subprocess(
    model: str | Path,
    mix: list[MixRequest],
    kvhead: dict | None,
    workdir: Path,
    *,
    env: dict | None = None,
    timeout: float | None = None,
    **options: Any,
) -> dict:
    """Replay ``mix`` in a fresh engine process (one vLLM engine and FlexiCache runtime per
    process) with this module's command-line ``options`` (``max_model_len=512`` for
    ``--max-model-len 512``). Returns its report with :class:`MixResult` objects; ``error``
    holds the traceback or the process's stderr when the engine died."""
    mix_file, out = workdir / "mix.json", workdir / "out.json"
    mix_file.write_text(json.dumps([asdict(r) for r in mix]))
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "kvhead.vllm.request_mix", str(model), str(mix_file), str(out)]
    for name, value in options.items():
        cmd += [f"--{name.replace('_', '-')}", str(value)]
    if kvhead is not None:
        settings = workdir / "settings.json"
        settings.write_text(json.dumps(kvhead))
        cmd += ["--kvhead", str(settings)]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode or not out.exists():
        return {"error": proc.stderr[-4000:] or f"exit status {proc.returncode}", "results": []}
    report = json.loads(out.read_text())
    report["results"] = [MixResult(**r) for r in report["results"]]
    return report


@app.command()
def main(
    model: Path,
    mix_file: Path,
    out: Path,
    kvhead: Annotated[
        Path | None, typer.Option(help="JSON file with the kvhead settings; stock if absent.")
    ] = None,
    max_model_len: int = typer.Option(1024),
    num_blocks: int = typer.Option(128, help="KV blocks (small enough that vLLM preempts)."),
    block_size: int = typer.Option(16, help="vLLM block size (stock's CPU backend needs 32)."),
    max_num_seqs: int = typer.Option(8),
    chunk_tokens: int = typer.Option(256, help="Tokens per engine step (chunked prefill)."),
    dtype: str = typer.Option("float32"),
    redis_url: str = typer.Option(
        None, help="Run the kvhead KV connector on this Redis (preempted requests swap out)."
    ),
) -> None:
    """Replay MIX_FILE (from build_mix) and write every request's result to OUT."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    mix = [MixRequest(**r) for r in json.loads(mix_file.read_text())]
    settings = json.loads(kvhead.read_text()) if kvhead else None
    engine = LLMEngine.from_engine_args(
        EngineArgs(
            **engine_args(
                str(model),
                settings,
                max_model_len=max_model_len,
                num_blocks=num_blocks,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                chunk_tokens=chunk_tokens,
                dtype=dtype,
                redis_url=redis_url,
            )
        )
    )
    scheduler = engine.engine_core.engine_core.scheduler
    preempted = _record_preemptions(scheduler)
    start = time.perf_counter()
    error = None
    try:
        results = replay(engine, mix)
    except Exception:  # noqa: BLE001 - the engine died: record it, the caller fails on it
        error, results = traceback.format_exc(), []
    report = {
        "results": [asdict(r) for r in results],
        "error": error,
        "seconds": time.perf_counter() - start,
        "preemptions": len(preempted),
        "preempted": sorted({r.id for r in mix for p in preempted if p.startswith(f"{r.id}-")}),
        "num_blocks": engine.vllm_config.cache_config.num_gpu_blocks,
        "kvhead": _runtime_report(),
    }
    out.write_text(json.dumps(report))


def _record_preemptions(scheduler: Any) -> list[str]:
    """The engine's request id of every preemption the scheduler makes, in a list that fills
    as it runs (vLLM appends ``-<8 random characters>`` to a client's id)."""
    preempted: list[str] = []
    original = scheduler._preempt_request

    def preempt(request: Any, *args: Any, **kwargs: Any) -> Any:
        preempted.append(request.request_id)
        return original(request, *args, **kwargs)

    scheduler._preempt_request = preempt
    return preempted


def _runtime_report() -> dict | None:
    from kvhead.vllm.runtime import current

    runtime = current()
    return runtime.report() if runtime is not None else None


if __name__ == "__main__":
    app()
