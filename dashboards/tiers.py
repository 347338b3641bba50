"""The tiers dashboard: the host arena and Redis tier (``kvhead_kvstore_*``), prefix reuse
across replicas (``kvhead_connector_*`` and vLLM's external prefix-cache counters), and Helix
placement.

Every kvstore metric carries a ``tier`` label (``host``, ``redis``, ``manager``); the engines
export the host arena, and the Redis tier when the KV connector runs (docs/serving.md
"Metrics"). The placement row queries
``kvhead_helix_groups`` and ``kvhead_placement_changes_total``, which the placement actor
(``cluster/``) exports while it runs.
"""

from __future__ import annotations

from dashboards.promql import MODEL, TIER, rate, vllm
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


def _connector(name: str) -> str:
    return rate(f"kvhead_connector_{name}{{{MODEL}}}", "model")


PREFIX_REUSE = Row(
    "Prefix reuse across replicas (KV connector)",
    (
        Panel(
            "Prompt tokens loaded",
            "Prompt tokens per second whose prefill a replica skipped because another (or "
            "itself, earlier) stored them in Redis; the gap to vLLM's queried tokens is prefill "
            "still computed.",
            (
                Query(_connector("loaded_tokens_total"), "loaded {{model}}", "kvhead", "load"),
                Query(
                    f"sum by (model_name) (rate({vllm('external_prefix_cache_queries_total')}"
                    "[$__rate_interval]))",
                    "queried {{model_name}}",
                    "ray",
                    "load",
                ),
            ),
            unit="short",
            width=8,
        ),
        Panel(
            "External prefix hit rate",
            "vLLM's own count of prompt tokens the connector supplied over tokens it was asked "
            "about. Low with shared system prompts or documents: a TTL shorter than their "
            "reuse, or a Redis memory budget too small.",
            (
                Query(
                    f"sum(rate({vllm('external_prefix_cache_hits_total')}[$__rate_interval])) / "
                    f"sum(rate({vllm('external_prefix_cache_queries_total')}[$__rate_interval]))",
                    "hit rate",
                    "ray",
                    "load",
                ),
            ),
            kind="stat",
            unit="percentunit",
            width=4,
        ),
        Panel(
            "Loads and saves",
            "Prompts loaded and saved per second, and the ones that fell back: a failed load "
            "recomputes the prompt (a missing, corrupt or foreign page, Redis down), a failed "
            "save leaves it unshared. Failures never fail a request.",
            (
                Query(_connector("loads_total"), "loads {{model}}", "kvhead", "load"),
                Query(_connector("saves_total"), "saves {{model}}", "kvhead", "load"),
                Query(_connector("load_failures_total"), "failed loads {{model}}", "kvhead"),
                Query(_connector("save_failures_total"), "failed saves {{model}}", "kvhead"),
            ),
            unit="ops",
            width=12,
        ),
    ),
    note="From replicas whose serve config sets kv_connector (a shared Redis).",
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
    rows=(TIERS, PREFIX_REUSE, PLACEMENT),
    variables=(Variable("tier", "tier", "kvhead_kvstore_up", "Tier"),),
)
