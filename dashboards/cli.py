"""``kvhead dashboards``: regenerate, provision and snapshot the Grafana dashboards.

Like the rest of the CLI, an operator's mistake (bad URL, refused token, version conflict,
unreachable Prometheus) is one line on stderr and exit 2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__.splitlines()[0])
console = Console()
err_console = Console(stderr=True)


def _fail(message: str) -> None:
    err_console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(2)


def _need_ops() -> None:
    """build and push use the ops extra's packages: say so rather than raise ImportError."""
    missing = [
        m for m in ("grafana_foundation_sdk", "grafana_client") if not importlib.util.find_spec(m)
    ]
    if missing:
        _fail(f"{', '.join(missing)} not installed: pip install 'kvhead[ops]'")


@app.command()
def build(
    check: Annotated[
        bool, typer.Option(help="Only report JSON files that differ from the specs (exit 1).")
    ] = False,
) -> None:
    """Write dashboards/*.json and the Helm chart's copies from the dashboard specs."""
    _need_ops()
    from dashboards.build import ROOT, stale, write

    if check:
        differ = stale()
        for path in differ:
            console.print(f"stale: {path.relative_to(ROOT)}")
        raise typer.Exit(1 if differ else 0)
    for path in write():
        console.print(f"wrote {path.relative_to(ROOT)}")


@app.command()
def push(
    url: Annotated[str, typer.Option(help="Grafana's base URL, e.g. http://grafana:3000.")],
    token: Annotated[
        str,
        typer.Option(envvar="GRAFANA_TOKEN", help="Service-account token (Editor role)."),
    ],
    overwrite: Annotated[
        bool, typer.Option(help="Replace dashboards that exist with other content.")
    ] = False,
) -> None:
    """Create the dashboards in Grafana's kvhead folder (grafana-client)."""
    _need_ops()
    from dashboards.push import PushError
    from dashboards.push import push as push_all

    try:
        pushed = push_all(url, token, overwrite=overwrite)
    except PushError as err:
        _fail(str(err))
    for item in pushed:
        console.print(f"{item.title}: {item.url} (version {item.version})")


@app.command()
def snapshot(
    prometheus: Annotated[str, typer.Option(help="Prometheus's base URL.")],
    out: Annotated[Path, typer.Option(help="Folder for the PNGs and index.json.")] = Path(
        "dashboard-snapshots"
    ),
    minutes: Annotated[float, typer.Option(min=1, help="Time window ending now.")] = 60.0,
    rate_interval: Annotated[
        str, typer.Option(help="Window of rate() (at least 4 scrape intervals).")
    ] = "1m",
) -> None:
    """Render every panel to PNG from Prometheus (no Grafana needed)."""
    from dashboards.snapshot import SnapshotError
    from dashboards.snapshot import snapshot as render

    try:
        rendered = render(prometheus, out, minutes=minutes, rate_interval=rate_interval)
    except SnapshotError as err:
        _fail(str(err))
    for status in ("ok", "no data", "error"):
        panels = [r for r in rendered if r.status == status]
        if panels:
            console.print(f"{status}: {len(panels)} panels")
    for r in rendered:
        if r.status == "error":
            console.print(f"  {r.dashboard} / {r.panel}: {r.error}")
    console.print(f"wrote {out}/index.json and {len(rendered)} panel PNGs")


@app.command()
def queries(
    rate_interval: Annotated[str, typer.Option(help="Substituted for $__rate_interval.")] = "1m",
) -> None:
    """Print every PromQL expression the dashboards use, ready for Prometheus."""
    from dashboards.promql import queries as every

    for q in every(rate_interval=rate_interval):
        console.print(f"# {q.dashboard} / {q.panel} ({q.source}, needs {q.needs})", markup=False)
        console.print(q.promql, markup=False, soft_wrap=True)
