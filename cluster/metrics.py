"""The placement actor's ``kvhead_*`` metrics, published like an engine's (multiprocess files).

The actor runs in a Ray worker process of its own, so it writes its samples into the node-local
folder ``$KVHEAD_METRICS_DIR`` (:class:`kvstore.metrics.MultiprocessPublisher`) and the node's
exporter serves them (:class:`kvstore.metrics.NodeCollector`).

- ``kvhead_helix_groups{model,node}`` (gauge): Helix groups placed on each node.
- ``kvhead_placement_unplaced_groups{model,kind}`` (gauge): wanted groups with no node.
- ``kvhead_placement_changes_total{reason}`` (counter): placed, moved, unplaced, removed, made
  by this process. The exporter sums counters over processes, dead ones included, so each
  incarnation counts only its own changes; the plan's lifetime totals are in Redis.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator, Mapping

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cluster.plan import PlacementPlan


class PlacementCollector(Collector):
    """Turns the current plan and this process's change counts into metric families.

    A published gauge stays in its file until overwritten, so a label set that disappears (a
    group moved off a node) is written once more as 0 rather than left at its last value.
    """

    def __init__(self, snapshot: Callable[[], tuple[PlacementPlan, Mapping[str, int]]]) -> None:
        self.snapshot = snapshot
        self._seen: dict[str, set[tuple[str, str]]] = {"helix": set(), "unplaced": set()}

    def collect(self) -> Iterator[Metric]:
        plan, changes = self.snapshot()
        helix = Counter(
            (g.model, g.node_id) for g in plan.groups if g.kind == "helix" and g.node_id
        )
        unplaced = Counter((g.model, g.kind) for g in plan.groups if g.node_id is None)
        yield self._gauge(
            "helix",
            GaugeMetricFamily(
                "kvhead_helix_groups", "Helix groups placed, per node.", labels=["model", "node"]
            ),
            helix,
        )
        yield self._gauge(
            "unplaced",
            GaugeMetricFamily(
                "kvhead_placement_unplaced_groups",
                "Wanted groups that no node can take now.",
                labels=["model", "kind"],
            ),
            unplaced,
        )
        family = CounterMetricFamily(
            "kvhead_placement_changes",
            "Placement changes made by this actor process, by reason.",
            labels=["reason"],
        )
        for reason in ("placed", "moved", "unplaced", "removed"):
            family.add_metric([reason], changes.get(reason, 0))
        yield family

    def _gauge(
        self, name: str, family: GaugeMetricFamily, values: Counter[tuple[str, str]]
    ) -> GaugeMetricFamily:
        self._seen[name] |= set(values)
        for labels in sorted(self._seen[name]):
            family.add_metric(list(labels), values.get(labels, 0))
        return family
