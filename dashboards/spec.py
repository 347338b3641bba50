"""Dashboards as data: what a panel shows, independent of who draws it.

Grafana's JSON (:mod:`dashboards.build`) and the matplotlib snapshots (:mod:`dashboards.snapshot`)
are two renderings of the same :class:`Dashboard` values, so a panel cannot drift between them,
and the list of PromQL expressions the test suite runs against a real Prometheus is read from
here too (:func:`dashboards.promql.queries`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Where a query's metrics come from, so a test knows which scrape target must be up:
# "kvhead": the kvhead_* exporter (metrics_port, a `kvhead metrics` sidecar in a pod);
# "ray": Ray's metrics export port (vLLM's engine metrics as ray_vllm_*, Serve's ray_serve_*);
# "placement": the placement actor, which does not export yet (its panels wait for it).
Source = Literal["kvhead", "ray", "placement"]

# What must have happened before a query returns a series: "always" (the metric exists from
# the first scrape of a serving engine), "load" (requests were served), "errors" (Serve's proxy
# answered a 4xx/5xx: a 404, a 429), "exceptions" (code in a replica raised, which an
# OpenAI-shaped error response need not), "prefix_caching" (vLLM's own prefix cache is on:
# kvhead turns it off), "preemptions" (vLLM preempted a request: Ray exports a counter from its
# first increment), "placement" (a running placement actor exports it).
Needs = Literal[
    "always", "load", "errors", "exceptions", "prefix_caching", "preemptions", "placement"
]

# Panel kinds both renderers know: a time series, a single latest value, a bucket heatmap of
# a Prometheus histogram over time, and a layer x head grid of a per-head gauge.
Kind = Literal["timeseries", "stat", "histogram_heatmap", "head_grid"]


@dataclass(frozen=True)
class Query:
    """One PromQL expression of a panel, written with Grafana's variables ($model, $tier,
    $__rate_interval); :func:`dashboards.promql.expand` substitutes them for plain Prometheus."""

    expr: str
    legend: str
    source: Source
    needs: Needs = "always"


@dataclass(frozen=True)
class Threshold:
    """From ``value`` upwards the panel turns ``color``; the first step's value is None (base)."""

    value: float | None
    color: Literal["green", "yellow", "orange", "red", "blue", "text"]


@dataclass(frozen=True)
class Panel:
    """A panel: what it plots, in which unit, and when it turns red (``thresholds``)."""

    title: str
    description: str
    queries: tuple[Query, ...]
    kind: Kind = "timeseries"
    unit: str = "short"  # Grafana unit ids: s, bytes, Bps, reqps, percentunit, short, ...
    thresholds: tuple[Threshold, ...] = ()
    width: int = 8  # of Grafana's 24 grid columns
    min: float | None = None
    max: float | None = None
    stack: bool = False

    def __post_init__(self) -> None:
        if not self.queries:
            raise ValueError(f"panel {self.title!r} has no query")
        if self.thresholds and self.thresholds[0].value is not None:
            raise ValueError(f"panel {self.title!r}: the first threshold step is the base (None)")


GRID = 24  # Grafana's dashboard width in columns


@dataclass(frozen=True)
class Row:
    """Panels laid left to right, wrapping at the grid's width; a panel that would straddle the
    edge is refused, so Grafana and the snapshot grid show the same rows."""

    title: str
    panels: tuple[Panel, ...]
    note: str = ""  # e.g. which process exports the row's metrics

    def __post_init__(self) -> None:
        used = 0
        for panel in self.panels:
            if used % GRID + panel.width > GRID:
                raise ValueError(f"row {self.title!r}: panel {panel.title!r} crosses the edge")
            used += panel.width
        if used % GRID:
            raise ValueError(f"row {self.title!r}: panels fill {used % GRID} of the last line")


@dataclass(frozen=True)
class Variable:
    """A Grafana query variable over one label (``label_values(metric, label)``); "All" is
    ``.*``, which is also what the plain-Prometheus expansion substitutes."""

    name: str
    label: str
    metric: str
    title: str


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = field(default=("kvhead",))

    @property
    def panels(self) -> tuple[Panel, ...]:
        return tuple(p for row in self.rows for p in row.panels)

    @property
    def filename(self) -> str:
        return f"{self.uid}.json"


# Threshold sets reused across panels.
OK = Threshold(None, "green")


def above(warn: float, bad: float) -> tuple[Threshold, ...]:
    """Green below ``warn``, yellow from it, red from ``bad`` (latencies, usage, errors)."""
    return (OK, Threshold(warn, "yellow"), Threshold(bad, "red"))


def below(bad: float, warn: float) -> tuple[Threshold, ...]:
    """Red below ``bad``, yellow below ``warn``, green above (hit ratios, healthy counts)."""
    return (Threshold(None, "red"), Threshold(bad, "yellow"), Threshold(warn, "green"))
