"""The dashboards as code: checked-in JSON equals what the specs generate, every metric a query
reads is one an exporter defines (kvhead's own, and vLLM's and Ray Serve's as Ray's agent renames
them), and the panels the operators' view needs are there."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dashboards.build import OUTPUTS, ROOT, rendered, stale
from dashboards.catalog import DASHBOARDS
from dashboards.plots import format_value, legend_text
from dashboards.promql import expand, metric_names, queries
from dashboards.spec import Panel, Query, Row
from kvhead.cli import app
from kvhead.vllm.metrics import exported
from kvstore.metrics import KVStoreCollector


def package_dir(name: str) -> Path:
    """An installed package's folder, found without importing it (vLLM and Ray are slow to)."""
    return Path(importlib.util.find_spec(name).submodule_search_locations[0])


def _samples(name: str, kind: str) -> set[str]:
    """Names Prometheus stores for a family of ``kind``."""
    if kind == "counter":
        return {name.removesuffix("_total") + "_total"}
    if kind == "summary":
        return {name + "_sum", name + "_count"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    return {name}


def kvhead_names() -> set[str]:
    families = exported() | {m.name: m.type for m in KVStoreCollector(list).describe()}
    return {s for name, kind in families.items() for s in _samples(name, kind)}


def placement_names() -> set[str]:
    """What the placement actor's collector exports (an empty plan still names every family)."""
    from cluster.metrics import PlacementCollector
    from cluster.plan import PlacementPlan

    families = PlacementCollector(lambda: (PlacementPlan(cluster="test"), {})).collect()
    return {s for m in families for s in _samples(m.name, m.type)}


def vllm_names_via_ray() -> set[str]:
    """vLLM's engine metrics as Ray exports them: ':' -> '_', a ``ray_`` prefix, ``_total`` on
    counters (vllm/v1/metrics/ray_wrappers.py, Ray's OpenTelemetry exporter)."""
    source = (package_dir("vllm") / "v1/metrics/loggers.py").read_text()
    found = re.findall(r"self\._(counter|gauge|histogram)_cls\(\s*name=\"vllm:(\w+)\"", source)
    assert len(found) > 30, "vLLM's metric definitions moved: update this parser"
    return {s for kind, name in found for s in _samples(f"ray_vllm_{name}", kind)}


def serve_names_via_ray() -> set[str]:
    """Ray Serve's metrics (ray.util.metrics in ray/serve/_private) as its agent exports them."""
    names = set()
    for path in (package_dir("ray") / "serve/_private").glob("*.py"):
        for kind, name in re.findall(
            r"metrics\.(Counter|Gauge|Histogram)\(\s*(?:name=)?f?\"(serve_[\w{}]+)\"",
            path.read_text(),
        ):
            name = name.replace("{protocol_name}", "http")
            names |= _samples(f"ray_{name}", kind.lower())
    assert "ray_serve_deployment_replica_healthy" in names
    return names


def all_queries() -> list:
    return queries()


def test_checked_in_json_is_what_the_specs_generate() -> None:
    assert stale() == [], "run `kvhead dashboards build` and commit the JSON"
    for folder in OUTPUTS:
        assert sorted(p.name for p in folder.glob("*.json")) == sorted(rendered())


def test_json_has_datasource_variables_units_and_unique_ids() -> None:
    for spec in DASHBOARDS:
        model = json.loads((ROOT / "dashboards" / spec.filename).read_text())
        variables = {v["name"]: v for v in model["templating"]["list"]}
        assert variables["datasource"]["query"] == "prometheus"
        for variable in spec.variables:
            assert variables[variable.name]["query"].startswith("label_values(")
            assert variables[variable.name]["allValue"] == ".*"
        ids = [p["id"] for p in model["panels"]]
        assert len(ids) == len(set(ids))
        panels = [p for p in model["panels"] if p["type"] != "row"]
        assert len(panels) == len(spec.panels)
        for panel in panels:
            assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        titles = [p.title for p in spec.panels]
        assert len(titles) == len(set(titles)), spec.uid


def test_the_operators_view_is_complete() -> None:
    """The issue's panel list: each item is some panel whose queries read these metrics."""
    wanted = {
        "TTFT distribution": "ray_vllm_time_to_first_token_seconds_bucket",
        "ITL distribution": "ray_vllm_inter_token_latency_seconds_bucket",
        "QPS": "ray_vllm_request_success_total",
        "running": "ray_vllm_num_requests_running",
        "waiting": "ray_vllm_num_requests_waiting",
        "KV usage": "ray_vllm_kv_cache_usage_perc",
        "prefix-cache hit rate": "ray_vllm_prefix_cache_hits_total",
        "instability heatmap": "kvhead_head_online_instability",
        "stable count": "kvhead_head_stable",
        "device KV saved": "kvhead_device_kv_bytes_saved",
        "reranks": "kvhead_layer_reranks_total",
        "promoted pages": "kvhead_head_promoted_pages_total",
        "tier usage": "kvhead_kvstore_resident_pages",
        "tier hits": "kvhead_kvstore_hits_total",
        "tier bytes": "kvhead_kvstore_served_bytes_total",
        "tier errors": "kvhead_kvstore_errors_total",
        "Serve replicas": "ray_serve_deployment_replica_healthy",
        "Serve queue": "ray_serve_deployment_queued_queries",
        "Serve errors": "ray_serve_num_http_error_requests_total",
        "Helix groups": "kvhead_helix_groups",
        "placement changes": "kvhead_placement_changes_total",
    }
    read = set().union(*(metric_names(q.expr) for q in all_queries()))
    assert {item for item, metric in wanted.items() if metric not in read} == set()
    kinds = {p.kind for d in DASHBOARDS for p in d.panels}
    assert kinds == {"timeseries", "stat", "histogram_heatmap", "head_grid"}
    red = [p for d in DASHBOARDS for p in d.panels if any(t.color == "red" for t in p.thresholds)]
    assert len(red) >= 15


def test_every_metric_is_one_an_exporter_defines() -> None:
    known = {"kvhead": kvhead_names(), "ray": vllm_names_via_ray() | serve_names_via_ray()}
    known["placement"] = placement_names()
    for q in all_queries():
        names = metric_names(q.expr)
        assert names, q.expr
        unknown = names - known[q.source]
        assert not unknown, f"{q.dashboard} / {q.panel}: {unknown} not exported by {q.source}"
        assert (q.source == "placement") == (q.needs == "placement")


def test_kvhead_gauges_drop_pid_and_replica_duplicates() -> None:
    """Gauges carry a pid per engine process: per-head panels keep one value per head
    (max by model, layer, head); the others aggregate by model or tier."""
    for q in all_queries():
        if re.search(r"kvhead_head_(stable|online_instability|profile_instability)\{", q.expr):
            assert "max by (model, layer, head)" in q.expr, q.expr
        if q.source == "kvhead" and "kvhead_" in q.expr:
            assert re.match(r"(sum|max|min|count)\b", q.expr), q.expr


def test_expand_leaves_plain_promql() -> None:
    for q in all_queries():
        assert "$" not in q.promql, q.promql
    expr = 'sum(rate(x{model=~"$model", tier=~"$tier"}[$__rate_interval]))'
    assert expand(expr, "30s", {"model": "smol"}) == 'sum(rate(x{model=~"smol", tier=~".*"}[30s]))'


def test_layout_and_panels_are_checked() -> None:
    query = (Query("up", "", "ray"),)
    with pytest.raises(ValueError, match="crosses the edge"):
        Row("r", (Panel("a", "", query, width=16), Panel("b", "", query, width=16)))
    with pytest.raises(ValueError, match="fill 8"):
        Row("r", (Panel("a", "", query, width=8),))
    with pytest.raises(ValueError, match="no query"):
        Panel("a", "", ())


def test_cli_build_check_and_queries() -> None:
    runner = CliRunner()
    check = runner.invoke(app, ["dashboards", "build", "--check"])
    assert check.exit_code == 0, check.output
    listed = runner.invoke(app, ["dashboards", "queries", "--rate-interval", "2m"])
    assert listed.exit_code == 0
    exprs = [line for line in listed.output.splitlines() if line and not line.startswith("#")]
    assert exprs == [q.promql for q in queries(rate_interval="2m")]


def test_snapshot_units_and_legends_read_like_grafana() -> None:
    assert format_value(1000, "bytes") == "1000 B"
    assert format_value(1536 * 2**20, "bytes") == "1.5 GiB"
    assert format_value(0.973, "percentunit") == "97.3%"
    assert format_value(0.25, "s") == "250 ms" and format_value(3e-5, "s") == "30 µs"
    assert format_value(2500, "reqps") == "2.5k req/s"
    assert format_value(float("nan"), "s") == "-"
    assert legend_text("L{{layer}} H{{ head }} {{missing}}", {"layer": "3", "head": "1"}) == "L3 H1"
