"""Every dashboard query against a real Prometheus (Debian's), and the PNG snapshots it feeds.

Prometheus scrapes two local exporters shaped like a deployment's: the engines' ``kvhead_*``
families of ``kvhead/vllm/metrics.py`` (synthetic values) written through the real multiprocess
files and served by the real per-host exporter, and ``ray_*`` series under every name the
dashboards read from Ray's port (their existence in vLLM and Ray Serve is checked by
test_dashboards.py). Queries against a running deployment under load are
tests/test_serve_app.py's.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_server import Prometheus, running_prometheus

from cluster.metrics import PlacementCollector
from cluster.plan import GroupPlacement, PlacementPlan
from dashboards.promql import metric_names, queries
from dashboards.snapshot import SnapshotError, snapshot
from dashboards.spec import Dashboard, Panel, Query, Row
from kvhead.vllm.metrics import exported
from kvstore.base import TierStats
from kvstore.metrics import (
    KVStoreCollector,
    MetricsServer,
    MultiprocessPublisher,
    NodeCollector,
    serve_metrics,
)

RATE = "10s"  # 10 scrapes at Prometheus's 1 s interval
LAYERS, HEADS = 4, 2
MODEL = "smol"
FAMILIES = {"gauge": GaugeMetricFamily, "counter": CounterMetricFamily}


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def __call__(self) -> float:
        return time.monotonic() - self.start + 1.0


class FakeEngine(Collector):
    """Every family an engine exports, with the labels of kvhead/vllm/metrics.py."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        t = self.clock()
        for name, kind in exported().items():
            if name.startswith("kvhead_head_"):
                keys = [
                    [MODEL, str(layer), str(head)]
                    for layer in range(LAYERS)
                    for head in range(HEADS)
                ]
                labels = ["model", "layer", "head"]
            elif name.startswith("kvhead_layer_"):
                keys, labels = [[MODEL, str(layer)] for layer in range(LAYERS)], ["model", "layer"]
            else:
                keys, labels = [[MODEL]], ["model"]
            if kind == "summary":
                family = SummaryMetricFamily(name, "synthetic", labels=labels)
                for key in keys:
                    family.add_metric(key, count_value=int(10 * t), sum_value=8.0 * t)
            else:
                family = FAMILIES[kind](name, "synthetic", labels=labels)
                for i, key in enumerate(keys):
                    family.add_metric(key, (i + 1) * t if kind == "counter" else (i % 3 + 1) / 4)
            yield family


class FakeRay(Collector):
    """A series under each ``ray_*`` name the dashboards read, shaped like Ray's exporter's."""

    LABELS = {
        "model_name": MODEL,
        "deployment": "LLMServer",
        "status_code": "429",
        "error_code": "429",
        "exception_type": "RuntimeError",
    }

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        read = set().union(*(metric_names(q.expr) for q in queries() if q.source == "ray"))
        self.names = sorted(read)

    def collect(self) -> Iterator[Metric]:
        t = self.clock()
        keys, values = list(self.LABELS), list(self.LABELS.values())
        for name in self.names:
            if name.endswith("_bucket"):
                family = HistogramMetricFamily(name.removesuffix("_bucket"), "", labels=keys)
                bounds = ["0.01", "0.1", "1.0", "10.0", "+Inf"]
                buckets = [(b, t * (i + 1)) for i, b in enumerate(bounds)]
                family.add_metric(values, buckets, sum_value=t)
            elif name.endswith("_total"):
                family = CounterMetricFamily(name, "", labels=keys)
                family.add_metric(values, 3 * t)
            else:
                family = GaugeMetricFamily(name, "", labels=keys)
                family.add_metric(values, 0.5)
            yield family


def host_tiers(clock: Clock) -> list[TierStats]:
    t = clock()
    host = TierStats("host", capacity_pages=1000, resident_pages=600, hits=int(40 * t))
    host.misses, host.bytes_in, host.bytes_out = int(10 * t), int(4096 * t), int(8192 * t)
    host.op_calls, host.op_seconds = {"get": int(50 * t)}, {"get": 0.001 * t}
    return [host, TierStats("redis", hits=int(5 * t), misses=int(5 * t), available=False)]


def placement() -> tuple[PlacementPlan, dict[str, int]]:
    """The placement actor's view: one Helix group placed on one node, one move counted."""
    group = GroupPlacement(
        model=MODEL, kind="helix", index=0, node_id="node-1", world=4, kvp=2, tp=2
    )
    return PlacementPlan(cluster="test", groups=[group]), {"placed": 1}


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory) -> Iterator[Prometheus]:
    tmp = tmp_path_factory.mktemp("dashboards")
    clock = Clock()
    publisher = MultiprocessPublisher(tmp / "metrics", [FakeEngine(clock)])
    publisher.collectors.append(KVStoreCollector(lambda: host_tiers(clock)))
    publisher.collectors.append(PlacementCollector(placement))
    publisher.publish()
    kvhead, ray = CollectorRegistry(), CollectorRegistry()
    kvhead.register(NodeCollector(tmp / "metrics"))
    ray.register(FakeRay(clock))
    servers: list[MetricsServer] = [
        serve_metrics(kvhead, "127.0.0.1", 0),
        serve_metrics(ray, "127.0.0.1", 0),
    ]
    targets = [f"127.0.0.1:{s.port}" for s in servers]
    stop = time.monotonic() + 600
    try:
        with running_prometheus(targets, tmp) as prom:
            while time.monotonic() < stop and not prom.query(
                f"rate(kvhead_layer_reranks_total[{RATE}]) > 0"
            ):
                publisher.publish()  # engines publish every 2 s; here every scrape
                time.sleep(0.5)
            for _ in range(6):  # a few more points for the snapshots
                publisher.publish()
                time.sleep(0.5)
            yield prom
    finally:
        for server in servers:
            server.close()
        publisher.close()


def test_every_query_runs_and_returns_data(prometheus: Prometheus) -> None:
    """Prometheus accepts every expression, and each returns series when its metrics exist."""
    empty = []
    for q in queries(rate_interval=RATE):
        result = prometheus.query(q.promql)  # asserts status "success": the syntax is valid
        if not result:
            empty.append((q.panel, q.promql))
    assert empty == []


def test_per_head_queries_give_one_series_per_head(prometheus: Prometheus) -> None:
    grid = next(q for q in queries(rate_interval=RATE) if q.panel.startswith("Online instability"))
    assert len(prometheus.query(grid.promql)) == LAYERS * HEADS
    stable = next(q for q in queries(rate_interval=RATE) if q.panel == "Stable heads")
    dense = next(q for q in queries(rate_interval=RATE) if q.panel == "Dense heads")
    total = sum(prometheus.values(stable.promql)) + sum(prometheus.values(dense.promql))
    assert total == LAYERS * HEADS


def test_snapshot_renders_every_panel(prometheus: Prometheus, tmp_path: Path) -> None:
    rendered = snapshot(prometheus.url, tmp_path, minutes=2, rate_interval=RATE)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index) == len(rendered) == len({(q.dashboard, q.panel) for q in queries()})
    no_data = {r.panel for r in rendered if r.status != "ok"}
    assert no_data == set()
    for r in rendered:
        assert (tmp_path / r.file).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for uid in ("kvhead-serving", "kvhead-heads", "kvhead-tiers"):
        assert (tmp_path / f"{uid}.png").stat().st_size > 50_000


def test_snapshot_draws_a_failed_query_and_goes_on(prometheus: Prometheus, tmp_path: Path) -> None:
    panels = (
        Panel("broken", "", (Query("sum(rate(up[", "", "ray"),), width=12),
        Panel("fine", "", (Query("up", "{{instance}}", "ray"),), width=12),
    )
    board = Dashboard("t", "t", "", (Row("r", panels),))
    rendered = snapshot(prometheus.url, tmp_path, minutes=1, dashboards=(board,))
    assert [r.status for r in rendered] == ["error", "ok"]
    assert "HTTP 400" in rendered[0].error and (tmp_path / rendered[0].file).is_file()


def test_snapshot_refuses_what_is_not_prometheus(tmp_path: Path) -> None:
    with pytest.raises(SnapshotError, match="not an http"):
        snapshot("localhost:9090", tmp_path)
    with pytest.raises(SnapshotError, match="cannot reach Prometheus"):
        snapshot("http://127.0.0.1:9", tmp_path)
