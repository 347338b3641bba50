"""Triton page gather that reads a pinned host arena directly (zero-copy over PCIe).

Pinned host memory is mapped into the GPU's address space (unified addressing), so a kernel can
load from it. One program moves one page: it reads the page's row from the arena and writes it
to its pool row, so the host does no gather and no staging copy, and the whole promotion is a
single launch on the copy stream. Each program keeps a page's worth of 16-byte loads in flight,
which is what a PCIe link needs to reach its bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_rows_kernel(src_ptr, dst_ptr, rows_ptr, num_rows, row_elems, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    src_row = tl.load(rows_ptr + i).to(tl.int64)
    dst_row = tl.load(rows_ptr + num_rows + i).to(tl.int64)
    for start in range(0, row_elems, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < row_elems
        page = tl.load(src_ptr + src_row * row_elems + offs, mask=mask)
        tl.store(dst_ptr + dst_row * row_elems + offs, page, mask=mask)


def gather_rows(arena: torch.Tensor, pool: torch.Tensor, rows: torch.Tensor) -> None:
    """``pool[rows[1]] = arena[rows[0]]`` for contiguous ``arena``/``pool`` and ``rows [2, n]``."""
    if not (arena.is_contiguous() and pool.is_contiguous()):
        raise ValueError("copy_pages_async: device gather needs contiguous arena and pool")
    num_rows = rows.shape[1]
    row_elems = arena[0].numel() if arena.shape[0] else 0
    if num_rows == 0 or row_elems == 0:
        return
    _gather_rows_kernel[(num_rows,)](
        arena, pool, rows, num_rows, row_elems,
        BLOCK=min(4096, triton.next_power_of_2(row_elems)), num_warps=4,
    )
