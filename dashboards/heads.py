"""The heads dashboard: what only kvhead has, from the engines' ``kvhead_*`` metrics.

Which heads are stable and how unstable each one is live, how much device KV that saves, and
what it costs (reranks, pages promoted from the host tier). Names and labels are
``kvhead/vllm/metrics.py``'s (docs/serving.md "Metrics").
"""

from __future__ import annotations

from dashboards.promql import MODEL, per_head, rate, ratio
from dashboards.spec import OK, Dashboard, Panel, Query, Row, Threshold, Variable, above

STABLE = per_head("kvhead_head_stable")


def _kvhead(name: str) -> str:
    return f"{name}{{{MODEL}}}"


HEADS = Row(
    "Heads",
    (
        Panel(
            "Stable heads",
            "KV heads kept as top-K pages on the device (the rest are dense: every page).",
            (Query(f"sum by (model) ({STABLE})", "{{model}}", "kvhead"),),
            kind="stat",
            width=4,
        ),
        Panel(
            "Dense heads",
            "KV heads that keep every page on the device (the profile's most unstable).",
            (
                Query(
                    f"count by (model) ({STABLE}) - sum by (model) ({STABLE})",
                    "{{model}}",
                    "kvhead",
                ),
            ),
            kind="stat",
            width=4,
        ),
        Panel(
            "Drifted heads",
            "Stable heads whose live RCO stayed below their profile's for 32 reranks. Yellow "
            "from 1, red from 4: the profile no longer fits the traffic; re-profile the model "
            "(kvhead profile) or move to a preset with more dense heads.",
            (Query(f"sum by (model) ({per_head('kvhead_head_drifted')})", "{{model}}", "kvhead"),),
            kind="stat",
            thresholds=above(1, 4),
            width=4,
        ),
        Panel(
            "Drift events per second",
            "Times a head's live RCO left its profile's band.",
            (
                Query(
                    rate(_kvhead("kvhead_head_drift_events_total"), "model"),
                    "{{model}}",
                    "kvhead",
                    "load",
                ),
            ),
            thresholds=(OK, Threshold(0.01, "yellow")),
            width=12,
        ),
        Panel(
            "Online instability, layer x head",
            "1 - smoothed RCO between each stable head's consecutive reranks, live (dense heads "
            "have none). A row per head; red cells are stable heads that jump around.",
            (
                Query(
                    per_head("kvhead_head_online_instability"),
                    "L{{layer}} H{{head}}",
                    "kvhead",
                    "load",
                ),
            ),
            kind="head_grid",
            unit="percentunit",
            thresholds=above(0.3, 0.6),
            width=12,
            min=0,
            max=1,
        ),
        Panel(
            "Profile instability, layer x head",
            "The head profile's 1 - mean RCO that chose the dense heads, for comparison with "
            "the live map.",
            (Query(per_head("kvhead_head_profile_instability"), "L{{layer}} H{{head}}", "kvhead"),),
            kind="head_grid",
            unit="percentunit",
            thresholds=above(0.3, 0.6),
            width=12,
            min=0,
            max=1,
        ),
        Panel(
            "Mean RCO per layer",
            "Random-corrected overlap of stable heads' consecutive top-K sets over the window "
            "(1: the same pages every rerank).",
            (
                Query(
                    ratio(
                        _kvhead("kvhead_head_rco_sum"), _kvhead("kvhead_head_rco_count"), "layer"
                    ),
                    "layer {{layer}}",
                    "kvhead",
                    "load",
                ),
            ),
            unit="percentunit",
            width=24,
            min=0,
            max=1,
        ),
    ),
)

DEVICE = Row(
    "Device KV",
    (
        Panel(
            "Device KV saved",
            "Bytes of live stable-head pages kept off the device (in the host tier instead).",
            (
                Query(
                    f"sum by (model) ({_kvhead('kvhead_device_kv_bytes_saved')})",
                    "{{model}}",
                    "kvhead",
                ),
            ),
            unit="bytes",
        ),
        Panel(
            "Pages on the device and only on the host",
            "Live requests' pages summed over heads: held on the device (hot pool or vLLM's "
            "cache) and only in the host arena.",
            (
                Query(
                    f"sum by (model) ({_kvhead('kvhead_head_device_pages')})",
                    "device {{model}}",
                    "kvhead",
                ),
                Query(
                    f"sum by (model) ({_kvhead('kvhead_head_host_pages')})",
                    "host only {{model}}",
                    "kvhead",
                ),
            ),
            stack=True,
        ),
        Panel(
            "Pages attended from the device",
            "Share of (sequence, head) pages that decode read from the device; the rest count "
            "as one summary token each.",
            (
                Query(
                    ratio(
                        _kvhead("kvhead_resident_page_steps_total"),
                        _kvhead("kvhead_page_steps_total"),
                        "model",
                    ),
                    "{{model}}",
                    "kvhead",
                    "load",
                ),
            ),
            unit="percentunit",
            min=0,
            max=1,
        ),
        Panel(
            "Hot pool usage",
            "Stable-head pages in the device hot pools over their capacity. Red from 98%: "
            "top-K sets no longer fit; raise kv_cache_gib or lower max_num_seqs.",
            (
                Query(
                    f"sum by (model) ({_kvhead('kvhead_hot_pool_pages')}) / sum by (model) "
                    f"({_kvhead('kvhead_hot_pool_capacity_pages')})",
                    "{{model}}",
                    "kvhead",
                ),
            ),
            unit="percentunit",
            thresholds=above(0.9, 0.98),
            min=0,
            max=1,
        ),
        Panel(
            "Live requests",
            "Requests holding KV in the engines.",
            (Query(f"sum by (model) ({_kvhead('kvhead_live_requests')})", "{{model}}", "kvhead"),),
        ),
        Panel(
            "Device KV saved now",
            "Bytes of stable-head KV the engines keep off the device right now.",
            (Query(f"sum({_kvhead('kvhead_device_kv_bytes_saved')})", "saved", "kvhead"),),
            kind="stat",
            unit="bytes",
        ),
    ),
)

RERANKS = Row(
    "Reranks and promotions",
    (
        Panel(
            "Reranks per second",
            "Request rows whose stable heads re-chose their top-K pages, per layer (every R "
            "decode steps).",
            (
                Query(
                    rate(_kvhead("kvhead_layer_reranks_total"), "layer"),
                    "layer {{layer}}",
                    "kvhead",
                    "load",
                ),
            ),
        ),
        Panel(
            "Promoted pages per second",
            "Pages copied host -> device hot pool at reranks.",
            (
                Query(
                    rate(_kvhead("kvhead_head_promoted_pages_total"), "model"),
                    "{{model}}",
                    "kvhead",
                    "load",
                ),
            ),
        ),
        Panel(
            "Promoted pages per rerank",
            "Host -> device copies per reranked request row: high values mean the top-K sets "
            "churn (stable heads that are not), which costs bandwidth every R steps.",
            (
                Query(
                    f"{rate(_kvhead('kvhead_head_promoted_pages_total'), 'model')} / "
                    f"{rate(_kvhead('kvhead_layer_reranks_total'), 'model')}",
                    "{{model}}",
                    "kvhead",
                    "load",
                ),
            ),
        ),
    ),
)

HEADS_DASHBOARD = Dashboard(
    uid="kvhead-heads",
    title="kvhead / Heads and device KV",
    description="Stable and dense heads, live instability, device KV saved, reranks.",
    rows=(HEADS, DEVICE, RERANKS),
    variables=(Variable("model", "model", "kvhead_live_requests", "Model"),),
)
