"""Two-level page selection over int8 bounds in two launches, each reduced by its last program.

Same function as :func:`kvhead.bounds_compact.hier_select` and the other layouts of
:mod:`kvhead.kernels.select_hier`, same output and tie rule (lower ids win). Why a third
layout: the multi-launch path is a chain of three dependent launches with radix selects over
whole rows, and the one-launch kernel (:mod:`kvhead.kernels.select_one`) carried its last
program's registers (255, spills) into every scoring program, so at 128k tokens (1024
super-pages per row) it ran in waves and lost. Here each launch keeps its programs light:

A. programs of a row score a tile of super-pages each and keep the tile's local top-M (a box
   outside it has M boxes of its tile before it, so it is not in the row's top-M); the last
   program of the row to arrive merges the tiles' winners to the row's top-M super-pages and
   writes their candidate pages (block id and logical page, super-page by super-page in
   ascending order) for B, so B's loads start from the candidate list, not the block table;
B. programs of a row score a tile of candidates each and keep the tile's local top-K; the last
   program merges them to the row's top-K. One tile per row needs neither counter nor merge.

B may be launched as a programmatic dependent launch (``pdl``, Hopper and later): its programs
start while A finishes, compute the query's digits, then wait for A (``gdc_wait``) before
reading the candidates. A signals its dependents as soon as it starts.

Both launches share the per-row counters of :mod:`kvhead.kernels.select_one` (re-zeroed by the
last program of each row); B touches them only after A has finished, and calls sharing a
device must not overlap on concurrent streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvhead.kernels.pdl import gdc_launch_dependents, gdc_wait, pdl_active
from kvhead.kernels.select import _pad_ids, _top_k_positions, radix_bits
from kvhead.kernels.select_one import _select_regs, row_counters
from kvhead.kernels.select_tiles import block_tile_best, group_digits, super_tile_best

REG_MAX_LANES = 128  # selections over at most this many lanes rank in registers, else radix


@dataclass(frozen=True)
class TwoShape:
    """Shape of the two-launch selection: ``tile`` super-pages per program of launch A,
    ``tile_c`` candidate pages per program of launch B, tensor-core scoring (``mma``),
    programmatic dependent launch of B (``pdl``; ignored where unsupported), warps per
    program of A and B. Defaults: the lightest programs of an sm_90 AOT compile
    (``benchmarks/gpu_aot_check.py``): tile 128 at 8 warps 236-254 registers and no spills
    (4 warps: 168 registers and a 2.8 KB stack), candidate tiles of 64 at 8 warps 170; tiles of
    256 with radix selections compiled to 32 registers and a 5-8 KB stack."""

    tile: int = 128
    tile_c: int = 64
    mma: bool = True
    pdl: bool = True
    warps: int = 8
    warps_c: int = 8

    def __post_init__(self) -> None:
        for name in ("tile", "tile_c"):
            value = getattr(self, name)
            if value < 16 or value & (value - 1) or value > 256:
                raise ValueError(f"{name} must be a power of two in [16, 256], got {value}")


@triton.jit
def _lane_select(s, idx, k, REG: tl.constexpr, BITS: tl.constexpr):
    """Top-``k`` lanes of ``s`` (ids ``idx`` ascending with the lanes): ranked in registers
    for narrow rows, by the radix search otherwise. ``(chosen, slot, count)``."""
    if REG:
        chosen, slot, count = _select_regs(s, idx, k)
    else:
        chosen, slot, count = _top_k_positions(s, k, BITS)
    return chosen, slot, count


@triton.jit
def _keep_local(best, ids, loc_score_ptr, loc_id_ptr, loc, k,
                LOCAL: tl.constexpr, TILE: tl.constexpr, BLOCK_LOCAL: tl.constexpr,
                REG: tl.constexpr, BITS: tl.constexpr):
    """Write a tile's local top-``k`` (score, id) at ``loc``, compacted in id order and padded
    with -inf to LOCAL lanes; a tile no wider than LOCAL is written whole."""
    if LOCAL == TILE:
        lane = tl.arange(0, TILE)
        tl.store(loc_score_ptr + loc + lane, best)
        tl.store(loc_id_ptr + loc + lane, ids)
    else:
        chosen, slot, count = _lane_select(best, ids, k, REG, BITS)
        tl.store(loc_score_ptr + loc + slot, best, mask=chosen)
        tl.store(loc_id_ptr + loc + slot, ids, mask=chosen)
        offs = tl.arange(0, BLOCK_LOCAL)
        tl.store(loc_score_ptr + loc + offs, tl.full([BLOCK_LOCAL], float("-inf"), tl.float32),
                 mask=(offs >= count) & (offs < LOCAL))


@triton.jit
def _merge(loc_score_ptr, loc_id_ptr, row, n, k, BLOCK_L: tl.constexpr, REG: tl.constexpr,
           BITS: tl.constexpr):
    """Top-``k`` of a row's ``n`` local winners (written by other programs: read past L1):
    ``(ids, chosen, slot, count)`` over BLOCK_L lanes in ascending id order."""
    lane = tl.arange(0, BLOCK_L)
    s = tl.load(loc_score_ptr + row + lane, mask=lane < n, other=float("-inf"),
                cache_modifier=".cg")
    chosen, slot, count = _lane_select(s, lane, k, REG, BITS)
    ids = tl.load(loc_id_ptr + row + lane, mask=chosen, other=0, cache_modifier=".cg")
    return ids, chosen, slot, count


@triton.jit
def _emit_candidates(sup, chosen, slot, count, table_ptr, sup_ptr, cblock_ptr, cpage_ptr, b,
                     bh, num_pages, top_m, num_cand, group, stride_tb, stride_ur, stride_cr,
                     BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CAND: tl.constexpr):
    """Write the chosen super-pages (ascending, -1 padded) and their candidate pages for B:
    block id (-1: no page) and logical page per slot, super-page by super-page."""
    sup = sup.to(tl.int64)
    tl.store(sup_ptr + bh * stride_ur + slot, sup, mask=chosen)
    _pad_ids(sup_ptr + bh * stride_ur, count, top_m, BLOCK_M)
    g = tl.arange(0, BLOCK_G)
    page2 = sup[:, None] * group + g[None, :]
    slot2 = slot[:, None] * group + g[None, :]
    mine = chosen[:, None] & (g < group)[None, :]
    held = mine & (page2 < num_pages)
    block2 = tl.load(table_ptr + b * stride_tb + page2, mask=held, other=-1)
    tl.store(cblock_ptr + bh * stride_cr + slot2, tl.where(held, block2, -1).to(tl.int32),
             mask=mine)
    tl.store(cpage_ptr + bh * stride_cr + slot2, page2.to(tl.int32), mask=mine)
    offs_c = tl.arange(0, BLOCK_CAND)
    tl.store(cblock_ptr + bh * stride_cr + offs_c, tl.full([BLOCK_CAND], -1, tl.int32),
             mask=(offs_c >= count * group) & (offs_c < num_cand))


@triton.jit
def _super_top_kernel(
    q_ptr, sqmin_ptr, sqmax_ptr, sscale_ptr, table_ptr, num_pages_ptr, loc_score_ptr,
    loc_id_ptr, sup_ptr, cblock_ptr, cpage_ptr, count_ptr,
    num_groups_max, top_m, num_cand, num_kv_heads, head_dim, group,
    stride_qb, stride_qh, stride_mb, stride_mh, stride_ms, stride_sb, stride_sh, stride_tb,
    stride_lr, stride_ur, stride_cr,
    GROUP: tl.constexpr, GP: tl.constexpr, MMA: tl.constexpr, TILE: tl.constexpr,
    T: tl.constexpr, LOCAL: tl.constexpr, BLOCK_LOCAL: tl.constexpr, REG_T: tl.constexpr,
    BITS_T: tl.constexpr, BLOCK_L: tl.constexpr, REG_L: tl.constexpr, BITS_L: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CAND: tl.constexpr,
    PDL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    if PDL:
        gdc_launch_dependents()
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    num_pages = tl.load(num_pages_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_row = q_ptr + b * stride_qb
    pos, neg, row_scale = group_digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    offs = t * TILE + tl.arange(0, TILE)
    best = super_tile_best(q_row, sqmin_ptr, sqmax_ptr, sscale_ptr, b, h, offs,
                           (num_pages + group - 1) // group, num_groups_max, stride_qh,
                           stride_mb, stride_mh, stride_ms, stride_sb, stride_sh, offs_d, d_mask,
                           pos, neg, row_scale, GROUP, GP, MMA, TILE)
    if T == 1:  # the row is one tile: select here, no counter
        chosen, slot, count = _lane_select(best, offs, top_m, REG_T, BITS_T)
        _emit_candidates(offs, chosen, slot, count, table_ptr, sup_ptr, cblock_ptr, cpage_ptr,
                         b, bh, num_pages, top_m, num_cand, group, stride_tb, stride_ur,
                         stride_cr, BLOCK_M, BLOCK_G, BLOCK_CAND)
    else:
        _keep_local(best, offs, loc_score_ptr, loc_id_ptr, bh * stride_lr + t * LOCAL, top_m,
                    LOCAL, TILE, BLOCK_LOCAL, REG_T, BITS_T)
        # Stores before the arrival (barrier); the acq_rel arrival releases them to the row's
        # last program, whose acquire makes every tile's winners visible to it.
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if arrived == T - 1:
            tl.debug_barrier()
            sup, win, wslot, wcount = _merge(loc_score_ptr, loc_id_ptr, bh * stride_lr,
                                             T * LOCAL, top_m, BLOCK_L, REG_L, BITS_L)
            _emit_candidates(sup, win, wslot, wcount, table_ptr, sup_ptr, cblock_ptr,
                             cpage_ptr, b, bh, num_pages, top_m, num_cand, group, stride_tb,
                             stride_ur, stride_cr, BLOCK_M, BLOCK_G, BLOCK_CAND)
            tl.store(count_ptr + bh, 0)  # the next call starts from zero (stream order)


@triton.jit
def _cand_top_kernel(
    q_ptr, pqmin_ptr, pqmax_ptr, pscale_ptr, num_pages_ptr, cblock_ptr, cpage_ptr,
    loc_score_ptr, loc_id_ptr, ids_ptr, count_ptr,
    num_cand, top_k, num_kv_heads, head_dim,
    stride_qb, stride_qh, stride_pmb, stride_pmh, stride_psb, stride_cr, stride_lr, stride_ir,
    GROUP: tl.constexpr, GP: tl.constexpr, MMA: tl.constexpr, TILE_C: tl.constexpr,
    T: tl.constexpr, LOCAL: tl.constexpr, BLOCK_LOCAL: tl.constexpr, REG_T: tl.constexpr,
    BITS_T: tl.constexpr, BLOCK_L: tl.constexpr, REG_L: tl.constexpr, BITS_L: tl.constexpr,
    BLOCK_K: tl.constexpr, PDL: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    t = tl.program_id(1)
    b = bh // num_kv_heads
    h = bh % num_kv_heads
    num_pages = tl.load(num_pages_ptr + b)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < head_dim
    q_row = q_ptr + b * stride_qb
    pos, neg, row_scale = group_digits(q_row, stride_qh, h, offs_d, d_mask, GROUP, GP, MMA)
    if PDL:  # everything above reads inputs only; the candidates come from launch A
        gdc_wait()
    offs_c = t * TILE_C + tl.arange(0, TILE_C)
    in_row = offs_c < num_cand
    block = tl.load(cblock_ptr + bh * stride_cr + offs_c, mask=in_row, other=-1)
    page = tl.load(cpage_ptr + bh * stride_cr + offs_c, mask=in_row, other=-1)
    valid = block >= 0
    best = block_tile_best(q_row, pqmin_ptr, pqmax_ptr, pscale_ptr, block, h, page, valid,
                           valid, num_pages, stride_qh, stride_pmb, stride_pmh, stride_psb,
                           offs_d, d_mask, pos, neg, row_scale, GROUP, GP, MMA, TILE_C)
    if T == 1:  # the row is one tile: select here, no counter
        chosen, slot, count = _lane_select(best, offs_c, top_k, REG_T, BITS_T)
        tl.store(ids_ptr + bh * stride_ir + slot, page.to(tl.int64), mask=chosen)
        _pad_ids(ids_ptr + bh * stride_ir, count, top_k, BLOCK_K)
    else:
        _keep_local(best, page, loc_score_ptr, loc_id_ptr, bh * stride_lr + t * LOCAL, top_k,
                    LOCAL, TILE_C, BLOCK_LOCAL, REG_T, BITS_T)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
        if arrived == T - 1:
            tl.debug_barrier()
            fpage, fin, fslot, fcount = _merge(loc_score_ptr, loc_id_ptr, bh * stride_lr,
                                               T * LOCAL, top_k, BLOCK_L, REG_L, BITS_L)
            tl.store(ids_ptr + bh * stride_ir + fslot, fpage.to(tl.int64), mask=fin)
            _pad_ids(ids_ptr + bh * stride_ir, fcount, top_k, BLOCK_K)
            tl.store(count_ptr + bh, 0)


def _select_consts(width: int, k: int) -> dict:
    """How a selection of ``k`` of ``width`` lanes runs: registers or radix, its bits."""
    block = triton.next_power_of_2(width)
    return {"REG": block <= REG_MAX_LANES, "BITS": radix_bits(block), "BLOCK": block}


def launch_two(
    query: torch.Tensor, sq: list[torch.Tensor], pq: list[torch.Tensor],
    block_table: torch.Tensor, num_pages: torch.Tensor, ids: torch.Tensor,
    sup_ids: torch.Tensor, *, num_groups: int, top_k: int, group: int, shape: TwoShape,
    GROUP: int, GP: int, BLOCK_D: int,
) -> None:
    """Launch A then B. ``sq``/``pq``: (qmin, qmax, scale) of super-pages ``[B, Hkv, S, D]``
    and pages; writes ``ids [B, Hkv, k]`` and ``sup_ids [rows, M]``."""
    rows, top_m = sup_ids.shape
    dev = query.device
    num_cand = top_m * group
    mma = shape.mma and BLOCK_D >= 32
    pdl = shape.pdl and pdl_active(dev)
    counters = row_counters(dev, rows)
    # A: super-pages -> top-M -> candidate list
    tiles = triton.cdiv(num_groups, shape.tile)
    local = min(top_m, shape.tile)
    tile_sel = _select_consts(shape.tile, local)
    merge = _select_consts(tiles * local, top_m)
    loc_score = torch.empty(rows, max(tiles * local, triton.cdiv(num_cand, shape.tile_c)
                                      * min(top_k, shape.tile_c)), dtype=torch.float32,
                            device=dev)
    loc_id = torch.empty(loc_score.shape, dtype=torch.int32, device=dev)
    cblock = torch.empty(rows, num_cand, dtype=torch.int32, device=dev)
    cpage = torch.empty(rows, num_cand, dtype=torch.int32, device=dev)
    sm, ss = sq[0], sq[2]
    _super_top_kernel[(rows, tiles)](
        query, sq[0], sq[1], ss, block_table, num_pages, loc_score, loc_id, sup_ids, cblock,
        cpage, counters, num_groups, top_m, num_cand, pq[0].shape[1], query.shape[2], group,
        query.stride(0), query.stride(1), sm.stride(0), sm.stride(1), sm.stride(2),
        ss.stride(0), ss.stride(1), block_table.stride(0), loc_score.stride(0),
        sup_ids.stride(0), cblock.stride(0),
        GROUP=GROUP, GP=GP, MMA=mma, TILE=shape.tile, T=tiles, LOCAL=local,
        BLOCK_LOCAL=triton.next_power_of_2(local), REG_T=tile_sel["REG"],
        BITS_T=tile_sel["BITS"], BLOCK_L=merge["BLOCK"], REG_L=merge["REG"],
        BITS_L=merge["BITS"], BLOCK_M=triton.next_power_of_2(top_m),
        BLOCK_G=triton.next_power_of_2(group), BLOCK_CAND=triton.next_power_of_2(num_cand),
        PDL=pdl, BLOCK_D=BLOCK_D, num_warps=shape.warps,
    )
    # B: candidates -> top-K pages (loc buffers reused: A's last programs are done with them)
    tile_c = min(shape.tile_c, triton.next_power_of_2(num_cand))
    tiles_c = triton.cdiv(num_cand, tile_c)
    k = ids.shape[2]
    local_c = min(k, tile_c)
    tile_sel = _select_consts(tile_c, local_c)
    merge = _select_consts(tiles_c * local_c, k)
    _cand_top_kernel[(rows, tiles_c)](
        query, pq[0], pq[1], pq[2], num_pages, cblock, cpage, loc_score, loc_id, ids, counters,
        num_cand, k, pq[0].shape[1], query.shape[2],
        query.stride(0), query.stride(1), pq[0].stride(0), pq[0].stride(1), pq[2].stride(0),
        cblock.stride(0), loc_score.stride(0), k,
        GROUP=GROUP, GP=GP, MMA=mma, TILE_C=tile_c, T=tiles_c, LOCAL=local_c,
        BLOCK_LOCAL=triton.next_power_of_2(local_c), REG_T=tile_sel["REG"],
        BITS_T=tile_sel["BITS"], BLOCK_L=merge["BLOCK"], REG_L=merge["REG"],
        BITS_L=merge["BITS"], BLOCK_K=triton.next_power_of_2(k), PDL=pdl, BLOCK_D=BLOCK_D,
        num_warps=shape.warps_c, launch_pdl=pdl,
    )
