"""Draw one panel's Prometheus data on a matplotlib axes, the way Grafana would show it.

Kept apart from the fetching (:mod:`dashboards.snapshot`) so every panel kind can be drawn from
plain data: ``series`` are ``(labels, times, values)`` with NaN where Prometheus had none.
A panel without data or with a failed query is drawn as such, never skipped.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in CI

import matplotlib.dates as mdates  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from matplotlib.ticker import FuncFormatter  # noqa: E402

from dashboards.spec import Panel  # noqa: E402

COLORS = {"green": "#56a64b", "yellow": "#e0b400", "orange": "#ff780a", "red": "#e02f44"}
COLORS |= {"blue": "#3274d9", "text": "#444444"}
MAX_LEGEND = 8


@dataclass
class Series:
    labels: dict[str, str]
    times: np.ndarray  # unix seconds
    values: np.ndarray
    legend: str = ""


@dataclass
class PanelData:
    """What one panel's queries returned; ``error`` set when any of them failed."""

    series: list[Series] = field(default_factory=list)
    error: str = ""

    @property
    def status(self) -> str:
        if self.error:
            return "error"
        has = any(np.isfinite(s.values).any() for s in self.series)
        return "ok" if has else "no data"


def legend_text(template: str, labels: dict[str, str]) -> str:
    """Grafana's ``{{label}}`` legend templates, missing labels empty."""
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: labels.get(m.group(1), ""), template).strip()


def format_value(value: float, unit: str) -> str:
    """A value in the panel's Grafana unit, short enough for a tick or a stat."""
    if not math.isfinite(value):
        return "-"
    if unit == "percentunit":
        return f"{value * 100:.3g}%"
    if unit in ("bytes", "Bps"):
        suffix = "/s" if unit == "Bps" else ""
        for name in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or name == "TiB":
                return f"{value:.4g} {name}{suffix}"
            value /= 1024
    if unit == "s":
        if abs(value) < 1e-3 and value:
            return f"{value * 1e6:.3g} µs"
        return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
    suffix = {"reqps": " req/s", "ops": " ops/s"}.get(unit, "")
    for scale, name in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{name}{suffix}"
    return f"{value:.3g}{suffix}"


def threshold_color(panel: Panel, value: float) -> str:
    color = "green"
    for step in panel.thresholds:
        if step.value is None or (math.isfinite(value) and value >= step.value):
            color = step.color
    return COLORS.get(color, COLORS["text"])


def draw(ax: Axes, panel: Panel, data: PanelData) -> None:
    """Draw ``data`` as ``panel``'s kind on ``ax`` (title, units, thresholds included). Data
    this module cannot draw sets ``data.error`` and is shown as such: one odd series must not
    cost an operator the other panels."""
    ax.set_title(panel.title, fontsize=9, loc="left")
    if data.status == "ok":
        kind = {
            "timeseries": _timeseries,
            "stat": _stat,
            "histogram_heatmap": _buckets,
            "head_grid": _head_grid,
        }[panel.kind]
        try:
            kind(ax, panel, [s for s in data.series if np.isfinite(s.values).any()])
            return
        except (ValueError, TypeError, KeyError) as err:
            data.error = f"cannot draw: {err}"
            ax.clear()
            ax.set_title(panel.title, fontsize=9, loc="left")
    message = f"query failed:\n{data.error[:160]}" if data.error else "no data"
    color = COLORS["red"] if data.error else "#888888"
    ax.text(
        0.5,
        0.5,
        message,
        ha="center",
        va="center",
        fontsize=8,
        wrap=True,
        transform=ax.transAxes,
        color=color,
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _timeseries(ax: Axes, panel: Panel, series: list[Series]) -> None:
    series = sorted(series, key=lambda s: -np.nanmax(s.values))
    for s in series:
        ax.plot(s.times.astype("datetime64[s]"), s.values, linewidth=1.2, label=s.legend)
    for step in panel.thresholds[1:]:
        ax.axhline(step.value, color=COLORS.get(step.color), linestyle="--", linewidth=0.8)
    if panel.min is not None or panel.max is not None:
        ax.set_ylim(panel.min, panel.max)
    elif all(np.nanmin(s.values) >= 0 for s in series):
        ax.set_ylim(bottom=0)  # rates and counts: an all-zero series sits on the axis
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(v, panel.unit)))
    window = series[0].times.astype("datetime64[s]")
    ax.set_xlim(window[0], window[-1])
    _time_axis(ax)
    ax.grid(alpha=0.3)
    if len(series) <= MAX_LEGEND:
        ax.legend(fontsize=6, loc="upper left")
    else:
        ax.text(
            0.99,
            0.97,
            f"{len(series)} series",
            ha="right",
            va="top",
            fontsize=7,
            transform=ax.transAxes,
        )


def _time_axis(ax: Axes) -> None:
    locator = mdates.AutoDateLocator(maxticks=6)
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator, show_offset=False))
    ax.tick_params(labelsize=7)


def _last(series: Series) -> float:
    finite = series.values[np.isfinite(series.values)]
    return float(finite[-1]) if finite.size else math.nan


def _stat(ax: Axes, panel: Panel, series: list[Series]) -> None:
    """The latest value of each series (at most four) in a box coloured by the thresholds, as
    Grafana's stat panel stacks them."""
    values = [(s.legend, _last(s)) for s in series[:4]]
    height = 1 / len(values)
    for i, (legend, value) in enumerate(values):
        y = 1 - (i + 1) * height
        box = Rectangle((0, y), 1, height, transform=ax.transAxes, edgecolor="white")
        box.set_facecolor(threshold_color(panel, value))
        ax.add_patch(box)
        text = format_value(value, panel.unit) + (f"  {legend}" if len(values) > 1 else "")
        ax.text(
            0.5,
            y + height / 2,
            text,
            ha="center",
            va="center",
            fontsize=18 if len(values) == 1 else 11,
            color="white",
            weight="bold",
            transform=ax.transAxes,
        )
    ax.set_xticks([])
    ax.set_yticks([])


def _buckets(ax: Axes, panel: Panel, series: list[Series]) -> None:
    """Per-interval counts of a histogram's cumulative buckets, one row per bucket."""
    by_le = sorted(series, key=lambda s: float(s.labels.get("le", "inf").replace("+Inf", "inf")))
    cumulative = np.vstack([np.nan_to_num(s.values) for s in by_le])
    counts = np.diff(cumulative, axis=0, prepend=0)
    times = by_le[0].times
    step = times[1] - times[0] if len(times) > 1 else 1.0
    edges = np.append(times, times[-1] + step).astype("datetime64[s]")
    ax.pcolormesh(edges, np.arange(len(by_le) + 1), np.clip(counts, 0, None), cmap="inferno")
    ticks = range(0, len(by_le), max(1, len(by_le) // 8))
    ax.set_yticks([t + 0.5 for t in ticks])
    ax.set_yticklabels([f"≤ {by_le[t].labels.get('le', '?')}" for t in ticks], fontsize=6)
    _time_axis(ax)


def _head_grid(ax: Axes, panel: Panel, series: list[Series]) -> None:
    """The latest value of each (layer, head) as a layers x heads grid."""
    cells = {(int(s.labels["layer"]), int(s.labels["head"])): _last(s) for s in series}
    layers = max(layer for layer, _ in cells) + 1
    heads = max(head for _, head in cells) + 1
    grid = np.full((layers, heads), np.nan)
    for (layer, head), value in cells.items():
        grid[layer, head] = value
    image = ax.imshow(
        grid,
        aspect="auto",
        cmap="RdYlGn_r",
        vmin=panel.min,
        vmax=panel.max,
        interpolation="nearest",
        origin="lower",
    )
    # The colour bar lives inside the axes, right of the heads, so the panel keeps the width
    # the grid layout gave it.
    ax.set_xlim(-0.5, heads - 0.5 + 0.15 * heads)
    ax.set_xlabel("KV head", fontsize=7)
    ax.set_ylabel("layer", fontsize=7)
    ax.set_xticks(range(heads))
    ax.tick_params(labelsize=6)
    bar = ax.figure.colorbar(image, cax=ax.inset_axes((0.91, 0.05, 0.025, 0.9)))
    bar.ax.tick_params(labelsize=6)
