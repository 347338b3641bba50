"""Promoted-page copy from a pinned host arena into a device pool, off the compute stream.

A rerank names pages that must move into the device hot pool before the next attention that
reads them. The copy is queued on a side stream; the compute stream keeps running and waits
only on the returned event, right before the first kernel that reads the promoted pages:

    event = copy_pages_async(arena, src_rows, pool, dst_rows)
    ...                                   # other layers' work, queued on the compute stream
    torch.cuda.current_stream().wait_event(event)
    attention(...)                        # reads the promoted pages

Two ways to move the pages, chosen by ``gather``:

* ``"device"`` (default): one Triton launch reads the pages straight out of the pinned arena
  (zero-copy, see :mod:`kvhead.kernels.triton.gather`); the host only ships the row lists.
* ``"host"``: the calling thread gathers the pages into pinned staging memory, then one DMA and
  a device scatter run on the side stream. It spends host time per page but uses no SMs.

``wait_for`` covers the opposite hazard: pool rows being overwritten may still be read by work
already queued (pages demoted at the same rerank); pass an event recorded after that work.

Pages are rows of the leading axis, so the same call moves any page layout (one KV head's K and
V page, or all stable heads of a block) as long as arena and pool rows have the same shape.
Host staging comes from PyTorch's pinned caching allocator, which holds a buffer until the copy
that reads it has finished, so back-to-back calls never overwrite memory in flight.
"""

from __future__ import annotations

import os

import torch

_side_streams: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """One copy stream per device, created on first use and reused (streams are not free)."""
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device=device)
    return _side_streams[device]


def copy_pages_async(
    arena: torch.Tensor,
    src_rows: torch.Tensor,
    pool: torch.Tensor,
    dst_rows: torch.Tensor,
    *,
    stream: torch.cuda.Stream | None = None,
    wait_for: torch.cuda.Event | None = None,
    gather: str = "device",
) -> torch.cuda.Event | None:
    """Copy ``arena[src_rows]`` into ``pool[dst_rows]``; return the event that marks completion.

    ``arena`` is a host tensor ``[host_pages, *page_shape]`` (pinned when ``pool`` is on CUDA),
    ``pool`` a tensor ``[pool_pages, *page_shape]``, ``src_rows``/``dst_rows`` 1-D index tensors
    of equal length. With a CUDA pool the copy is queued on ``stream`` (default: a per-device
    side stream) and an event recorded after it is returned. With a CPU pool (tests, CPU-only
    serving) the copy runs synchronously and None is returned: there is nothing to wait for.
    ``gather`` picks ``"device"`` (zero-copy kernel) or ``"host"`` (staging + DMA), see above.
    """
    if gather not in ("device", "host"):
        raise ValueError(f"copy_pages_async: gather must be 'device' or 'host', got {gather!r}")
    if arena.device.type != "cpu":
        raise ValueError(
            f"copy_pages_async: the arena must live in host memory, got {arena.device}"
        )
    if arena.shape[1:] != pool.shape[1:] or arena.dtype != pool.dtype:
        raise ValueError(
            f"copy_pages_async: arena pages {tuple(arena.shape[1:])} {arena.dtype} do not match "
            f"pool pages {tuple(pool.shape[1:])} {pool.dtype}"
        )
    if src_rows.dim() != 1 or src_rows.shape != dst_rows.shape:
        raise ValueError(
            f"copy_pages_async: src_rows {tuple(src_rows.shape)} and dst_rows "
            f"{tuple(dst_rows.shape)} must be 1-D and of equal length"
        )
    src_rows = src_rows.to("cpu", torch.int64)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if pool.device.type != "cuda":
        if gather == "device" and interpreting:  # CPU tests of the gather kernel's indexing
            from kvhead.kernels.triton.gather import gather_rows

            gather_rows(arena, pool, torch.stack([src_rows, dst_rows.to("cpu", torch.int64)]))
        else:
            pool.index_copy_(
                0, dst_rows.to(pool.device, torch.int64), arena.index_select(0, src_rows)
            )
        return None
    if not arena.is_pinned():
        raise ValueError(
            "copy_pages_async: the arena must be pinned (torch.empty(..., "
            "pin_memory=True)) or the copy cannot overlap compute"
        )
    stream = stream or _side_stream(pool.device)
    if gather == "device":
        from kvhead.kernels.triton.gather import gather_rows

        rows = torch.stack([src_rows, dst_rows.to("cpu", torch.int64)]).pin_memory()
        with torch.cuda.stream(stream):
            if wait_for is not None:
                stream.wait_event(wait_for)
            gather_rows(arena, pool, rows.to(pool.device, non_blocking=True))
            done = torch.cuda.Event()
            done.record(stream)
        return done
    staging = torch.empty((src_rows.numel(), *arena.shape[1:]), dtype=arena.dtype, pin_memory=True)
    torch.index_select(arena, 0, src_rows, out=staging)
    rows = dst_rows.to("cpu", torch.int64).pin_memory()
    with torch.cuda.stream(stream):
        if wait_for is not None:
            stream.wait_event(wait_for)
        pages = staging.to(pool.device, non_blocking=True)
        pool.index_copy_(0, rows.to(pool.device, non_blocking=True), pages)
        done = torch.cuda.Event()
        done.record(stream)
    return done
