"""The serving dashboard: what vLLM's production stack shows, for kvhead's Ray Serve deployment.

Engine metrics are vLLM's own, scraped from Ray's metrics port (``ray_vllm_*``, see
:mod:`dashboards.promql`); the Ray Serve row reads Serve's ``ray_serve_*``. Threshold values are
rules of thumb for interactive chat on a GPU replica; ``docs/operators.md`` says what to do when
each panel turns red.
"""

from __future__ import annotations

from dashboards.promql import SERVE, quantile, rate, vllm
from dashboards.spec import OK, Dashboard, Panel, Query, Row, Threshold, Variable, above, below

BY_MODEL = "model_name"


def _quantiles(histogram: str, legend: str) -> tuple[Query, ...]:
    return tuple(
        Query(quantile(q, histogram), f"{legend} p{round(q * 100)}", "ray", "load")
        for q in (0.5, 0.9, 0.99)
    )


def _distribution(histogram: str) -> Query:
    """Bucket counts per interval, drawn by Grafana as a heatmap over time."""
    expr = f"sum by (le) (increase({vllm(histogram + '_bucket')}[$__rate_interval]))"
    return Query(expr, "{{le}}", "ray", "load")


REQUESTS = Row(
    "Requests",
    (
        Panel(
            "Requests per second",
            "Requests the engines finished per second (any finish reason), per model.",
            (
                Query(
                    rate(vllm("request_success_total"), BY_MODEL), "{{model_name}}", "ray", "load"
                ),
            ),
            unit="reqps",
        ),
        Panel(
            "Running and waiting requests",
            "Requests in the engines' batches and requests queued inside the engines. Waiting "
            "requests mean the KV cache or max_num_seqs is full.",
            (
                Query(
                    f"sum by ({BY_MODEL}) ({vllm('num_requests_running')})",
                    "running {{model_name}}",
                    "ray",
                ),
                Query(
                    f"sum by ({BY_MODEL}) ({vllm('num_requests_waiting')})",
                    "waiting {{model_name}}",
                    "ray",
                ),
            ),
            thresholds=above(1, 10),
        ),
        Panel(
            "Waiting requests now",
            "Requests queued inside the engines. Yellow from 1, red from 10: add replicas "
            "(replicas.max_replicas) or KV budget (kv_cache_gib).",
            (Query(f"sum({vllm('num_requests_waiting')})", "waiting", "ray"),),
            kind="stat",
            thresholds=above(1, 10),
            width=4,
        ),
        Panel(
            "Preemptions per second",
            "Requests vLLM preempted for lack of KV blocks (they recompute): the KV budget is "
            "too small for the load.",
            (
                Query(
                    f"sum(rate({vllm('num_preemptions_total')}[$__rate_interval]))",
                    "preemptions",
                    "ray",
                    "preemptions",
                ),
            ),
            thresholds=above(0.01, 1),
            width=4,
        ),
    ),
)

LATENCY = Row(
    "Latency",
    (
        Panel(
            "Time to first token",
            "TTFT quantiles (queueing + prefill). Red past 5 s at p99 on a GPU replica.",
            _quantiles("time_to_first_token_seconds", "TTFT"),
            unit="s",
            thresholds=above(1, 5),
        ),
        Panel(
            "Time to first token, distribution",
            "Requests per TTFT bucket over time (vLLM's histogram).",
            (_distribution("time_to_first_token_seconds"),),
            kind="histogram_heatmap",
            unit="s",
        ),
        Panel(
            "Inter-token latency",
            "Time between streamed tokens. Red past 250 ms at p99: decode batches too large "
            "for the device, or reranks too frequent (FlexiCache R).",
            _quantiles("inter_token_latency_seconds", "ITL"),
            unit="s",
            thresholds=above(0.1, 0.25),
        ),
        Panel(
            "Inter-token latency, distribution",
            "Streamed tokens per inter-token-latency bucket over time.",
            (_distribution("inter_token_latency_seconds"),),
            kind="histogram_heatmap",
            unit="s",
        ),
        Panel(
            "End-to-end and queue time",
            "Whole-request latency and the time requests waited in the engine's queue.",
            (
                Query(quantile(0.5, "e2e_request_latency_seconds"), "e2e p50", "ray", "load"),
                Query(quantile(0.99, "e2e_request_latency_seconds"), "e2e p99", "ray", "load"),
                Query(quantile(0.99, "request_queue_time_seconds"), "queue p99", "ray", "load"),
            ),
            unit="s",
        ),
        Panel(
            "Tokens per second",
            "Prompt (prefill) and generated tokens per second over all engines.",
            (
                Query(
                    rate(vllm("prompt_tokens_total"), BY_MODEL),
                    "prompt {{model_name}}",
                    "ray",
                    "load",
                ),
                Query(
                    rate(vllm("generation_tokens_total"), BY_MODEL),
                    "generated {{model_name}}",
                    "ray",
                    "load",
                ),
            ),
            unit="short",
        ),
    ),
)

KV = Row(
    "KV cache",
    (
        Panel(
            "KV cache usage",
            "Share of vLLM's KV blocks in use (the fullest engine). With FlexiCache these blocks "
            "hold the dense heads' pages; stable heads live in the hot pool (kvhead-heads).",
            (
                Query(
                    f"max by ({BY_MODEL}) ({vllm('kv_cache_usage_perc')})", "{{model_name}}", "ray"
                ),
            ),
            unit="percentunit",
            thresholds=above(0.8, 0.95),
            width=16,
            min=0,
            max=1,
        ),
        Panel(
            "KV cache usage now",
            "The fullest engine's KV block usage. Red from 95%: requests start to wait or be "
            "preempted.",
            (Query(f"max({vllm('kv_cache_usage_perc')})", "usage", "ray"),),
            kind="stat",
            unit="percentunit",
            thresholds=above(0.8, 0.95),
            width=4,
            min=0,
            max=1,
        ),
        Panel(
            "Prefix-cache hit rate",
            "vLLM's own prefix cache: hits / queried tokens. kvhead serves with vLLM's prefix "
            "caching off (its pages are per head), so this stays empty unless a stock replica "
            "turns it on; kvhead's prefix reuse shows on the tiers dashboard.",
            (
                Query(
                    f"sum(rate({vllm('prefix_cache_hits_total')}[$__rate_interval])) / "
                    f"sum(rate({vllm('prefix_cache_queries_total')}[$__rate_interval]))",
                    "hit rate",
                    "ray",
                    "prefix_caching",
                ),
            ),
            kind="stat",
            unit="percentunit",
            thresholds=below(0.1, 0.3),
            width=4,
        ),
    ),
)

RAY_SERVE = Row(
    "Ray Serve",
    (
        Panel(
            "Replicas",
            "Healthy replicas per deployment and the autoscaler's target. Healthy below target "
            "means replicas fail to start (see the Ray head's logs).",
            (
                Query(
                    f"sum by (deployment) ({SERVE}deployment_replica_healthy)",
                    "healthy {{deployment}}",
                    "ray",
                ),
                Query(
                    f"sum by (deployment) ({SERVE}autoscaling_target_replicas)",
                    "target {{deployment}}",
                    "ray",
                ),
            ),
        ),
        Panel(
            "Healthy LLM replicas",
            "Healthy replicas of the LLM deployment; red at 0 (nothing serves).",
            (
                Query(
                    f'sum({SERVE}deployment_replica_healthy{{deployment=~"LLMServer.*"}})',
                    "healthy",
                    "ray",
                ),
            ),
            kind="stat",
            thresholds=(Threshold(None, "red"), Threshold(1, "green")),
            width=4,
        ),
        Panel(
            "Serve queue",
            "Requests waiting in Serve's routers for a replica slot, and requests at replicas. "
            "Past replicas.max_queued_requests the server answers 429.",
            (
                Query(
                    f"sum by (deployment) ({SERVE}deployment_queued_queries)",
                    "queued {{deployment}}",
                    "ray",
                ),
                Query(
                    f"sum by (deployment) ({SERVE}num_ongoing_requests_at_replicas)",
                    "at replicas {{deployment}}",
                    "ray",
                ),
            ),
            thresholds=above(1, 32),
        ),
        Panel(
            "Error ratio",
            "Share of HTTP requests answered with an error. Red from 5%.",
            (
                Query(
                    f"sum(rate({SERVE}num_http_error_requests_total[$__rate_interval])) / "
                    f"sum(rate({SERVE}num_http_requests_total[$__rate_interval]))",
                    "errors",
                    "ray",
                    "errors",
                ),
            ),
            kind="stat",
            unit="percentunit",
            thresholds=above(0.01, 0.05),
            width=4,
        ),
        Panel(
            "HTTP requests by status",
            "Requests through Serve's HTTP proxy per status code (429: queue full).",
            (
                Query(
                    rate(f"{SERVE}num_http_requests_total", "status_code"),
                    "{{status_code}}",
                    "ray",
                    "load",
                ),
            ),
            unit="reqps",
            stack=True,
            width=12,
        ),
        Panel(
            "Errors",
            "Error responses per code at the proxy and exceptions raised in replicas.",
            (
                Query(
                    rate(f"{SERVE}num_http_error_requests_total", "error_code"),
                    "HTTP {{error_code}}",
                    "ray",
                    "errors",
                ),
                Query(
                    rate(f"{SERVE}deployment_error_counter_total", "deployment, exception_type"),
                    "{{deployment}} {{exception_type}}",
                    "ray",
                    "exceptions",
                ),
            ),
            unit="reqps",
            thresholds=(OK, Threshold(0.01, "red")),
            width=12,
        ),
    ),
)

SERVING = Dashboard(
    uid="kvhead-serving",
    title="kvhead / Serving",
    description="Requests, latency, KV usage and Ray Serve health of a kvhead deployment.",
    rows=(REQUESTS, LATENCY, KV, RAY_SERVE),
    variables=(Variable("model", "model_name", "ray_vllm_num_requests_running", "Model"),),
)
