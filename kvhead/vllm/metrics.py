"""Per-head Prometheus metrics of a serving engine (``kvhead_*``; names listed in docs/serving.md).

The runtime keeps plain counters and tensors; :class:`HeadMetrics` turns them into metric
families when collected. vLLM runs the worker in its engine-core process, so the worker
publishes these families into prometheus-client's multiprocess files under
``$KVHEAD_METRICS_DIR`` (:class:`kvstore.metrics.MultiprocessPublisher`, at most every
``PUBLISH_INTERVAL_S`` from the step loop) and one exporter per node serves them
(:class:`kvstore.metrics.NodeCollector`: ``kvhead serve`` starts it; in Kubernetes a sidecar).
With vLLM's own OpenAI server, pointing ``PROMETHEUS_MULTIPROC_DIR`` and ``KVHEAD_METRICS_DIR``
at one folder puts them on vLLM's ``/metrics`` beside ``vllm:*``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from kvstore.metrics import KVStoreCollector

if TYPE_CHECKING:
    from kvhead.vllm.runtime import FlexiRuntime

PUBLISH_INTERVAL_S = 2.0
HEAD = ["model", "layer", "head"]


class HeadMetrics(Collector):
    """``kvhead_head_*`` per (model, layer, kv head), ``kvhead_layer_*`` and engine totals, plus
    the host arena's ``kvhead_kvstore_*`` (tier ``host``)."""

    def __init__(self, runtime: FlexiRuntime, model: str) -> None:
        self.runtime, self.model = runtime, model

    def collect(self) -> Iterator[Metric]:
        rt = self.runtime
        m = _families()
        host_pages = 0
        # residency and state per head as the heads route reports them; counters from the layers
        for entry in rt.heads_report()["layers"]:
            index = entry["layer"]
            layer = rt.layers.get(index)
            if layer is not None:
                labels = [self.model, str(index)]
                m["reranks"].add_metric(labels, layer.stats.reranks)
                m["decode_steps"].add_metric(labels, layer.stats.decode_steps)
            stable = rt.split.stable(index).tolist()
            for head in entry["heads"]:
                labels = [self.model, str(index), str(head["head"])]
                m["stable"].add_metric(labels, float(head["state"] == "stable"))
                if rt.profile is not None:
                    m["profile"].add_metric(labels, _or_nan(head["instability"]))
                m["device_pages"].add_metric(labels, head["device_pages"])
                m["host_pages"].add_metric(labels, head["host_pages"])
                host_pages += head["host_pages"]
                if layer is None or head["state"] != "stable":
                    continue
                m["online"].add_metric(labels, _or_nan(head["online_instability"]))
                m["drifted"].add_metric(labels, float(head["drifted"]))
                i = stable.index(head["head"])
                online = layer.online
                m["rco"].add_metric(
                    labels,
                    count_value=int(online.observations[i]),
                    sum_value=float(online.rco_sum[i]),
                )
                m["drifts"].add_metric(labels, int(online.drift_events[i]))
                m["promoted"].add_metric(labels, int(layer.stats.promoted_by_head[i]))
        resident, total = rt.page_steps()
        pools = list(l.pool for l in rt.layers.values())
        engine = [self.model]
        m["resident_steps"].add_metric(engine, resident)
        m["page_steps"].add_metric(engine, total)
        m["saved"].add_metric(engine, host_pages * rt.spec.head_page_bytes)
        m["pool_used"].add_metric(engine, sum(p.in_use for p in pools))
        m["pool_capacity"].add_metric(engine, sum(p.capacity for p in pools))
        m["live"].add_metric(engine, len(rt.requests))
        yield from m.values()
        tiers = [rt.arena.stats()] if rt.arena is not None else []
        if rt.connector is not None:
            tiers.append(rt.connector.tier.stats())
            c = _connector_families()
            for name, value in asdict(rt.connector.counters).items():
                c[name].add_metric(engine, value)
            yield from c.values()
        if tiers:
            yield from KVStoreCollector(lambda: tiers).collect()


def _or_nan(value: float | None) -> float:
    """The heads route's None (never measured) as Prometheus's NaN."""
    return math.nan if value is None else value


def exported() -> dict[str, str]:
    """Every ``kvhead_*`` family an engine exports beside the kvstore's: name -> type."""
    families = [*_families().values(), *_connector_families().values()]
    return {f.name: f.type for f in families}


def _connector_families() -> dict[str, Metric]:
    """The KV connector's counters (:class:`kvhead.vllm.prefix_io.ConnectorCounters`)."""
    help_of = {
        "loads": "Prompts whose leading pages were loaded from Redis instead of prefilled.",
        "load_failures": "Loads that found a page missing or refused and recomputed instead.",
        "loaded_pages": "Per-head pages written into the engine by loads.",
        "loaded_tokens": "Prompt tokens whose prefill loads skipped.",
        "saves": "Prompts whose pages Redis accepted in full (and that were marked).",
        "save_failures": "Prompt saves refused in part by Redis or dropped on a full queue.",
        "saved_pages": "Per-head pages Redis accepted from saves.",
    }
    return {
        name: CounterMetricFamily(f"kvhead_connector_{name}", text, labels=["model"])
        for name, text in help_of.items()
    }


def _families() -> dict[str, Metric]:
    gauge, counter = GaugeMetricFamily, CounterMetricFamily
    layer = ["model", "layer"]
    return {
        "stable": gauge(
            "kvhead_head_stable",
            "1 where the head is stable (top-K on the device), 0 dense.",
            labels=HEAD,
        ),
        "profile": gauge(
            "kvhead_head_profile_instability",
            "The head profile's instability (1 - mean RCO).",
            labels=HEAD,
        ),
        "online": gauge(
            "kvhead_head_online_instability",
            "1 - smoothed RCO between a stable head's consecutive reranks (lag R); NaN before one.",
            labels=HEAD,
        ),
        "rco": SummaryMetricFamily(
            "kvhead_head_rco",
            "RCO of a stable head's consecutive reranks; rate(sum)/rate(count) is its mean.",
            labels=HEAD,
        ),
        "drifted": gauge(
            "kvhead_head_drifted", "1 while the drift guard holds the head as drifted.", labels=HEAD
        ),
        "drifts": counter(
            "kvhead_head_drift_events",
            "Times the head's online RCO fell out of its profile's band.",
            labels=HEAD,
        ),
        "promoted": counter(
            "kvhead_head_promoted_pages",
            "Pages copied host -> device pool for the head.",
            labels=HEAD,
        ),
        "device_pages": gauge(
            "kvhead_head_device_pages",
            "Live requests' pages of the head held on the device.",
            labels=HEAD,
        ),
        "host_pages": gauge(
            "kvhead_head_host_pages",
            "Live requests' pages of the head only in the host tier.",
            labels=HEAD,
        ),
        "reranks": counter(
            "kvhead_layer_reranks", "Request rows whose stable heads reranked.", labels=layer
        ),
        "decode_steps": counter(
            "kvhead_layer_decode_steps", "Decode steps of the layer.", labels=layer
        ),
        "resident_steps": counter(
            "kvhead_resident_page_steps",
            "(sequence, head) pages attended from the device, summed over decode steps.",
            labels=["model"],
        ),
        "page_steps": counter(
            "kvhead_page_steps",
            "(sequence, head) pages that existed, summed over decode steps.",
            labels=["model"],
        ),
        "saved": gauge(
            "kvhead_device_kv_bytes_saved",
            "Bytes of live stable-head pages kept off the device (host tier instead).",
            labels=["model"],
        ),
        "pool_used": gauge(
            "kvhead_hot_pool_pages", "Stable-head pages in the device hot pools.", labels=["model"]
        ),
        "pool_capacity": gauge(
            "kvhead_hot_pool_capacity_pages",
            "Pages the device hot pools can hold.",
            labels=["model"],
        ),
        "live": gauge(
            "kvhead_live_requests", "Requests holding KV in the engine.", labels=["model"]
        ),
    }
