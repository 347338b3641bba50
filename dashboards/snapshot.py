"""Render every dashboard panel to PNG from a Prometheus URL: the dashboards without Grafana.

For operators who have Prometheus but no Grafana, and for the docs. Each panel's queries run
through Prometheus's HTTP API with Grafana's variables expanded (:func:`dashboards.promql.expand`);
a query that fails or returns nothing is drawn as such and listed in ``index.json``, so one bad
panel never stops the others. Only an unreachable Prometheus stops the run.
"""

from __future__ import annotations

import json
import math
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from dashboards.catalog import DASHBOARDS
from dashboards.plots import PanelData, Series, draw, legend_text
from dashboards.promql import expand
from dashboards.spec import GRID, Dashboard, Panel

TIMEOUT_S = 30.0
POINTS = 240  # samples per series over the window, as a Grafana panel of ~1000 px asks for


class SnapshotError(RuntimeError):
    """Prometheus cannot be asked at all (bad URL, down, not Prometheus)."""


@dataclass(frozen=True)
class Rendered:
    dashboard: str
    panel: str
    file: str  # relative to the output folder
    status: str  # ok, no data, error
    series: int
    error: str


class Prometheus:
    """The two HTTP API calls the snapshots need."""

    def __init__(self, url: str, timeout_s: float = TIMEOUT_S) -> None:
        parsed = urllib.parse.urlparse(url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise SnapshotError(f"--prometheus {url!r} is not an http(s) URL")
        self.url, self.timeout_s = url.rstrip("/"), timeout_s

    def check(self) -> None:
        try:
            self._get("/api/v1/status/buildinfo", {})
        except urllib.error.HTTPError as err:
            raise SnapshotError(
                f"{self.url} answered {err.code} to Prometheus's API: is it Prometheus's URL?"
            ) from None
        except (OSError, ValueError) as err:
            raise SnapshotError(f"cannot reach Prometheus at {self.url}: {err}") from None

    def query_range(self, promql: str, start: float, end: float, step: float) -> list[dict]:
        params = {"query": promql, "start": start, "end": end, "step": step}
        return self._get("/api/v1/query_range", params)["result"]

    def _get(self, path: str, params: dict) -> dict:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=self.timeout_s) as reply:
            body = json.loads(reply.read())
        if body.get("status") != "success":
            raise ValueError(body.get("error", "no status"))
        return body["data"]


def fetch(
    prom: Prometheus, panel: Panel, start: float, end: float, rate_interval: str
) -> PanelData:
    """Every query of ``panel`` over [start, end], NaN where a series has no sample."""
    step = max(1.0, math.ceil((end - start) / POINTS))
    grid = np.arange(start, end + step / 2, step)
    data = PanelData()
    for query in panel.queries:
        try:
            result = prom.query_range(expand(query.expr, rate_interval), start, end, step)
        except urllib.error.HTTPError as err:
            data.error = _api_error(err)
            return data
        except (OSError, ValueError) as err:
            data.error = str(err)
            return data
        for item in result:
            values = np.full(grid.shape, np.nan)
            for t, v in item["values"]:
                values[int(round((float(t) - start) / step))] = float(v)
            labels = item["metric"]
            data.series.append(Series(labels, grid, values, legend_text(query.legend, labels)))
    return data


def _api_error(err: urllib.error.HTTPError) -> str:
    try:
        return f"HTTP {err.code}: {json.loads(err.read()).get('error', '')}"
    except ValueError:
        return f"HTTP {err.code}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _panel_png(panel: Panel, data: PanelData, path: Path) -> None:
    height = 4.5 if panel.kind == "head_grid" else 3.0
    fig = Figure(figsize=(max(3.0, panel.width / 2.4), height), dpi=110, layout="constrained")
    draw(fig.add_subplot(), panel, data)
    fig.savefig(path)


def _dashboard_png(spec: Dashboard, datas: dict[Panel, PanelData], path: Path) -> None:
    """All panels of ``spec`` on one page, laid out on Grafana's 24-column grid."""
    lines: list[list[Panel]] = []
    for row in spec.rows:
        used = 0
        for panel in row.panels:
            if used % GRID == 0:
                lines.append([])
            lines[-1].append(panel)
            used += panel.width
    heights = [1.5 if any(p.kind == "head_grid" for p in line) else 1.0 for line in lines]
    inches = 2.8 * sum(heights) + 1.0
    fig = Figure(figsize=(20, inches), dpi=90)
    title = f"{spec.title}    ({time.strftime('%Y-%m-%d %H:%M %Z')})"
    fig.suptitle(title, fontsize=12, y=1 - 0.2 / inches)
    grid = fig.add_gridspec(
        len(lines),
        GRID,
        height_ratios=heights,
        left=0.05,
        right=0.99,
        bottom=0.3 / inches,
        top=1 - 0.8 / inches,
        wspace=1.6,  # of a column's width: room for the next panel's tick labels
        hspace=0.5,
    )
    for i, line in enumerate(lines):
        x = 0
        for panel in line:
            draw(fig.add_subplot(grid[i, x : x + panel.width]), panel, datas[panel])
            x += panel.width
    fig.savefig(path)


def snapshot(
    prometheus: str,
    out: Path,
    *,
    minutes: float = 60.0,
    rate_interval: str = "1m",
    dashboards: tuple[Dashboard, ...] = DASHBOARDS,
    end: float | None = None,
) -> list[Rendered]:
    """Write ``out/<uid>/<nn>-<panel>.png`` for every panel, ``out/<uid>.png`` for each whole
    dashboard, and ``out/index.json`` saying which panels had data."""
    prom = Prometheus(prometheus)
    prom.check()
    end = time.time() if end is None else end
    start = end - minutes * 60
    out.mkdir(parents=True, exist_ok=True)
    rendered = []
    for spec in dashboards:
        folder = out / spec.uid
        folder.mkdir(exist_ok=True)
        datas = {}
        for n, panel in enumerate(spec.panels, start=1):
            data = datas[panel] = fetch(prom, panel, start, end, rate_interval)
            file = folder / f"{n:02d}-{_slug(panel.title)}.png"
            _panel_png(panel, data, file)
            rendered.append(
                Rendered(
                    spec.uid,
                    panel.title,
                    str(file.relative_to(out)),
                    data.status,
                    len(data.series),
                    data.error,
                )
            )
        _dashboard_png(spec, datas, out / f"{spec.uid}.png")
    (out / "index.json").write_text(json.dumps([asdict(r) for r in rendered], indent=2) + "\n")
    return rendered
