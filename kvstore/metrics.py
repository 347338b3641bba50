"""The one place that owns prometheus-client objects (STYLE habit 9: metrics are data).

Core code keeps plain counters and returns snapshots (:class:`kvstore.TierStats`); this module
turns snapshots into Prometheus samples at scrape time with a custom collector, so nothing in the
hot path touches a prometheus-client object or lock, and a scrape always sees one consistent
snapshot per tier. Metric names are ``kvhead_*`` (prometheus-client >= 0.23 rewrites ``a:b``
names) and are what the dashboards query; ``kvstore/README.md`` lists them.

Use::

    registry = CollectorRegistry()
    registry.register(KVStoreCollector.for_manager(store))
    server = serve_metrics(registry, "0.0.0.0", 9400)   # GET /metrics
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from threading import Thread
from typing import Protocol
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from kvstore.base import TierStats

PREFIX = "kvhead_kvstore_"

# TierStats counter field -> (metric name without prefix and "_total", help text)
COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("hits", "Pages found by get, per tier."),
    "misses": ("misses", "Pages asked for and not found (recompute), per tier."),
    "puts": ("puts", "Pages stored, per tier."),
    "put_failures": (
        "put_failures",
        (
            "Pages a tier refused or lost (Redis down or out of memory, write-behind queue full, "
            "spilled pages without a content address)."
        ),
    ),
    "evictions": ("evictions", "Pages evicted to make room."),
    "spilled": ("spilled_pages", "Pages handed to the next tier (host arena spill, write-behind)."),
    "corrupt": (
        "corrupt_pages",
        ("Pages whose header or checksum did not match: dropped, deleted, never served."),
    ),
    "errors": ("errors", "Remote operations that failed (connection, timeout, server error)."),
    "bytes_in": ("stored_bytes", "Payload bytes written into the tier."),
    "bytes_out": ("served_bytes", "Payload bytes served from the tier."),
}
GAUGES: dict[str, tuple[str, str]] = {
    "resident_pages": ("resident_pages", "Pages held now (0 where unknown, e.g. a shared Redis)."),
    "capacity_pages": ("capacity_pages", "Pages the tier can hold (0 = unbounded or unknown)."),
}
UP = ("up", "1 while the tier answers, 0 while it is unreachable (as of its last call).")
LATENCY = ("operation_seconds", "Wall time of tier operations (put, get, contains, ...).")


class SupportsTierStats(Protocol):
    """A tier manager: its own snapshot plus one per tier."""

    def stats(self) -> TierStats: ...

    def tier_stats(self) -> list[TierStats]: ...


class KVStoreCollector(Collector):
    """Exports ``kvhead_kvstore_*`` from the :class:`TierStats` snapshots ``snapshots()`` returns.

    Every metric carries a ``tier`` label (``TierStats.name``: ``manager`` for the tier
    manager's own view, ``host``, ``redis``); latency is a summary (``_count`` and ``_sum``)
    with an ``op`` label, so dashboards compute mean latency as ``rate(sum) / rate(count)``.
    """

    def __init__(self, snapshots: Callable[[], Iterable[TierStats]]) -> None:
        self.snapshots = snapshots

    @classmethod
    def for_manager(cls, manager: SupportsTierStats) -> KVStoreCollector:
        return cls(lambda: [manager.stats(), *manager.tier_stats()])

    def describe(self) -> list[Metric]:
        """Metric families without samples, so registering never calls ``snapshots``."""
        return list(_families().values())

    def collect(self) -> Iterator[Metric]:
        families = _families()
        counters = {f: families[f] for f in COUNTERS}
        for s in self.snapshots():
            for field, family in counters.items():
                family.add_metric([s.name], getattr(s, field))
            for field in GAUGES:
                families[field].add_metric([s.name], getattr(s, field))
            families["up"].add_metric([s.name], 1.0 if s.available else 0.0)
            for op, calls in sorted(s.op_calls.items()):
                families["latency"].add_metric([s.name, op], calls, s.op_seconds.get(op, 0.0))
        yield from families.values()


def _families() -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for field, (name, doc) in COUNTERS.items():
        out[field] = CounterMetricFamily(PREFIX + name, doc, labels=["tier"])
    for field, (name, doc) in GAUGES.items():
        out[field] = GaugeMetricFamily(PREFIX + name, doc, labels=["tier"])
    out["up"] = GaugeMetricFamily(PREFIX + UP[0], UP[1], labels=["tier"])
    out["latency"] = SummaryMetricFamily(PREFIX + LATENCY[0], LATENCY[1], labels=["tier", "op"])
    return out


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; ``port`` is the bound port (useful with port 0)."""

    server: WSGIServer
    thread: Thread

    @property
    def port(self) -> int:
        return self.server.server_port

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def serve_metrics(
    registry: CollectorRegistry, host: str = "0.0.0.0", port: int = 9400
) -> MetricsServer:
    """Serve ``registry`` in Prometheus text format on ``http://host:port/`` (any path) from a
    daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)
