"""Programmatic dependent launch (PDL, Hopper and later) for the selection kernel chains.

Why: at batch 1 a rerank selection is a chain of 2-3 dependent launches of a few us each, and a
launch boundary inside a CUDA graph costs about as much as a kernel's own work. With PDL the
next kernel of the chain is launched while the previous one runs (``launch_pdl=True``); its
programs may do input-only work (the query's digits), then ``gdc_wait`` until the previous
kernel has finished and its writes are visible. A kernel calls ``gdc_launch_dependents`` to let
its dependent launch early. On an H200 it saved 1.1-1.4 us per boundary of a two-launch
selection (``benchmarks/results/gpu/gpu_select_run3.json``; that layout lost and was removed) but
helps the multi-launch chain only at some sizes and costs time at others
(:func:`kvhead.kernels.triton.select_hier.auto_pdl`).

Only kernels whose predecessor is one of ours may be dependent launches: the first kernel of a
chain reads the query that the caller's kernels produce, so it is launched normally.
"""

from __future__ import annotations

import os

import torch

try:  # Triton >= 3.3 on CUDA
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

    HAVE_PDL = True
except ImportError:  # pragma: no cover - older Triton: plain stream order
    gdc_launch_dependents = gdc_wait = None
    HAVE_PDL = False

__all__ = ["HAVE_PDL", "gdc_launch_dependents", "gdc_wait", "pdl_active"]


def pdl_active(device: torch.device) -> bool:
    """Whether dependent launches work here: compiled CUDA (not the interpreter), sm_90+."""
    return (
        HAVE_PDL
        and device.type == "cuda"
        and os.environ.get("TRITON_INTERPRET") != "1"
        and torch.cuda.get_device_capability(device)[0] >= 9
    )
