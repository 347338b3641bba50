"""Page selection over int8 bounds in one launch, for grids too small to fill the GPU.

Same functions as the multi-launch path of :mod:`kvhead.kernels.triton.select_hier` (flat and
two-level), same output and tie rule (lower ids win). At batch 1 that path is a chain of
dependent launches, each with a radix select whose every pass ends in a block-wide barrier, so
it is bound by latency (H200: 14-18 us for bytes that would take 0.5 us). Here:

1. every program of a row scores one tile of first-pass boxes (pages when flat, super-pages
   otherwise) and keeps the tile's local top-``k1`` (k1 = K flat, M two-level). A box outside
   its tile's top-k1 has k1 boxes of its tile before it in the (score, id) order, so it is not in
   the row's top-k1 either: the union of the local winners holds the row's answer;
2. it writes its winners (score, id) compacted in ascending id order, and the last program of
   the row to arrive (an acq_rel counter per row) merges them: top-k1 of ``tiles x k1`` lanes
   instead of every box. Flat, that is the answer. Two-level, the last program goes on alone:
   it scores the M x G candidate pages of the chosen super-pages and takes their top-K.

Selections inside a program rank by counting (lane i's rank = how many lanes beat it), one
reduction instead of a radix search's ~10 passes with two barriers each; ``rank=False`` keeps
the radix search for the merges (a plan knob for the benchmarks).

The per-row counters live in a buffer per device that the last program of each row re-zeroes,
so a CUDA graph can replay the launch with no memset node. Calls sharing a device must
therefore not overlap on concurrent streams (the policy calls selections one after another).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kvhead.kernels.triton.select import _pad_ids, _top_k_positions, radix_bits
from kvhead.kernels.triton.select_tiles import block_tile_best, group_digits, super_tile_best

RANK_ELEMS = 64  # comparisons per thread and chunk of a ranking by counting (register budget)
RANK_MAX_LANES = 512  # wider merges use the radix search (a ranking costs lanes^2)
ONE_TILE = 128  # first-pass boxes per program in the default shape
REG_FINAL_MAX = 128  # candidate tiles up to this size are ranked in registers (lanes^2 / thread)
_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


@dataclass(frozen=True)
class OneShape:
    """Shape of the one-launch kernel: ``tile`` first-pass boxes per program; ``tile_c``
    candidate pages per step of the last program (None: all in one step, whose loads then
    issue together; steps run one after another, each a chain of dependent loads); ``mma``
    tensor-core scoring; ``rank`` rank by counting (else radix search) in merges of up to
    RANK_MAX_LANES lanes; ``warps`` per program."""

    tile: int = 64
    tile_c: int | None = 64
    mma: bool = False
    rank: bool = True
    warps: int = 8

    def __post_init__(self) -> None:
        for name in ("tile", "tile_c"):
            value = getattr(self, name)
            if value is not None and (value < 16 or value & (value - 1)):
                raise ValueError(f"{name} must be a power of two >= 16, got {value}")


def default_shape(num_cand: int) -> OneShape:
    """The shape that won on an H200 (``benchmarks/results/gpu/gpu_select_run2.json``): tiles of
    ONE_TILE boxes scored on tensor cores, candidates in steps of 256, radix merges, except
    rank counting when the final candidates fit one register ranking (<= REG_FINAL_MAX):
    32k tokens, batch 8, K = 32: 15.5 us ranked, 17.8 us radix. Ranking by counting through
    memory lost wherever it merged 256 lanes or more (128k, batch 1, K = 64: 30.9 against
    18.4 us with radix merges)."""
    return OneShape(tile=ONE_TILE, tile_c=256, mma=True, rank=num_cand <= REG_FINAL_MAX)


def row_counters(device: torch.device, rows: int) -> torch.Tensor:
    """Zeroed per-row arrival counters for ``rows`` rows (kept zero by the kernel itself)."""
    held = _COUNTERS.setdefault(device, [])
    if held and held[-1].numel() >= rows:
        return held[-1]
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "one-launch selection: call it once before capturing a CUDA graph "
            "(its counter buffer must be allocated outside the capture)"
        )
    # Older buffers stay referenced: graphs captured earlier still point at them.
    held.append(torch.zeros(max(rows, 1024), dtype=torch.int32, device=device))
    return held[-1]


@triton.jit
def _beats(s, idx, other, other_idx):
    """[len(s), len(other)]: whether ``other[j]`` comes before ``s[i]`` (higher score, or equal
    score and lower id)."""
    return (other[None, :] > s[:, None]) | (
        (other[None, :] == s[:, None]) & (other_idx[None, :] < idx[:, None])
    )


@triton.jit
def _chosen(s, rank, top_k):
    """Top-``top_k`` lanes from their ranks: ``(chosen, slot in ascending lane order, count)``."""
    chosen = (s > float("-inf")) & (rank < top_k)
    flag = chosen.to(tl.int32)
    return chosen, tl.cumsum(flag, 0) - 1, tl.sum(flag, 0)


@triton.jit
def _select_regs(s, idx, top_k):
    """Top-``top_k`` of a tile held in registers, ranked against itself in one comparison."""
    rank = tl.sum(_beats(s, idx, s, idx).to(tl.int32), 1)
    return _chosen(s, rank, top_k)


@triton.jit
def _select_mem(
    src_ptr,
    n,
    top_k,
    BLOCK: tl.constexpr,
    CHUNK: tl.constexpr,
    RANK: tl.constexpr,
    BITS: tl.constexpr,
):
    """Top-``top_k`` of ``n`` scores at ``src_ptr`` (written by other programs: read past L1).
    Returns ``(chosen, slot, count)`` over ``BLOCK`` lanes."""
    offs = tl.arange(0, BLOCK)
    s = tl.load(src_ptr + offs, mask=offs < n, other=float("-inf"), cache_modifier=".cg")
    if RANK:
        rank = tl.zeros([BLOCK], tl.int32)
        for c in tl.static_range(BLOCK // CHUNK):  # unrolled: every chunk's load can issue early
            offs_j = c * CHUNK + tl.arange(0, CHUNK)
            other = tl.load(
                src_ptr + offs_j, mask=offs_j < n, other=float("-inf"), cache_modifier=".cg"
            )
            rank += tl.sum(_beats(s, offs, other, offs_j).to(tl.int32), 1)
        chosen, slot, count = _chosen(s, rank, top_k)
    else:
        chosen, slot, count = _top_k_positions(s, top_k, BITS)
    return chosen, slot, count


@triton.jit
def _one_kernel(
    q_ptr,
    fqmin_ptr,
    fqmax_ptr,
    fscale_ptr,
    pqmin_ptr,
    pqmax_ptr,
    pscale_ptr,
    table_ptr,
    num_pages_ptr,
    loc_score_ptr,
    loc_id_ptr,
    sup_ptr,
    cand_ptr,
    cblock_ptr,
    cpage_ptr,
    ids_ptr,
    count_ptr,
    num_first,
    top_first,
    num_cand,
    top_k,
    num_kv_heads,
    head_dim,
    group,
    stride_qb,
    stride_qh,
    stride_fmb,
    stride_fmh,
    stride_fms,
    stride_fsb,
    stride_fsh,
    stride_pmb,
    stride_pmh,
    stride_psb,
    stride_tb,
    stride_lr,
    stride_ur,
    stride_cr,
    stride_ir,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    FLAT: tl.constexpr,
    TILE: tl.constexpr,
    LOCAL: tl.constexpr,
    BLOCK_LOCAL: tl.constexpr,
    T: tl.constexpr,
    BLOCK_L: tl.constexpr,
    CHUNK_L: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_G: tl.constexpr,
    TILE_C: tl.constexpr,
    C_TILES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNK_C: tl.constexpr,
    REG_FINAL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RANK_L: tl.constexpr,
    RANK_C: tl.constexpr,
    BITS_L: tl.constexpr,
    BITS_C: tl.constexpr,
    BLOCK_D: tl.constexpr,
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
    offs = t * TILE + tl.arange(0, TILE)
    # Boxes are read up to the row's width, not the sequence's length, so that the loads do not
    # wait for the page count; what lies past the sequence is masked out after scoring.
    in_row = offs < num_first
    if FLAT:
        block = tl.load(table_ptr + b * stride_tb + offs, mask=in_row, other=0)
        best = block_tile_best(
            q_row,
            fqmin_ptr,
            fqmax_ptr,
            fscale_ptr,
            block,
            h,
            offs,
            in_row,
            in_row & (offs < num_pages),
            num_pages,
            stride_qh,
            stride_fmb,
            stride_fmh,
            stride_fsb,
            offs_d,
            d_mask,
            pos,
            neg,
            row_scale,
            GROUP,
            GP,
            MMA,
            TILE,
        )
    else:
        best = super_tile_best(
            q_row,
            fqmin_ptr,
            fqmax_ptr,
            fscale_ptr,
            b,
            h,
            offs,
            (num_pages + group - 1) // group,
            num_first,
            stride_qh,
            stride_fmb,
            stride_fmh,
            stride_fms,
            stride_fsb,
            stride_fsh,
            offs_d,
            d_mask,
            pos,
            neg,
            row_scale,
            GROUP,
            GP,
            MMA,
            TILE,
        )
    chosen, slot, count = _select_regs(best, offs, top_first)
    loc = bh * stride_lr + t * LOCAL
    tl.store(loc_score_ptr + loc + slot, best, mask=chosen)
    tl.store(loc_id_ptr + loc + slot, offs, mask=chosen)
    offs_loc = tl.arange(0, BLOCK_LOCAL)
    tl.store(
        loc_score_ptr + loc + offs_loc,
        tl.full([BLOCK_LOCAL], float("-inf"), tl.float32),
        mask=(offs_loc >= count) & (offs_loc < LOCAL),
    )
    # Every thread's stores happen before the arrival (barrier), and the arrival releases them
    # to the row's last program, whose acquire makes all the row's winners visible to it.
    tl.debug_barrier()
    arrived = tl.atomic_add(count_ptr + bh, 1, sem="acq_rel")
    if arrived == T - 1:
        tl.debug_barrier()
        lane = tl.arange(0, BLOCK_L)
        win, wslot, wcount = _select_mem(
            loc_score_ptr + bh * stride_lr, T * LOCAL, top_first, BLOCK_L, CHUNK_L, RANK_L, BITS_L
        )
        first = tl.load(
            loc_id_ptr + bh * stride_lr + lane, mask=win, other=0, cache_modifier=".cg"
        ).to(tl.int64)
        if FLAT:
            tl.store(ids_ptr + bh * stride_ir + wslot, first, mask=win)
            _pad_ids(ids_ptr + bh * stride_ir, wcount, top_k, BLOCK_K)
        else:
            tl.store(sup_ptr + bh * stride_ur + wslot, first, mask=win)
            _pad_ids(sup_ptr + bh * stride_ur, wcount, top_first, BLOCK_M)
            _second_level(
                q_row,
                pqmin_ptr,
                pqmax_ptr,
                pscale_ptr,
                table_ptr,
                cand_ptr,
                cblock_ptr,
                cpage_ptr,
                ids_ptr,
                b,
                h,
                bh,
                first,
                win,
                wslot,
                wcount,
                num_pages,
                num_cand,
                top_k,
                group,
                stride_qh,
                stride_pmb,
                stride_pmh,
                stride_psb,
                stride_tb,
                stride_cr,
                stride_ir,
                offs_d,
                d_mask,
                pos,
                neg,
                row_scale,
                GROUP,
                GP,
                MMA,
                BLOCK_G,
                TILE_C,
                C_TILES,
                BLOCK_C,
                CHUNK_C,
                REG_FINAL,
                BLOCK_K,
                RANK_C,
                BITS_C,
            )
        tl.store(count_ptr + bh, 0)  # the next call starts from zero (stream order)


@triton.jit
def _second_level(
    q_row,
    pqmin_ptr,
    pqmax_ptr,
    pscale_ptr,
    table_ptr,
    cand_ptr,
    cblock_ptr,
    cpage_ptr,
    ids_ptr,
    b,
    h,
    bh,
    sup,
    chosen,
    slot,
    count,
    num_pages,
    num_cand,
    top_k,
    group,
    stride_qh,
    stride_pmb,
    stride_pmh,
    stride_psb,
    stride_tb,
    stride_cr,
    stride_ir,
    offs_d,
    d_mask,
    pos,
    neg,
    row_scale,
    GROUP: tl.constexpr,
    GP: tl.constexpr,
    MMA: tl.constexpr,
    BLOCK_G: tl.constexpr,
    TILE_C: tl.constexpr,
    C_TILES: tl.constexpr,
    BLOCK_C: tl.constexpr,
    CHUNK_C: tl.constexpr,
    REG_FINAL: tl.constexpr,
    BLOCK_K: tl.constexpr,
    RANK_C: tl.constexpr,
    BITS_C: tl.constexpr,
):
    """Last program, two-level: top-K pages of the chosen super-pages ``sup`` (merge lanes).

    The candidates' block ids are gathered in the merge's layout (lane x page of the group) and
    laid out super-page by super-page in ascending order, so ascending candidate slots are
    ascending pages and the candidate tiles read their blocks with one load.
    """
    g = tl.arange(0, BLOCK_G)
    page2 = sup[:, None] * group + g[None, :]
    slot2 = slot[:, None] * group + g[None, :]
    mine = chosen[:, None] & (g < group)[None, :]
    held = mine & (page2 < num_pages)
    block2 = tl.load(table_ptr + b * stride_tb + page2, mask=held, other=-1)
    tl.store(cblock_ptr + bh * stride_cr + slot2, tl.where(held, block2, -1), mask=mine)
    tl.store(cpage_ptr + bh * stride_cr + slot2, page2.to(tl.int32), mask=mine)
    tl.debug_barrier()
    for c in tl.static_range(C_TILES):
        offs_c = c * TILE_C + tl.arange(0, TILE_C)
        live = offs_c < count * group
        block = tl.load(cblock_ptr + bh * stride_cr + offs_c, mask=live, other=-1)
        page = tl.load(cpage_ptr + bh * stride_cr + offs_c, mask=live, other=-1)
        valid = block >= 0
        best = block_tile_best(
            q_row,
            pqmin_ptr,
            pqmax_ptr,
            pscale_ptr,
            block,
            h,
            page,
            valid,
            valid,
            num_pages,
            stride_qh,
            stride_pmb,
            stride_pmh,
            stride_psb,
            offs_d,
            d_mask,
            pos,
            neg,
            row_scale,
            GROUP,
            GP,
            MMA,
            TILE_C,
        )
        if REG_FINAL:  # one tile: rank it in registers, no round trip through memory
            fin, fslot, fcount = _select_regs(best, offs_c, top_k)
            tl.store(ids_ptr + bh * stride_ir + fslot, page.to(tl.int64), mask=fin)
            _pad_ids(ids_ptr + bh * stride_ir, fcount, top_k, BLOCK_K)
        else:
            tl.store(cand_ptr + bh * stride_cr + offs_c, best, mask=offs_c < num_cand)
    if not REG_FINAL:
        tl.debug_barrier()
        fin, fslot, fcount = _select_mem(
            cand_ptr + bh * stride_cr, num_cand, top_k, BLOCK_C, CHUNK_C, RANK_C, BITS_C
        )
        offs_n = tl.arange(0, BLOCK_C)
        page = tl.load(cpage_ptr + bh * stride_cr + offs_n, mask=fin, other=0)
        tl.store(ids_ptr + bh * stride_ir + fslot, page.to(tl.int64), mask=fin)
        _pad_ids(ids_ptr + bh * stride_ir, fcount, top_k, BLOCK_K)


def _chunk(block: int, warps: int) -> int:
    """Lanes per chunk of a ranking over ``block`` lanes: at most RANK_ELEMS per thread."""
    return max(1, min(block, RANK_ELEMS * 32 * warps // block))


def launch_one(
    query: torch.Tensor,
    first: list[torch.Tensor],
    pq: list[torch.Tensor],
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    ids: torch.Tensor,
    sup_ids: torch.Tensor,
    cand: torch.Tensor,
    *,
    num_first: int,
    top_first: int,
    top_k: int,
    group: int,
    flat: bool,
    shape: OneShape,
    GROUP: int,
    GP: int,
    BLOCK_D: int,
) -> None:
    """Launch :func:`_one_kernel`. ``first``: (qmin, qmax, scale) of the first pass (pages when
    ``flat``, else super-pages ``[B, Hkv, S, D]``); ``pq``: page bounds; ``ids`` ``[B, Hkv, k]``
    and (two-level) ``sup_ids`` ``[rows, M]`` are written, ``cand`` ``[rows, M x G]`` is
    scratch."""
    rows, num_cand = cand.shape
    dev = query.device
    tiles = triton.cdiv(num_first, shape.tile)
    local = min(top_first, shape.tile)
    lanes = tiles * local
    block_l = triton.next_power_of_2(lanes)
    block_c = triton.next_power_of_2(num_cand)
    tile_c = min(shape.tile_c or block_c, block_c)
    loc_score = torch.empty(rows, lanes, dtype=torch.float32, device=dev)
    loc_id = torch.empty(rows, lanes, dtype=torch.int32, device=dev)
    # candidate blocks and pages (two-level only; flat passes a placeholder it never reads)
    cblock, cpage = (
        (loc_id, loc_id)
        if flat
        else (torch.empty(rows, num_cand, dtype=torch.int32, device=dev) for _ in range(2))
    )
    fm, fs = first[0], first[2]
    # flat: pages are [blocks, Hkv, D] (block stride, head stride, no super-page stride)
    f_strides = (
        (fm.stride(0), fm.stride(1), 0, fs.stride(0), 0)
        if flat
        else (fm.stride(0), fm.stride(1), fm.stride(2), fs.stride(0), fs.stride(1))
    )
    c_tiles = triton.cdiv(num_cand, tile_c)
    _one_kernel[(rows, tiles)](
        query,
        first[0],
        first[1],
        fs,
        pq[0],
        pq[1],
        pq[2],
        block_table,
        num_pages,
        loc_score,
        loc_id,
        sup_ids,
        cand,
        cblock,
        cpage,
        ids,
        row_counters(dev, rows),
        num_first,
        top_first,
        num_cand,
        top_k,
        pq[0].shape[1],
        query.shape[2],
        group,
        query.stride(0),
        query.stride(1),
        *f_strides,
        pq[0].stride(0),
        pq[0].stride(1),
        pq[2].stride(0),
        block_table.stride(0),
        loc_score.stride(0),
        sup_ids.stride(0),
        cand.stride(0),
        ids.shape[2],
        GROUP=GROUP,
        GP=GP,
        MMA=shape.mma and BLOCK_D >= 32,
        FLAT=flat,
        TILE=shape.tile,
        LOCAL=local,
        BLOCK_LOCAL=triton.next_power_of_2(local),
        T=tiles,
        BLOCK_L=block_l,
        CHUNK_L=_chunk(block_l, shape.warps),
        BLOCK_M=triton.next_power_of_2(sup_ids.shape[1]),
        BLOCK_G=triton.next_power_of_2(group),
        TILE_C=tile_c,
        C_TILES=c_tiles,
        BLOCK_C=block_c,
        CHUNK_C=_chunk(block_c, shape.warps),
        REG_FINAL=shape.rank and c_tiles == 1 and tile_c <= REG_FINAL_MAX,
        BLOCK_K=triton.next_power_of_2(ids.shape[2]),
        RANK_L=shape.rank and block_l <= RANK_MAX_LANES,
        RANK_C=shape.rank and block_c <= RANK_MAX_LANES,
        BITS_L=radix_bits(block_l),
        BITS_C=radix_bits(block_c),
        BLOCK_D=BLOCK_D,
        num_warps=shape.warps,
    )
