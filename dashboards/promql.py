"""Every PromQL expression the dashboards use, and the metric names they are written against.

Two exporters feed the dashboards (see ``docs/operators.md``):
- kvhead's own exporter (``kvhead serve``'s ``metrics_port``, or a ``kvhead metrics`` sidecar):
  the ``kvhead_*`` families of ``kvhead/vllm/metrics.py`` and ``kvstore/metrics.py``; gauges
  carry a ``pid`` label per engine process, so panels aggregate it away;
- Ray's metrics export port: Ray Serve LLM hands vLLM a stat logger that records through
  ``ray.util.metrics`` (``vllm/v1/metrics/ray_wrappers.py``), which replaces the ``:`` of
  ``vllm:name`` by ``_``; Ray's agent then prefixes ``ray_`` and its OpenTelemetry exporter adds
  ``_total`` to counters. So ``vllm:request_success`` is scraped as
  ``ray_vllm_request_success_total``, ``vllm:time_to_first_token_seconds`` as
  ``ray_vllm_time_to_first_token_seconds_bucket``; the model label is ``model_name``. Ray
  Serve's own metrics are ``ray_serve_*``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dashboards.spec import Dashboard, Needs, Source

RATE = "$__rate_interval"
VLLM = "ray_vllm_"  # vLLM's engine metrics as Ray's agent exports them
SERVE = "ray_serve_"  # Ray Serve's own metrics
MODEL = 'model=~"$model"'  # kvhead_* families label the served model `model`
MODEL_NAME = 'model_name=~"$model"'  # vLLM labels it `model_name` (the same served name)
TIER = 'tier=~"$tier"'


def vllm(name: str) -> str:
    """A vLLM engine metric as scraped from Ray, restricted to the chosen models."""
    return f"{VLLM}{name}{{{MODEL_NAME}}}"


def rate(metric: str, by: str) -> str:
    return f"sum by ({by}) (rate({metric}[{RATE}]))"


def ratio(numerator: str, denominator: str, by: str) -> str:
    """``rate(num) / rate(den)`` per group: hit ratios, means of summaries."""
    return f"{rate(numerator, by)} / {rate(denominator, by)}"


def quantile(q: float, histogram: str) -> str:
    """A quantile of a vLLM histogram over all engines of the chosen models."""
    return f"histogram_quantile({q}, {rate(vllm(histogram + '_bucket'), 'le')})"


def per_head(metric: str) -> str:
    """One value per (model, layer, head): replicas of one model report the same heads, each
    engine process as its own ``pid`` series; ``max`` keeps one."""
    return f"max by (model, layer, head) ({metric}{{{MODEL}}})"


@dataclass(frozen=True)
class PanelQuery:
    """One expression as the dashboards hold it and as plain Prometheus takes it."""

    dashboard: str
    panel: str
    expr: str  # with Grafana's variables
    promql: str  # variables substituted: what to send to Prometheus's API
    source: Source
    needs: Needs


def expand(expr: str, rate_interval: str = "1m", variables: dict[str, str] | None = None) -> str:
    """Substitute Grafana's variables so Prometheus itself can run ``expr``: ``$__rate_interval``
    becomes ``rate_interval`` (at least 4 scrape intervals), ``$__range`` too, and every other
    ``$name`` the regex in ``variables`` (default ``.*``, what "All" selects)."""
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__range", rate_interval)
    chosen = variables or {}
    return re.sub(r"\$(\w+)", lambda m: chosen.get(m.group(1), ".*"), expr)


def queries(
    dashboards: tuple[Dashboard, ...] | None = None, rate_interval: str = "1m"
) -> list[PanelQuery]:
    """Every PromQL expression of ``dashboards`` (default: all of them), in panel order, with
    where its metrics come from and what must have happened before it returns data."""
    if dashboards is None:
        from dashboards.catalog import DASHBOARDS  # the catalog's dashboards import this module

        dashboards = DASHBOARDS
    return [
        PanelQuery(d.uid, p.title, q.expr, expand(q.expr, rate_interval), q.source, q.needs)
        for d in dashboards
        for p in d.panels
        for q in p.queries
    ]


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads (``kvhead_*``, ``ray_*``), for checking them
    against what the exporters define."""
    return set(re.findall(r"\b((?:kvhead|ray)_[a-zA-Z0-9_]+)", expr))
