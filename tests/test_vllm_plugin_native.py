"""The plugin's native CPU kernels against their torch references (no vLLM engine)."""

from __future__ import annotations

import pytest
import torch

from kvhead.core.attention import sparse_decode_attention
from kvhead.core.pages import PageBounds
from kvhead.core.summaries import PageValueSums, compensate
from kvhead.kernels.cpu import native
from kvhead.vllm.device_bounds import DeviceBounds

P, HKV, NB = 16, 3, 48


def _decode_keys(seed: int, dim: int, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys of three sequences decoding in lock-step and their blocks."""
    torch.manual_seed(seed)
    blocks = torch.randperm(NB)[: 3 * 8].view(3, 8)
    keys = torch.randn(3, tokens, HKV, dim) * torch.linspace(0.1, 3, dim)
    return keys, blocks


@pytest.mark.parametrize("open_slots", [8, 2, 1])
def test_native_bounds_update_matches_the_torch_update(open_slots: int) -> None:
    """Token-by-token decode writes of three sequences and a block reused by a new request.
    With a table entry per open page the int8 rows equal the torch update's bit for bit; with
    fewer entries (LRU evictions, where the two may pick different victims) every key still
    lies inside its page's box."""
    dim = 32
    keys, blocks = _decode_keys(0, dim, 70)
    ours, ref = DeviceBounds(NB, HKV, dim, open_slots), DeviceBounds(NB, HKV, dim, open_slots)
    kernels = native.kernels()
    written: dict[int, list[torch.Tensor]] = {}
    for t in range(keys.shape[1]):
        slots = blocks[:, t // P] * P + t % P
        if t == 50:  # sequence 2's block 0 goes to a new request
            slots[2] = blocks[2, 0] * P
        for b, slot in enumerate(slots.tolist()):
            written.setdefault(slot // P, []) if slot % P else written.update({slot // P: []})
            written[slot // P].append(keys[b, t])
        ref.update(keys[:, t], slots, P)
        ours.clock += 1
        kernels.update_bounds(
            keys[:, t].contiguous(),
            slots.long(),
            P,
            ours.box,
            ours.scale,
            ours.open_min,
            ours.open_max,
            ours.open_tag,
            ours.open_used,
            ours.clock,
        )
    if open_slots == 8:
        assert torch.equal(ours.box, ref.box) and torch.equal(ours.scale, ref.scale)

        def exact(bounds: DeviceBounds) -> dict[int, torch.Tensor]:
            return {
                tag: bounds.open_max[e]
                for e, tag in enumerate(bounds.open_tag.tolist())
                if tag >= 0
            }

        mine, theirs = exact(ours), exact(ref)
        assert mine.keys() == theirs.keys() and len(mine) == 4  # + the abandoned page
        assert all(torch.equal(mine[tag], theirs[tag]) for tag in mine)
    for bounds in (ours, ref):  # an open page's int8 row is stale by design: skip those
        settled = [blk for blk in written if blk not in bounds.open_tag.tolist()]
        assert len(settled) >= 8
        for blk in settled:
            page = torch.stack(written[blk])  # [n, Hkv, D]
            kmax, kmin = bounds.boxes(torch.tensor([blk]))
            assert bool((page <= kmax + 1e-6).all()) and bool((page >= kmin - 1e-6).all())


@pytest.mark.parametrize(
    "group_score,bound_weight,sink,recent,budgets,dim",
    [
        ("max", 1.0, 0, 1, [5, 5, 5], 64),  # the spec's ranking (AVX-512 scores)
        ("max", 1.0, 0, 1, [5, 5, 5], 48),  # the same, no vectorised shape: the portable scorer
        ("softmax", 0.5, 1, 2, [6, 3, 9], 64),
        ("softmax", 0.0, 2, 1, [4, 7, 3], 64),
        ("max", 0.5, 1, 4, [40, 5, 6], 64),  # a budget above the pages a sequence holds
    ],
)
def test_native_selection_equals_the_torch_selection(
    group_score: str, bound_weight: float, sink: int, recent: int, budgets: list[int], dim: int
) -> None:
    """Reranks as the spec and with the flexicache+ options (bound weight, max / softmax group
    score, forced sink and recent pages, per-head budgets) natively == DeviceBounds.select, for
    sequences of unequal length; rows of heads not asked for are left alone."""
    keys, blocks = _decode_keys(3, dim, 7 * P + 5)
    bounds = DeviceBounds(NB, HKV, dim, 8)
    for t in range(keys.shape[1]):
        bounds.update(keys[:, t], blocks[:, t // P] * P + t % P, P)
    table = blocks.int().contiguous()
    num_pages = torch.tensor([8, 5, 7], dtype=torch.int64)
    q = torch.randn(3, HKV * 3, dim)
    heads, top_k = torch.tensor([0, 2]), torch.tensor(budgets)
    options = {
        "sink_pages": sink,
        "recent_pages": recent,
        "group_score": group_score,
        "bound_weight": bound_weight,
    }
    ref = bounds.select(q, table[:, :8], num_pages, top_k, heads, **options)
    ours = torch.full((3, HKV, 12), -7, dtype=torch.int64)
    native.kernels().select_pages(
        q,
        bounds.box,
        bounds.scale,
        table,
        num_pages,
        heads,
        top_k,
        sink,
        recent,
        group_score == "softmax",
        bound_weight,
        ours,
    )
    width = ref.shape[2]
    assert torch.equal(ours[:, heads, :width], ref[:, heads])
    assert bool((ours[:, heads, width:] == -1).all())
    assert bool((ours[:, 1] == -7).all())
    for b, n in enumerate(num_pages.tolist()):  # forced pages are always in
        for h in heads.tolist():
            chosen = set(ours[b, h].tolist())
            assert set(range(min(sink, n))) | set(range(n - recent, n)) <= chosen


@pytest.mark.parametrize(
    "dtype,dim,group", [(torch.float32, 64, 3), (torch.bfloat16, 64, 3), (torch.float32, 48, 2)]
)
def test_native_decode_step_equals_reference_attention(
    dtype: torch.dtype, dim: int, group: int
) -> None:
    """Resident heads (top-K scored in the kernel, and dense), stable heads over pool pages of
    their last top-K plus the tail, with and without summary tokens for the pages they skip;
    the vectorised path (dim 64) and the portable one (48)."""
    torch.manual_seed(2)
    batch, width, top_k = 2, 10, 4
    lens = torch.tensor([9 * P + 3, 6 * P], dtype=torch.int64)
    table = torch.randperm(NB)[: batch * width].view(batch, width).int().contiguous()
    k_ref, v_ref = torch.randn(2, NB, P, HKV, dim)
    res_index, stable_index = torch.tensor([-1, 0, -1]), torch.tensor([0, -1, 1])
    cache = torch.zeros(NB, 1, P, 2 * dim, dtype=dtype)
    pool = torch.zeros(NB * 2, 1, P, 2 * dim, dtype=dtype)
    slot_of = torch.arange(NB * 2).view(NB, 2)  # every stable page has a pool slot
    kernels = native.kernels()
    flat = torch.arange(NB * P)
    means = torch.zeros(NB, 2, dim, dtype=dtype)  # the writer's mean values, stable heads
    means[5] = 7.0  # a freed sequence's page: its first token starts it afresh
    kernels.write_tokens(
        k_ref.reshape(-1, HKV, dim).to(dtype).contiguous(),
        v_ref.reshape(-1, HKV, dim).to(dtype).contiguous(),
        flat,
        cache,
        res_index,
        pool,
        slot_of,
        stable_index,
        means,
    )
    bounds = DeviceBounds(NB, HKV, dim, 1)
    bounds.update(k_ref.reshape(-1, HKV, dim), flat, P)
    sel = torch.full((batch, HKV, top_k), -1, dtype=torch.int64)
    sel[0, 0], sel[1, 0] = torch.tensor([0, 3, 5, 7]), torch.tensor([1, 2, 3, 4])
    sel[0, 2], sel[1, 2] = torch.tensor([2, 4, 6, 7]), torch.tensor([0, 2, -1, -1])
    anchor = torch.tensor([[8, 0, 8], [5, 0, 3]])  # tails: pages 7.. and 4.. / 2..
    q = torch.randn(batch, HKV * group, dim).to(dtype)
    k_ref, v_ref = k_ref.to(dtype).float(), v_ref.to(dtype).float()
    kmax, kmin = bounds.boxes(torch.arange(NB))
    # running means rounded once per token to the cache's dtype: within its rounding of a value
    mean_tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(
        means.float(), v_ref.mean(1)[:, [0, 2]], atol=mean_tol, rtol=mean_tol
    )
    sums = PageValueSums(torch.zeros(NB, HKV, dim))  # every slot of every block is written
    sums.sums[:, [0, 2]] = means.float() * P  # the summaries the kernel folds in, as sums
    for dense, summaries in ((False, False), (True, False), (True, True)):
        out, steps = torch.empty_like(q), torch.zeros(2, dtype=torch.float64)
        value_means = means if summaries else torch.zeros(0, 0, 0, dtype=dtype)
        lost = kernels.decode_step(
            q,
            out,
            cache,
            res_index,
            pool,
            slot_of,
            stable_index,
            table,
            lens,
            bounds.box,
            bounds.scale,
            sel,
            anchor,
            top_k,
            dense,
            dim**-0.5,
            steps,
            value_means,
        )
        assert lost == 0
        pages = torch.full((batch, HKV, width), -1, dtype=torch.int64)
        resident = 0.0  # the resident head holds every page; stable heads what they attend
        for b in range(batch):
            num = int((lens[b] + P - 1) // P)
            res = (
                torch.arange(num)
                if dense
                else bounds.select(
                    q[b : b + 1].float(), table[b : b + 1], torch.tensor([num]), top_k
                )[0, 1]
            )
            pages[b, 1, : len(res)] = res
            resident += num
            for h in (0, 2):
                tail = torch.arange(int(anchor[b, h]) - 1, num)
                mine = sel[b, h][(sel[b, h] >= 0) & (sel[b, h] < tail[0])]
                ids = torch.cat([mine, tail])
                pages[b, h, : len(ids)] = ids
                resident += len(ids)
        ref, lse = sparse_decode_attention(q.float(), k_ref, v_ref, table, lens, pages, dim**-0.5)
        if summaries:  # the resident head skips nothing, so only stable heads change
            ref = compensate(
                ref,
                lse,
                q.float(),
                PageBounds(kmin=kmin, kmax=kmax),
                sums,
                table,
                lens,
                pages,
                P,
                dim**-0.5,
            )
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
        assert steps.tolist() == [resident, 3 * (10 + 6)]


def test_decode_step_reports_stable_pages_missing_from_the_pool() -> None:
    dim = 64
    q = torch.randn(1, HKV * 3, dim)
    table = torch.arange(4).view(1, 4).int()
    lost = native.kernels().decode_step(
        q,
        torch.empty_like(q),
        torch.zeros(NB, 1, P, 2 * dim),
        torch.tensor([0, -1, -1]),
        torch.zeros(4, 1, P, 2 * dim),
        torch.full((NB, 2), -1, dtype=torch.int64),
        torch.tensor([-1, 0, 1]),
        table,
        torch.tensor([3 * P], dtype=torch.int64),
        torch.zeros(HKV, NB, 2 * dim, dtype=torch.int8),
        torch.ones(HKV, NB),
        torch.tensor([[[0, 1, 2], [0, 1, 2], [0, 1, 2]]]),
        torch.full((1, HKV), 3),
        3,
        False,
        0.125,
        torch.zeros(2, dtype=torch.float64),
        torch.zeros(0, 0, 0),
    )
    assert lost == 6  # two stable heads x three pages, none in the pool
