"""The tiers dashboard: the host arena and Redis tier (``kvhead_kvstore_*``), and Helix placement.

Every kvstore metric carries a ``tier`` label (``host``, ``redis``, ``manager``); the engines
export the host arena today (docs/serving.md "Metrics"). The placement row queries
``kvhead_helix_groups`` and ``kvhead_placement_changes_total``, which the placement actor
(``cluster/``) exports while it runs.
"""

from __future__ import annotations

from dashboards.promql import TIER, rate
from dashboards.spec import OK, Dashboard, Panel, Query, Row, Threshold, Variable, above, below

KV = "kvhead_kvstore_"


def _tier(name: str) -> str:
    return f"{KV}{name}{{{TIER}}}"


def _rate(name: str) -> str:
    return rate(_tier(name), "tier")


TIERS = Row(
    "Host and Redis tiers",
    (
        Panel(
            "Tier up",
            "1 while a tier answers (as of its last call). Red: Redis is unreachable; pages "
            "are recomputed, nothing fails, but cross-replica reuse stops.",
            (Query(f"min by (tier) ({_tier('up')})", "{{tier}}", "kvhead"),),
            kind="stat",
            thresholds=(Threshold(None, "red"), Threshold(1, "green")),
            width=4,
        ),
        Panel(
            "Tier usage",
            "Pages held over capacity, for tiers with a bound (the host arena). Red from 98%: "
            "the arena evicts before pages are reused; raise host_arena_gib.",
            (
                Query(
                    f"sum by (tier) ({_tier('resident_pages')}) / "
                    f"(sum by (tier) ({_tier('capacity_pages')}) > 0)",
                    "{{tier}}",
                    "kvhead",
                ),
            ),
            unit="percentunit",
            thresholds=above(0.9, 0.98),
            width=10,
            min=0,
            max=1,
        ),
        Panel(
            "Hit ratio",
            "Pages found over pages asked for, per tier. Red below 50%: most lookups "
            "recompute (cold cache, a TTL shorter than reuse, or evictions).",
            (
                Query(
                    f"{_rate('hits_total')} / ({_rate('hits_total')} + {_rate('misses_total')})",
                    "{{tier}}",
                    "kvhead",
                    "load",
                ),
            ),
            unit="percentunit",
            thresholds=below(0.5, 0.8),
            width=10,
            min=0,
            max=1,
        ),
        Panel(
            "Bytes stored and served",
            "Payload bytes per second written into and served from each tier.",
            (
                Query(_rate("stored_bytes_total"), "stored {{tier}}", "kvhead", "load"),
                Query(_rate("served_bytes_total"), "served {{tier}}", "kvhead", "load"),
            ),
            unit="Bps",
        ),
        Panel(
            "Errors",
            "Failed remote operations, pages a tier refused or lost, and corrupt pages "
            "(dropped, never served). Anything above 0 is red: check Redis's health, memory "
            "and network.",
            (
                Query(_rate("errors_total"), "errors {{tier}}", "kvhead"),
                Query(_rate("put_failures_total"), "put failures {{tier}}", "kvhead"),
                Query(_rate("corrupt_pages_total"), "corrupt {{tier}}", "kvhead"),
            ),
            unit="ops",
            thresholds=(OK, Threshold(0.001, "red")),
        ),
        Panel(
            "Evictions and spills",
            "Pages evicted to make room and pages handed to the next tier, per second.",
            (
                Query(_rate("evictions_total"), "evicted {{tier}}", "kvhead"),
                Query(_rate("spilled_pages_total"), "spilled {{tier}}", "kvhead"),
            ),
            unit="ops",
        ),
        Panel(
            "Mean operation latency",
            "Wall time per tier operation. Red from 50 ms: Redis is overloaded or far away "
            "(its socket timeout is 0.5 s).",
            (
                Query(
                    f"sum by (tier, op) (rate({_tier('operation_seconds_sum')}[$__rate_interval]))"
                    f" / sum by (tier, op) (rate({_tier('operation_seconds_count')}"
                    "[$__rate_interval]))",
                    "{{tier}} {{op}}",
                    "kvhead",
                    "load",
                ),
            ),
            unit="s",
            thresholds=above(0.005, 0.05),
            width=24,
        ),
    ),
)

PLACEMENT = Row(
    "Helix placement",
    (
        Panel(
            "Helix groups per node",
            "KVP x TP groups the placement actor placed on each node (kvhead_helix_groups {node}).",
            (Query("sum by (node) (kvhead_helix_groups)", "{{node}}", "placement", "placement"),),
            width=12,
        ),
        Panel(
            "Placement changes",
            "Groups placed, moved, unplaced or removed over the last hour, by reason "
            "(kvhead_placement_changes_total{reason}). Many moves mean nodes come and go.",
            (
                Query(
                    "sum by (reason) (increase(kvhead_placement_changes_total[1h]))",
                    "{{reason}}",
                    "placement",
                    "placement",
                ),
            ),
            thresholds=above(1, 5),
            width=12,
        ),
    ),
    note="From the placement actor (cluster/), published on the head node's exporter.",
)

TIERS_DASHBOARD = Dashboard(
    uid="kvhead-tiers",
    title="kvhead / KV tiers and placement",
    description="Host arena and Redis tier usage, hits, bytes, errors; Helix placement.",
    rows=(TIERS, PLACEMENT),
    variables=(Variable("tier", "tier", "kvhead_kvstore_up", "Tier"),),
)
