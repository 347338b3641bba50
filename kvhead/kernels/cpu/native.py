"""The plugin's compiled CPU decode kernels (``csrc/flexi_cpu.cpp``), built on first use.

A decode step of one layer used to be ~100 small torch ops (scoring, top-K, masks, gathers, two
vLLM kernel calls with their schedules); at a few microseconds each they cost more than the
attention itself (measured: glue ~3/4 of the layer time at 8k, batch 4). The C++ module does the
per-step work in three calls per layer and runs sequences x heads on torch's own thread pool
(the one vLLM's CPU worker pins), so nothing else changes about threading.

The module is compiled with torch's extension builder (g++ and ninja, ~1 min once) into
``$KVHEAD_HOME/torch_extensions/flexi_cpu-<digest>`` and reused by every later process;
``-march=native`` because it is built on the machine that runs it. The kernels own the layout of
every cache they touch (vLLM's allocation for the resident heads, the hot pool): per block and head,
keys transposed ``[D][P]`` then values ``[P][D]`` (vLLM's own CPU layout for 16-token blocks, which
keeps one page's 16 scores of a query row in one AVX-512 register). vLLM's kernels never read those
caches: prefill stages them into a scratch cache vLLM writes itself.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from types import ModuleType

from kvhead.models.store import kvhead_home

_SOURCE = Path(__file__).parent / "csrc" / "flexi_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"]


class NativeBuildError(RuntimeError):
    """The C++ decode kernels could not be built (compiler missing, build failed)."""


@functools.cache
def kernels() -> ModuleType:
    """The compiled module (built once per machine and source, then loaded from the build cache).

    The build directory is named by a digest of the source file's path, text and flags: two
    kvhead copies on one machine (a checkout beside an installed copy, two CI clones) would
    otherwise rebuild one shared library in place under each other (ninja rebuilds when the
    source path or text changes), and a process could load the other copy's functions (seen:
    two concurrent test runs failing with pybind signature errors).
    """
    from torch.utils.cpp_extension import load

    key = f"{_SOURCE}\n{' '.join(_FLAGS)}\n".encode() + _SOURCE.read_bytes()
    digest = hashlib.sha256(key).hexdigest()[:12]
    build = kvhead_home() / "torch_extensions" / f"flexi_cpu-{digest}"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(
            name="kvhead_flexi_cpu",
            sources=[str(_SOURCE)],
            extra_cflags=_FLAGS,
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except (RuntimeError, OSError, FileNotFoundError) as exc:
        raise NativeBuildError(
            f"kvhead: building the FlexiCache CPU kernels ({_SOURCE.name}) failed: {exc}. "
            "They need g++ and ninja (scripts/setup.sh installs both)."
        ) from exc
