"""``kvhead models ...``: pull, list and locate models.

The lead mounts ``app`` under the main CLI. Every ModelError is printed as one line on stderr with
exit code 2, so a typo or a full disk never shows a Python traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from kvhead.models.errors import ModelError
from kvhead.models.registry import REGISTRY
from kvhead.models.resolve import installed_models, model_path, resolve_model
from kvhead.models.store import models_dir

app = typer.Typer(
    name="models",
    help="Pull, list and locate models (bf16 Hugging Face folders).",
    no_args_is_help=True,
)
_T = TypeVar("_T")


def _run(action: Callable[[], _T]) -> _T:
    try:
        return action()
    except ModelError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@app.command()
def pull(
    name_or_path: Annotated[
        str, typer.Argument(help="Registry name, local Hugging Face folder, or local .gguf file.")
    ],
    force: Annotated[
        bool,
        typer.Option(
            "--force", help="Convert again even if the cache already holds a verified copy."
        ),
    ] = False,
) -> None:
    """Make a model available locally and print its folder."""
    path = _run(lambda: resolve_model(name_or_path, force=force))
    typer.echo(str(path))


@app.command("list")
def list_models() -> None:
    """Show the registry and what is already in the cache."""
    installed = installed_models()
    table = Table(title=f"models (cache: {models_dir()})")
    # Names and sources are copied into commands, so they are never cut; the description wraps.
    for column in ("name", "installed", "context", "source"):
        table.add_column(column, no_wrap=True)
    table.add_column("description")
    for name, entry in sorted(REGISTRY.items()):
        table.add_row(
            name,
            "yes" if name in installed else "no",
            str(entry.context_length),
            entry.requirement,
            entry.description,
        )
    for name in sorted(set(installed) - set(REGISTRY)):
        table.add_row(name, "yes", "", "local .gguf", "")
    Console().print(table)


@app.command()
def path(name: Annotated[str, typer.Argument(help="Name of a pulled model.")]) -> None:
    """Print the cache folder of a pulled model (exit 2 if it is not pulled)."""
    typer.echo(str(_run(lambda: model_path(name))))
