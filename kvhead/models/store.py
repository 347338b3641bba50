"""The on-disk model cache: where folders live, how they are checksummed and published.

Layout under ``$KVHEAD_HOME`` (default ``~/.cache/kvhead``)::

    models/<name>/            one Hugging Face folder per model, with MANIFEST_NAME inside
    pkgs/<package>-<version>/ the pip --target tree a GGUF came from
    <dir>/.tmp-*              work in progress; renamed into place only when complete

A folder appears under its final name only after every file and the manifest are written (rename
is atomic within one file system), so a crash or a full disk never leaves a half-written model that
a later run would mistake for a good one.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from kvhead.models.errors import ModelError

MANIFEST_NAME = "kvhead-manifest.json"
HEADROOM_BYTES = 256 * 2**20
HEADROOM_FACTOR = 1.2


def kvhead_home() -> Path:
    """Cache root: ``$KVHEAD_HOME`` if set, else ``~/.cache/kvhead``."""
    return Path(os.environ.get("KVHEAD_HOME") or Path.home() / ".cache" / "kvhead").expanduser()


def models_dir() -> Path:
    """Folder holding one converted Hugging Face folder per model."""
    return kvhead_home() / "models"


def pkgs_dir() -> Path:
    """Folder holding the pip --target trees that GGUF files come from."""
    return kvhead_home() / "pkgs"


def free_bytes(path: Path) -> int:
    """Free space on the file system that holds ``path`` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def require_free_space(path: Path, need_bytes: int, what: str) -> None:
    """Refuse to start writing ``need_bytes`` under ``path`` unless they fit with headroom.

    Checked up front, because running out halfway through a multi-hundred-MB write wastes the
    time spent and leaves the user a less clear error (an OSError from deep inside a library).
    """
    need = int(need_bytes * HEADROOM_FACTOR) + HEADROOM_BYTES
    free = free_bytes(path)
    if free < need:
        raise ModelError(
            f"not enough disk space for {what} under {path}: need about {need / 2**20:.0f} MiB "
            f"(with headroom), {free / 2**20:.0f} MiB free; set KVHEAD_HOME to a larger disk"
        )


class FileRecord(BaseModel):
    """Checksum of one file of a model folder."""

    sha256: str = Field(description="Hex SHA-256 of the file's bytes.")
    size: int = Field(ge=0, description="File size in bytes.")


class Manifest(BaseModel):
    """What a model folder must contain; written last, just before the folder is published."""

    name: str = Field(description="Cache name of the model (folder name).")
    source: str = Field(description="Where the weights came from (pip requirement or file path).")
    source_sha256: str = Field(description="SHA-256 of the GGUF file that was converted.")
    created: str = Field(description="UTC time the folder was written (ISO 8601).")
    files: dict[str, FileRecord] = Field(description="Relative path -> checksum, every file.")


def sha256_file(path: Path, chunk: int = 4 * 2**20) -> str:
    """Hex SHA-256 of a file, read in chunks so large weights never sit in memory twice."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(folder: Path, name: str, source: str, source_sha256: str) -> Manifest:
    """Checksum every file in ``folder`` and write the manifest next to them."""
    files = {
        str(p.relative_to(folder)): FileRecord(sha256=sha256_file(p), size=p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST_NAME
    }
    manifest = Manifest(
        name=name,
        source=source,
        source_sha256=source_sha256,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        files=files,
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n")
    return manifest


def read_manifest(folder: Path) -> Manifest:
    """Load a folder's manifest, or fail saying the folder is not a finished kvhead model."""
    path = folder / MANIFEST_NAME
    try:
        return Manifest.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise ModelError(f"{folder} has no {MANIFEST_NAME}; remove it and pull again") from None
    except ValidationError as err:
        first = err.errors()[0]["msg"]
        raise ModelError(
            f"{path} is unreadable ({first}); remove {folder} and pull again"
        ) from None


def verify_manifest(folder: Path) -> Manifest:
    """Check every file against the manifest: present, same size, same SHA-256."""
    manifest = read_manifest(folder)
    for rel, record in manifest.files.items():
        path = folder / rel
        if not path.is_file():
            raise ModelError(f"{path} is missing; pull again with --force")
        if path.stat().st_size != record.size or sha256_file(path) != record.sha256:
            raise ModelError(f"{path} does not match its checksum; pull again with --force")
    return manifest


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``final``, removed again unless it was published."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish(tmp: Path, final: Path, *, replace: bool = False) -> bool:
    """Move a finished ``tmp`` folder to ``final`` atomically.

    Returns False (and leaves ``final`` alone) when another process published it first, unless
    ``replace`` asks to swap the old folder out. The swap renames the old one aside before
    deleting it, so ``final`` is never a half-deleted folder.
    """
    if replace and final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        tmp.rename(final)
    except OSError:
        if final.is_dir():
            return False
        raise
    return True
