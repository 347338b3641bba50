"""Timing helpers shared by the GPU benchmarks (device events, medians, graph replay).

Device work is asynchronous, so every number here comes from CUDA events around the work, after
warm-up, as a median. Small kernels are also timed as CUDA-graph replays over *rotating* inputs:
the graph removes launch gaps, and rotation keeps the L2 cache (60 MB on an H200) from serving
bytes that a real decode step would read from HBM. Without CUDA (interpreter smoke runs) the
same calls fall back to a host clock so the benchmark scripts still run end to end.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def median_ms(fn: Callable[[], object], *, warmup_ms: int = 25, rep_ms: int = 100) -> float:
    """Median milliseconds of ``fn`` (Triton's ``do_bench``: it also flushes the L2 each rep)."""
    if not torch.cuda.is_available():  # one host-timed call: a smoke number, not a measurement
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))


def graph_ms(fns: Sequence[Callable[[], object]], *, replays: int = 30, repeat: int = 1) -> float:
    """Median milliseconds per call of a CUDA graph that runs ``fns`` in order, ``repeat`` times.

    Pass one closure per input set (same kernel, different data) so consecutive calls miss the
    L2 the way successive layers' decode steps do. A graph launch has a fixed cost of several
    microseconds; ``repeat`` (or several ``fns``) spreads it over many calls.
    """
    fns = list(fns) * repeat
    if not torch.cuda.is_available():
        return median_ms(lambda: [fn() for fn in fns]) / len(fns)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in fns:
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(fns)


def wall_ms(fn: Callable[[], object], *, reps: int = 10) -> float:
    """Median host milliseconds of ``fn`` with the device synchronised before and after.

    For work that spans streams and the host (overlapped copies), where events on one stream
    would not see it all.
    """
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    reps = reps if torch.cuda.is_available() else 1
    fn()
    sync()
    times = []
    for _ in range(reps):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)
