"""The plugin's compiled CPU decode kernels (``csrc/flexi_cpu.cpp``), built on first use.

A decode step of one layer used to be ~100 small torch ops (scoring, top-K, masks, gathers, two
vLLM kernel calls with their schedules); at a few microseconds each they cost more than the
attention itself (measured: glue ~3/4 of the layer time at 8k, batch 4). The C++ module does the
per-step work in three calls per layer and runs sequences x heads on torch's own thread pool
(the one vLLM's CPU worker pins), so nothing else changes about threading.

The module is compiled with torch's extension builder (g++ and ninja, ~1 min once) into
``$KVHEAD_HOME/torch_extensions`` and reused by every later process; ``-march=native`` because it
is built on the machine that runs it. It reads vLLM's CPU cache layout for 16-token blocks
(per block and head: keys transposed ``[D][P]``, then values ``[P][D]``); :func:`check_layout`
proves that layout against vLLM's own cache-write op before the first use.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import torch

from kvhead.models.store import kvhead_home

_SOURCE = Path(__file__).parent / "csrc" / "flexi_cpu.cpp"
_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-std=c++17"]


class NativeBuildError(RuntimeError):
    """The C++ decode kernels could not be built (compiler missing, build failed)."""


@functools.cache
def kernels() -> ModuleType:
    """The compiled module (built once per machine, then loaded from the build cache)."""
    from torch.utils.cpp_extension import load

    build = kvhead_home() / "torch_extensions" / "flexi_cpu"
    build.mkdir(parents=True, exist_ok=True)
    try:
        return load(name="kvhead_flexi_cpu", sources=[str(_SOURCE)], extra_cflags=_FLAGS,
                    extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    except (RuntimeError, OSError, FileNotFoundError) as exc:
        raise NativeBuildError(
            f"kvhead: building the FlexiCache CPU kernels ({_SOURCE.name}) failed: {exc}. "
            "They need g++ and ninja (scripts/setup.sh installs both)."
        ) from exc


@functools.cache
def check_layout(isa: str, dtype: torch.dtype, page_size: int, head_dim: int) -> None:
    """Raise unless vLLM's cache write for ``isa`` stores keys ``[D][P]`` then values ``[P][D]``.

    The kernels index caches vLLM writes (prefill) and read; a vLLM build with another layout
    would make them read garbage, so this compares vLLM's op with the native writer once.
    """
    from kvhead.vllm_plugin.kernels import write_cache

    heads, blocks = 2, 3
    key = torch.randn(page_size, heads, head_dim).to(dtype)
    value = torch.randn(page_size, heads, head_dim).to(dtype)
    slots = torch.arange(page_size) + page_size  # block 1
    theirs = torch.zeros(blocks, heads, page_size, 2 * head_dim, dtype=dtype)
    write_cache(theirs, key, value, slots, isa)
    ours = torch.zeros_like(theirs)
    none = torch.full((heads,), -1, dtype=torch.int64)
    kernels().write_tokens(key, value, slots, ours, torch.arange(heads), ours[:0],
                           torch.zeros(blocks, 0, dtype=torch.int64), none)
    if not torch.equal(theirs, ours):
        raise RuntimeError(
            f"kvhead: vLLM's CPU cache layout for isa {isa!r}, {dtype}, page {page_size} is not "
            "the one the FlexiCache kernels read (keys [D][P] then values [P][D] per block)"
        )
