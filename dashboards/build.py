"""Grafana JSON from the dashboard specs, through grafana-foundation-sdk's builders (Grafana 11.6).

``python -m dashboards.build`` (or ``kvhead dashboards build``) rewrites ``dashboards/*.json``
and the chart's copies in ``helm/kvhead/dashboards/`` (Helm reads files only inside a chart);
``tests/test_dashboards.py`` regenerates both and fails on any difference.
"""

from __future__ import annotations

import json
from pathlib import Path

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import heatmap, prometheus, stat, timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models import prometheus as pm

from dashboards.catalog import DASHBOARDS
from dashboards.spec import Dashboard, Panel, Variable

ROOT = Path(__file__).resolve().parents[1]
OUTPUTS = (ROOT / "dashboards", ROOT / "helm" / "kvhead" / "dashboards")
DATASOURCE = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
HEIGHT = {"timeseries": 8, "stat": 8, "histogram_heatmap": 8, "head_grid": 12}


def _targets(panel: Panel) -> list[prometheus.Dataquery]:
    out = []
    for i, query in enumerate(panel.queries):
        target = (
            prometheus.Dataquery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + i))
            .datasource(DATASOURCE)
            .editor_mode(pm.QueryEditorMode.CODE)
            .range()
        )
        if panel.kind == "histogram_heatmap":
            target = target.format(pm.PromQueryFormat.HEATMAP)
        out.append(target)
    return out


def _thresholds(panel: Panel) -> db.ThresholdsConfig:
    steps = [dm.Threshold(value=t.value, color=t.color) for t in panel.thresholds]
    return db.ThresholdsConfig().mode(dm.ThresholdsMode.ABSOLUTE).steps(steps or _plain())


def _plain() -> list[dm.Threshold]:
    return [dm.Threshold(value=None, color="green")]


def _timeseries(panel: Panel) -> timeseries.Panel:
    builder = (
        timeseries.Panel()
        .fill_opacity(10)
        .legend(
            cb.VizLegendOptions()
            .show_legend(True)
            .display_mode(cm.LegendDisplayMode.LIST)
            .placement(cm.LegendPlacement.BOTTOM)
        )
        .tooltip(
            cb.VizTooltipOptions().mode(cm.TooltipDisplayMode.MULTI).sort(cm.SortOrder.DESCENDING)
        )
    )
    if panel.thresholds:
        builder = builder.thresholds_style(
            cb.GraphThresholdsStyleConfig().mode(cm.GraphThresholdsStyleMode.LINE)
        )
    if panel.stack:
        builder = builder.stacking(cb.StackingConfig().mode(cm.StackingMode.NORMAL))
    return builder


def _stat(panel: Panel) -> stat.Panel:
    return (
        stat.Panel()
        .reduce_options(cb.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .graph_mode(cm.BigValueGraphMode.AREA)
        .color_mode(cm.BigValueColorMode.BACKGROUND)
    )


def _heatmap(panel: Panel) -> heatmap.Panel:
    """Histogram buckets (``le``) over time, or one row per head ordered as the series come."""
    builder = (
        heatmap.Panel()
        .calculate(False)
        .cell_gap(1)
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("RdYlGn")
            .reverse(True)
            .fill("dark-orange")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .y_axis(
            heatmap.YAxisConfig().unit(panel.unit if panel.kind == "histogram_heatmap" else "none")
        )
        .show_value(cm.VisibilityMode.AUTO)
        .hide_y_histogram()
    )
    if panel.kind == "histogram_heatmap":
        builder = builder.rows_frame(heatmap.RowsHeatmapOptions().layout(cm.HeatmapCellLayout.LE))
    return builder


def panel_builder(panel: Panel, panel_id: int):
    """One spec panel as the SDK builder of its kind, with targets, unit and thresholds."""
    kinds = {
        "timeseries": _timeseries,
        "stat": _stat,
        "histogram_heatmap": _heatmap,
        "head_grid": _heatmap,
    }
    builder = (
        kinds[panel.kind](panel)
        .id(panel_id)
        .title(panel.title)
        .description(panel.description)
        .datasource(DATASOURCE)
        .targets(_targets(panel))
        .unit(panel.unit)
        .thresholds(_thresholds(panel))
        .span(panel.width)
        .height(HEIGHT[panel.kind])
    )
    if panel.min is not None:
        builder = builder.min(panel.min)
    if panel.max is not None:
        builder = builder.max(panel.max)
    return builder


def _variable(variable: Variable) -> db.QueryVariable:
    return (
        db.QueryVariable(variable.name)
        .label(variable.title)
        .query(f"label_values({variable.metric}, {variable.label})")
        .datasource(DATASOURCE)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(dm.VariableSort.NATURAL_ASC)
    )


def dashboard_builder(spec: Dashboard) -> db.Dashboard:
    builder = (
        db.Dashboard(spec.title)
        .uid(spec.uid)
        .description(spec.description)
        .tags(list(spec.tags))
        .editable()
        .refresh("30s")
        .time("now-1h", "now")
        .timezone("browser")
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(db.DatasourceVariable("datasource").label("Data source").type("prometheus"))
    )
    for variable in spec.variables:
        builder = builder.with_variable(_variable(variable))
    # Expanded rows: Grafana keeps an open row's panels after it at the top level, not inside.
    panel_id = 0
    for row in spec.rows:
        panel_id += 1
        title = row.title + (f" ({row.note})" if row.note else "")
        builder = builder.with_row(db.Row(title).id(panel_id).collapsed(False))
        for panel in row.panels:
            panel_id += 1
            builder = builder.with_panel(panel_builder(panel, panel_id))
    return builder


def render(spec: Dashboard) -> str:
    """The dashboard's JSON text, stable across runs (sorted keys, fixed indent)."""
    model = dashboard_builder(spec).build()
    return json.dumps(json.loads(JSONEncoder().encode(model)), indent=2, sort_keys=True) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard."""
    return {spec.filename: render(spec) for spec in DASHBOARDS}


def write(outputs: tuple[Path, ...] = OUTPUTS) -> list[Path]:
    """Write every dashboard into each output folder; returns the files written."""
    written = []
    for folder in outputs:
        folder.mkdir(parents=True, exist_ok=True)
        for name, text in rendered().items():
            (folder / name).write_text(text)
            written.append(folder / name)
    return written


def stale(outputs: tuple[Path, ...] = OUTPUTS) -> list[Path]:
    """Checked-in files that differ from what the specs generate (missing ones included)."""
    expected = rendered()
    return [
        folder / name
        for folder in outputs
        for name, text in expected.items()
        if not (folder / name).is_file() or (folder / name).read_text() != text
    ]


if __name__ == "__main__":
    for path in write():
        print(path.relative_to(ROOT))
