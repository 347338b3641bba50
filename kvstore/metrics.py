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

import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
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
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from kvstore.base import TierStats

PREFIX = "kvhead_kvstore_"
METRICS_PORT = 9400  # where a kvhead /metrics endpoint listens unless told otherwise

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
    registry: CollectorRegistry, host: str = "0.0.0.0", port: int = METRICS_PORT
) -> MetricsServer:
    """Serve ``registry`` in Prometheus text format on ``http://host:port/`` (any path) from a
    daemon thread."""
    server, thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(server, thread)


# -- across processes ------------------------------------------------------------------------
# An engine's worker is a process of its own (vLLM's engine core, under a Ray Serve replica),
# so its collectors cannot be scraped in place. Each worker writes its samples into
# prometheus-client's multiprocess files in one node-local folder; one exporter per node
# (``kvhead metrics``, a sidecar, or ``kvhead serve`` itself) merges and serves them. Files are
# written with absolute values, so a scrape never depends on how often a worker published.
METRICS_DIR_ENV = "KVHEAD_METRICS_DIR"  # the node-local folder processes publish into
METRICS_DIR = "/tmp/kvhead/metrics"  # that folder unless configured
_FILES = {"counter": "counter", "gauge": "gauge_liveall", "summary": "summary"}


class MultiprocessPublisher:
    """Writes the samples of ``collectors`` into this process's files under ``directory``.

    Gauges go to ``gauge_liveall`` files (a ``pid`` label is added when merged, and the
    exporter drops a dead process's gauges); counters and summaries are summed over processes,
    dead ones included, as Prometheus expects of counters.
    """

    def __init__(self, directory: str | Path, collectors: Iterable[Collector]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.collectors = list(collectors)
        self._files: dict[str, MmapedDict] = {}

    def publish(self) -> None:
        for collector in self.collectors:
            for family in collector.collect():
                kind = _FILES.get(family.type)
                if kind is None:
                    raise ValueError(f"{family.name}: {family.type} metrics are not published")
                sink = self._file(kind)
                for sample in family.samples:
                    if sample.name.endswith("_created"):
                        continue
                    key = mmap_key(
                        family.name,
                        sample.name,
                        list(sample.labels),
                        list(sample.labels.values()),
                        family.documentation,
                    )
                    sink.write_value(key, float(sample.value), 0.0)

    def _file(self, kind: str) -> MmapedDict:
        if kind not in self._files:
            self._files[kind] = MmapedDict(str(self.directory / f"{kind}_{os.getpid()}.db"))
        return self._files[kind]

    def close(self) -> None:
        for sink in self._files.values():
            sink.close()
        self._files.clear()


class NodeCollector(Collector):
    """Merges every process's files under ``directory`` into ``kvhead_*`` metrics.

    Before each merge the gauges of processes that no longer run are removed (an engine that
    stopped must not keep reporting live pages); the exporter must see the engines' process ids
    (same host, or a shared process namespace in a pod).
    """

    def __init__(self, directory: str | Path, prefix: str = "kvhead_") -> None:
        self.directory = Path(directory)
        self.prefix = prefix

    def clear_finished(self) -> None:
        """Remove every file of processes that no longer run, counters included: what a new
        deployment does first, so totals start from its own engines."""
        for path in self.directory.glob("*_*.db"):
            if not _alive(_pid(path)):
                path.unlink(missing_ok=True)

    def collect(self) -> Iterator[Metric]:
        for path in self.directory.glob("gauge_live*_*.db"):
            pid = _pid(path)
            if not _alive(pid):
                mark_process_dead(pid, str(self.directory))
        files = [str(p) for p in self.directory.glob("*.db")]
        for metric in MultiProcessCollector.merge(files):
            if metric.name.startswith(self.prefix):
                yield metric


def serve_node_metrics(directory: str | Path, host: str, port: int) -> MetricsServer:
    """The per-host exporter: every process's files under ``directory`` on ``host:port``."""
    collector = NodeCollector(directory)
    collector.directory.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    registry.register(collector)
    return serve_metrics(registry, host, port)


def _pid(path: Path) -> int:
    """The process id a multiprocess file is named after (``<kind>_<pid>.db``)."""
    return int(path.stem.rsplit("_", 1)[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
