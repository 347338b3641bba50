"""The served product: `kvhead serve` (Ray, Serve, vLLM, the plugin; SmolLM2) driven by the
official ``openai`` client, next to stock vLLM's own OpenAI server with the same settings.

The app runs FlexiCache with every page selected (K beyond the context), so its greedy output
must equal stock vLLM's token for token; the request-mix tests cover the presets' selection.
It shares prompt pages through a real redis-server (the KV connector), so repeated prompts are
served from loaded pages and must still equal stock's.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from redis_server import RedisServer
from vllm_tiny import ENGINE_ENV, free_port, wait_ready

pytestmark = pytest.mark.slow
openai = pytest.importorskip("openai")

MAX_LEN = 1024
KV_BYTES = 2**28
MODEL_ID = "smollm2"
ROOT = Path(__file__).parents[1]


def _prompts() -> list[str]:
    """A short prompt and two of several hundred tokens from the shipped docs."""
    words = (ROOT / "kvhead" / "data" / "python_docs" / "tutorial-classes.txt").read_text().split()
    return ["Once upon a time", " ".join(words[:350]), " ".join(words[400:900])]


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    """`kvhead serve` on a config file; stopped with SIGTERM at the end (checked there)."""
    tmp = tmp_path_factory.mktemp("serve")
    port, metrics_port, ray_metrics_port = free_port(), free_port(), free_port()
    redis_server = RedisServer().start()
    config = tmp / "serve.yaml"
    config.write_text(
        f"model_id: {MODEL_ID}\npreset: paper\noverrides: {{top_k: 1000}}\n"
        f"max_model_len: {MAX_LEN}\nkv_cache_gib: {KV_BYTES / 2**30}\ndtype: float32\n"
        f"max_num_seqs: 8\nblock_size: 32\nport: {port}\n"
        f"metrics_dir: {tmp / 'metrics'}\nmetrics_port: {metrics_port}\n"
        f"ray_metrics_port: {ray_metrics_port}\n"
        "replicas: {max_ongoing_requests: 4, max_queued_requests: 2}\n"
        f"kv_connector: {{redis: {{url: '{redis_server.url}'}}}}\n"
    )
    log = tmp / "serve.log"
    env = ENGINE_ENV | {"RAY_DEDUP_LOGS": "0"}
    with log.open("w") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kvhead.cli", "serve", str(config)],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    deadline = time.time() + 1200
    while time.time() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kvhead serve exited: {log.read_text()[-4000:]}")
        if "Ctrl-C stops the server" in log.read_text():
            break
        time.sleep(3)
    else:
        proc.kill()
        pytest.fail(f"kvhead serve did not become ready: {log.read_text()[-4000:]}")
    url = f"http://127.0.0.1:{port}"
    yield {
        "url": url,
        "port": port,
        "log": log,
        "config": config,
        "metrics_port": metrics_port,
        "ray_metrics_port": ray_metrics_port,
    }
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=180) == 0, log.read_text()[-3000:]
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"{url}/health", timeout=5)
    redis_server.stop()
    left = subprocess.run(["pgrep", "-f", "ray::ServeReplica|raylet"], capture_output=True)
    assert left.stdout == b"", "Ray processes outlived kvhead serve"


@pytest.fixture(scope="module")
def stock(app: dict, tmp_path_factory: pytest.TempPathFactory):
    """Stock vLLM's OpenAI server, same model and engine settings, no plugin."""
    from kvhead.models.resolve import resolve_model

    tmp = tmp_path_factory.mktemp("stock")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(resolve_model("smollm2-135m-instruct")),
        "--served-model-name",
        MODEL_ID,
        "--port",
        str(port),
        "--host",
        "127.0.0.1",
        "--max-model-len",
        str(MAX_LEN),
        "--dtype",
        "float32",
        "--max-num-seqs",
        "8",
        "--enforce-eager",
        "--no-enable-prefix-caching",
        "--block-size",
        "32",
        "--kv-cache-memory-bytes",
        str(KV_BYTES),
    ]
    log = tmp / "stock.log"
    with log.open("w") as sink:
        server = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=ENGINE_ENV)
    try:
        wait_ready(port, server, log)
        yield openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
    finally:
        server.terminate()
        server.wait(timeout=60)


@pytest.fixture(scope="module")
def client(app: dict):
    return openai.OpenAI(base_url=f"{app['url']}/v1", api_key="-", max_retries=0, timeout=600)


def _post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=600) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_greedy_completions_and_chats_equal_stock_vllm(client, stock) -> None:
    for prompt in _prompts():
        args = {"model": MODEL_ID, "max_tokens": 24, "temperature": 0}
        ours = client.completions.create(prompt=prompt, logprobs=2, **args).choices[0]
        theirs = stock.completions.create(prompt=prompt, logprobs=2, **args).choices[0]
        assert ours.text == theirs.text
        assert ours.logprobs.tokens == theirs.logprobs.tokens
        for a, b in zip(ours.logprobs.token_logprobs, theirs.logprobs.token_logprobs):
            assert a == pytest.approx(b, abs=2e-3)  # fp32: summation order only
        chat = {"messages": [{"role": "user", "content": prompt}], **args}
        ours = client.chat.completions.create(**chat).choices[0].message.content
        assert ours == stock.chat.completions.create(**chat).choices[0].message.content


def test_streaming_stop_max_tokens_n_and_logprobs(client) -> None:
    prompt = _prompts()[1]
    args = {"model": MODEL_ID, "prompt": prompt, "temperature": 0}
    whole = client.completions.create(max_tokens=20, **args).choices[0]
    assert whole.finish_reason == "length"
    chunks = list(client.completions.create(max_tokens=20, stream=True, **args))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.text
    usage = client.completions.create(max_tokens=7, **args).usage
    assert usage.completion_tokens == 7
    stop = whole.text.strip().split()[2]
    stopped = client.completions.create(max_tokens=20, stop=[stop], **args).choices[0]
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert whole.text.startswith(stopped.text)
    two = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=5, n=2, temperature=1.0, seed=3
    )
    assert sorted(c.index for c in two.choices) == [0, 1]
    chat = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        logprobs=True,
        top_logprobs=2,
        temperature=0,
    ).choices[0]
    assert all(len(t.top_logprobs) == 2 for t in chat.logprobs.content)
    streamed = client.chat.completions.create(
        model=MODEL_ID,
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=4,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.message.content


def test_errors_are_openai_shaped_and_the_server_stays_up(client, app: dict) -> None:
    url = app["url"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=-1)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL_ID, prompt=[5] * (MAX_LEN + 10), max_tokens=3)
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    code, body = _post(f"{url}/v1/completions", b'{"model": "smollm2", "prompt": ')
    assert code == 400 and "error" in body
    code, body = _post(f"{url}/v1/chat/completions", json.dumps({"model": MODEL_ID}).encode())
    assert code == 400 and "error" in body
    code, body = _post(f"{url}/v1/completions", json.dumps({"model": "x", "prompt": "a"}).encode())
    assert code == 404 and body["error"]["code"] == 404
    with urllib.request.urlopen(f"{url}/health", timeout=30) as reply:
        assert json.loads(reply.read())["status"] == "ready"
    assert client.completions.create(model=MODEL_ID, prompt="hi", max_tokens=2).choices


def test_overload_answers_429_and_every_admitted_request_completes(app: dict) -> None:
    """4 running + 2 queued per replica: a burst of 12 gets 429 for the rest, never a 5xx."""
    aclient = openai.AsyncOpenAI(base_url=f"{app['url']}/v1", api_key="-", max_retries=0)

    async def one() -> str:
        try:
            await aclient.completions.create(
                model=MODEL_ID, prompt=_prompts()[2], max_tokens=48, temperature=0
            )
            return "ok"
        except openai.RateLimitError:
            return "429"

    async def burst() -> list[str]:
        return await asyncio.gather(*(one() for _ in range(12)))

    outcomes = asyncio.run(burst())
    assert outcomes.count("429") >= 1 and outcomes.count("ok") >= 4


def test_heads_route_reports_every_head_and_live_pages(client, app: dict) -> None:
    def heads() -> dict:
        with urllib.request.urlopen(f"{app['url']}/v1/kvhead/heads", timeout=60) as reply:
            return json.loads(reply.read())

    stream = client.completions.create(
        model=MODEL_ID, prompt=_prompts()[2], max_tokens=200, temperature=0, stream=True
    )
    next(iter(stream))  # the prompt is in the cache now
    during = heads()
    stream.close()
    assert during["model"] == MODEL_ID
    assert during["configured"] == {"preset": "paper", "top_k": 1000}
    (worker,) = during["workers"]
    assert worker["settings"]["top_k"] == 1000 and worker["settings"]["rerank_interval"] == 16
    layers = worker["layers"]
    assert [layer["layer"] for layer in layers] == list(range(30))
    states = [h["state"] for layer in layers for h in layer["heads"]]
    assert states.count("dense") == worker["dense_heads"] and len(states) == 90
    # the replica's cache is exactly what the start-up check planned with the plugin's code
    from deployments.config import ServeConfig

    config = ServeConfig.load(app["config"])
    assert worker["vllm_blocks"] == config.check(config.model_dir()).num_blocks
    assert worker["live_requests"] >= 1
    assert worker["live_pages"] * worker["page_size"] >= 600  # the ~700-token prompt
    stable = [h for layer in layers for h in layer["heads"] if h["state"] == "stable"]
    # K beyond the context: every live page of a stable head is on the device
    assert all(h["device_pages"] == worker["live_pages"] for h in stable)
    assert all(0 <= h["instability"] <= 1 for layer in layers for h in layer["heads"])


def test_generated_requests_never_get_a_5xx(app: dict) -> None:
    """Schemathesis cases from the app's own OpenAPI schema, a bounded number per operation:
    whatever they send, no answer is a 5xx. Completion lengths are capped at 8 tokens (a
    generated request may otherwise ask for the whole context) unless the case's value is
    itself invalid, which must still be refused."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{app['url']}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=8, deadline=None, database=None, suppress_health_check=list(HealthCheck)
        )
        def check(case) -> None:
            if isinstance(case.body, dict):
                for key in ("max_tokens", "max_completion_tokens"):
                    value = case.body.get(key)
                    if value is None or (isinstance(value, int) and value > 8):
                        case.body[key] = 8
            response = case.call(timeout=600)
            assert response.status_code < 500, (case.path, case.body, response.text[:500])

        check()


def test_prometheus_scrapes_every_series_the_dashboards_read(
    app: dict, client, tmp_path: Path
) -> None:
    """A real Prometheus scrapes the host exporter `kvhead serve` started and Ray's metrics port
    while requests run: every kvhead_* family is there with values that agree with the replica,
    and every dashboard query returns data, except those that need what this deployment does not
    run (the placement actor, vLLM's prefix cache, a preemption, an exception in a replica)."""
    from prometheus_server import running_prometheus

    from dashboards import queries
    from kvhead.vllm.metrics import exported

    with urllib.request.urlopen(f"{app['url']}/v1/kvhead/heads", timeout=60) as reply:
        (worker,) = json.loads(reply.read())["workers"]
    targets = [f"127.0.0.1:{app['metrics_port']}", f"127.0.0.1:{app['ray_metrics_port']}"]
    with running_prometheus(targets, tmp_path) as prom:
        prom.wait_for("kvhead_head_stable")
        for prompt in _prompts()[:2]:  # load inside the rate windows, and one 404
            client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=8)
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="no-such-model", prompt="hi", max_tokens=1)
        prom.wait_for("ray_vllm_request_success_total", timeout_s=120)
        prom.wait_for("ray_serve_num_http_error_requests_total", timeout_s=120)
        time.sleep(5)  # a few more scrapes for the rates
        suffix = {"counter": "_total", "summary": "_count", "gauge": ""}
        for name, kind in exported().items():
            assert prom.query(name + suffix[kind]), f"{name} was not scraped"
        stable = prom.values("kvhead_head_stable")
        assert len(stable) == 90 and sum(stable) == worker["stable_heads"]
        assert all(0 <= v <= 1 for v in prom.values("kvhead_head_profile_instability"))
        assert prom.values("count(kvhead_layer_decode_steps_total > 0)") == [30]
        # K beyond the context: every attended page was on the device
        ratio = "sum(kvhead_resident_page_steps_total) / sum(kvhead_page_steps_total)"
        assert prom.values(ratio) == [1.0]
        assert prom.values("kvhead_live_requests") == [0]
        assert prom.values('kvhead_kvstore_stored_bytes_total{tier="host"}')[0] > 0
        assert prom.values("kvhead_hot_pool_capacity_pages")[0] > 0
        # the long prompts were served before: their pages came from Redis, not prefill
        assert prom.values("sum(kvhead_connector_loaded_tokens_total)")[0] >= 256
        assert prom.values("sum(kvhead_connector_load_failures_total)") == [0]
        assert prom.values('kvhead_kvstore_up{tier="redis"}') == [1]
        skipped = {"placement", "prefix_caching", "preemptions", "exceptions"}
        empty = [
            (q.dashboard, q.panel, q.promql)
            for q in queries(rate_interval="1m")
            if q.needs not in skipped and not prom.query(q.promql)
        ]
        assert empty == []
