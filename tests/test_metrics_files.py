"""Metrics across processes (kvstore.metrics): engine processes publish into one folder, one
exporter merges and serves it; processes here are real ones, scraped over real HTTP."""

from __future__ import annotations

import multiprocessing as mp
import time
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    SummaryMetricFamily,
)
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from kvstore.metrics import MultiprocessPublisher, NodeCollector, serve_metrics


class _Fixed(Collector):
    """One engine's worth of samples: ``scale`` sets their values."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def collect(self):
        pages = CounterMetricFamily("kvhead_test_pages", "pages", labels=["head"])
        pages.add_metric(["0"], 10 * self.scale)
        pages.add_metric(["1"], 20 * self.scale)
        live = GaugeMetricFamily("kvhead_test_live", "live", labels=["head"])
        live.add_metric(["0"], self.scale)
        rco = SummaryMetricFamily("kvhead_test_rco", "rco", labels=["head"])
        rco.add_metric(["0"], count_value=4 * self.scale, sum_value=2 * self.scale)
        other = GaugeMetricFamily("not_ours", "another library's metric")
        other.add_metric([], 1)
        return [pages, live, rco, other]


def _engine(directory: str, scale: float, publishes: int, hold: mp.Event | None) -> None:
    publisher = MultiprocessPublisher(directory, [_Fixed(scale)])
    for _ in range(publishes):  # republishing writes absolute values: no double counting
        publisher.publish()
    if hold is not None:
        hold.wait(60)


def _scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_exporter_sums_counters_keeps_live_gauges_and_drops_dead_ones(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    hold = ctx.Event()
    live = ctx.Process(target=_engine, args=(str(tmp_path), 1.0, 3, hold))
    live.start()
    gone = ctx.Process(target=_engine, args=(str(tmp_path), 2.0, 2, None))
    gone.start()
    gone.join(60)
    registry = CollectorRegistry()
    registry.register(NodeCollector(tmp_path))
    server = serve_metrics(registry, "127.0.0.1", 0)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / f"gauge_liveall_{live.pid}.db").exists():
            assert time.monotonic() < deadline, "the live engine never published"
            time.sleep(0.1)
        metrics = _scrape(server.port)
        # counters and summaries: both processes, the finished one included
        assert metrics[("kvhead_test_pages_total", (("head", "0"),))] == 30
        assert metrics[("kvhead_test_pages_total", (("head", "1"),))] == 60
        assert metrics[("kvhead_test_rco_count", (("head", "0"),))] == 12
        assert metrics[("kvhead_test_rco_sum", (("head", "0"),))] == 6
        # gauges: one series per live process, the finished one's removed
        gauges = {k: v for k, v in metrics.items() if k[0] == "kvhead_test_live"}
        assert gauges == {("kvhead_test_live", (("head", "0"), ("pid", str(live.pid)))): 1.0}
        assert not list(tmp_path.glob(f"gauge_liveall_{gone.pid}.db"))
        assert not any(name == "not_ours" for name, _ in metrics)
        hold.set()
        live.join(60)
        metrics = _scrape(server.port)
        assert not any(name == "kvhead_test_live" for name, _ in metrics)
        assert metrics[("kvhead_test_pages_total", (("head", "0"),))] == 30
    finally:
        hold.set()
        live.join(60)
        server.close()
