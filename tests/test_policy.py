"""FlexiCache selection policy: who attends to what, what stays resident, what is fetched."""

import pytest
import torch

from kvhead.core.attention import dense_decode_attention, sparse_decode_attention
from kvhead.core.pages import PageBounds
from kvhead.core.policy import SelectionPolicy


class _Sequence:
    """One sequence growing a token per step in a paged pool."""

    def __init__(self, heads=3, dim=8, page=4, blocks=64, prompt=60, seed=0):
        self.g = torch.Generator().manual_seed(seed)
        self.heads, self.dim, self.page = heads, dim, page
        self.k = torch.randn(blocks, page, heads, dim, generator=self.g)
        self.v = torch.randn(blocks, page, heads, dim, generator=self.g)
        self.bounds = PageBounds.empty(blocks, heads, dim)
        self.table = torch.randperm(blocks, generator=self.g).unsqueeze(0)
        self.length = 0
        self.append(prompt)

    def slots(self, start, count):
        pos = torch.arange(start, start + count)
        return self.table[0, pos // self.page] * self.page + pos % self.page

    def append(self, count):
        slots = self.slots(self.length, count)
        keys = self.k.view(-1, self.heads, self.dim)[slots]
        self.bounds.update(keys, slots, self.page)
        self.length += count

    def query(self, group=2):
        return torch.randn(1, self.heads * group, self.dim, generator=self.g)


def _policy(mode, **kw):
    unstable = torch.tensor([[True, False, False]]) if mode == "flexicache" else None
    return SelectionPolicy(mode, num_layers=1, num_kv_heads=3, page_size=4, unstable=unstable, **kw)


def test_every_page_selected_equals_dense():
    seq = _Sequence()
    for mode in ("quest", "flexicache"):
        policy = _policy(mode, top_k=1000, rerank_interval=4)
        for _ in range(6):
            seq.append(1)
            lens = torch.tensor([seq.length])
            q = seq.query()
            sel = policy.select(0, q, seq.bounds, seq.table, lens)
            out, _ = sparse_decode_attention(q, seq.k, seq.v, seq.table, lens, sel.page_ids, 0.3)
            ref, _ = dense_decode_attention(q, seq.k, seq.v, seq.table, lens, 0.3)
            assert (out - ref).abs().max() <= 1e-5


def test_stable_heads_rerank_every_r_steps_and_keep_the_tail():
    seq = _Sequence(prompt=60)  # 15 full pages
    policy = _policy("flexicache", top_k=3, rerank_interval=4)
    history = []
    for _ in range(9):
        seq.append(1)
        sel = policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
        history.append(sel)
    assert [s.reranked[0].tolist() for s in history[:5]] == [
        [True, True, True],
        [True, False, False],
        [True, False, False],
        [True, False, False],
        [True, True, True],
    ]
    # between reranks a stable head attends to its last top-K plus pages written since
    first, later = history[0], history[3]
    stable_first = set(first.page_ids[0, 1].tolist()) - {-1}
    stable_later = set(later.page_ids[0, 1].tolist()) - {-1}
    assert stable_first <= stable_later and stable_later - stable_first <= {15}
    # unstable heads keep everything resident; stable heads only top-K plus tail
    assert later.resident[0, 0].item() == later.num_pages[0].item()
    assert later.resident[0, 1].item() == len(stable_later) <= 3 + 1
    # only pages not already resident are fetched at a rerank
    assert history[4].promoted[0, 0].item() == 0
    assert history[4].promoted[0, 1].item() <= 3


def test_quest_and_dense_keep_all_pages_resident():
    seq = _Sequence()
    for mode in ("dense", "quest"):
        policy = _policy(mode, top_k=2)
        seq.append(1)
        policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
        assert policy.stats.resident_fraction == 1.0


def test_flexicache_saves_memory_in_stats():
    seq = _Sequence(prompt=200, blocks=80)
    policy = _policy("flexicache", top_k=4, rerank_interval=16)
    for _ in range(32):
        seq.append(1)
        policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
    # 1 of 3 heads keeps ~51 pages, 2 keep ~4-6 of them
    assert 0.33 < policy.stats.resident_fraction < 0.42
    assert policy.stats.steps == 32


def test_flexicache_requires_a_matching_mask():
    with pytest.raises(ValueError, match="unstable-head mask"):
        SelectionPolicy("flexicache", num_layers=1, num_kv_heads=3)
    with pytest.raises(ValueError, match="shape"):
        SelectionPolicy(
            "flexicache", num_layers=2, num_kv_heads=3, unstable=torch.ones(1, 3).bool()
        )
    with pytest.raises(ValueError):
        SelectionPolicy("sparse", num_layers=1, num_kv_heads=3)
    with pytest.raises(ValueError, match="top_k"):
        _policy("quest", top_k=0)


def test_stable_heads_are_not_scored_between_reranks():
    seq = _Sequence(prompt=60)
    policy = _policy("flexicache", top_k=3, rerank_interval=4)
    tops = []
    for _ in range(5):
        seq.append(1)
        sel = policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
        tops.append(sel.top_k_ids[0])
    assert (tops[0] >= 0).all() and (tops[4] >= 0).all()  # rerank steps score every head
    for top in tops[1:4]:
        assert (top[0] >= 0).all() and (top[1:] == -1).all()  # only the unstable head 0


def test_a_layer_without_unstable_heads_works_between_reranks():
    seq = _Sequence(prompt=62)
    policy = SelectionPolicy(
        "flexicache",
        num_layers=1,
        num_kv_heads=3,
        page_size=4,
        top_k=3,
        rerank_interval=4,
        unstable=torch.zeros(1, 3, dtype=torch.bool),
    )
    for _ in range(3):
        seq.append(1)
        sel = policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
    # top-3 (with page 15, newest at the rerank) + page 16, opened since
    assert (sel.page_ids[0] >= 0).sum(-1).tolist() == [4, 4, 4]


def test_sink_and_window_pages_are_always_attended():
    seq = _Sequence(prompt=120, blocks=80)  # 30 pages
    for mode in ("quest", "flexicache"):
        policy = _policy(mode, top_k=5, rerank_interval=4, sink_pages=1, recent_pages=2)
        for _ in range(6):
            seq.append(1)
            sel = policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
            newest = int(sel.num_pages[0]) - 1
            for head in range(3):
                ids = set(sel.page_ids[0, head].tolist())
                assert {0, newest - 1, newest} <= ids, (mode, head, ids)
                assert len(ids - {-1}) <= 5 + (
                    0 if mode == "quest" else 2
                )  # + a stable head's tail


def test_dense_layers_attend_exactly_to_everything():
    seq = _Sequence(prompt=120, blocks=80)
    policy = SelectionPolicy(
        "quest", num_layers=2, num_kv_heads=3, page_size=4, top_k=3, dense_layers=1
    )
    seq.append(1)
    lens = torch.tensor([seq.length])
    q = seq.query()
    dense_sel = policy.select(0, q, seq.bounds, seq.table, lens)
    sparse_sel = policy.select(1, q, seq.bounds, seq.table, lens)
    out, _ = sparse_decode_attention(q, seq.k, seq.v, seq.table, lens, dense_sel.page_ids, 0.3)
    ref, _ = dense_decode_attention(q, seq.k, seq.v, seq.table, lens, 0.3)
    assert (out - ref).abs().max() <= 1e-5
    assert (sparse_sel.page_ids[0] >= 0).sum(-1).tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="dense_layers"):
        SelectionPolicy("quest", num_layers=2, num_kv_heads=3, dense_layers=3)


def test_unstable_dense_heads_see_every_page_without_more_residency():
    seq = _Sequence(prompt=120, blocks=80)
    spec = _policy("flexicache", top_k=4, rerank_interval=4)
    wide = _policy("flexicache", top_k=4, rerank_interval=4, unstable_dense=True)
    for step in range(6):
        seq.append(1)
        q, lens = seq.query(), torch.tensor([seq.length])
        a = spec.select(0, q, seq.bounds, seq.table, lens)
        b = wide.select(0, q, seq.bounds, seq.table, lens)
        pages = int(b.num_pages[0])
        assert b.page_ids[0, 0].tolist()[:pages] == list(range(pages))  # unstable head 0: all
        assert (a.page_ids[0, 0] >= 0).sum() == 4  # the spec's unstable head: top-K only
        assert torch.equal(
            a.page_ids[0, 1:, : b.page_ids.shape[-1]], b.page_ids[0, 1:, : a.page_ids.shape[-1]]
        )
        assert torch.equal(a.resident, b.resident)
        if step % 4:  # between reranks nothing is scored: unstable heads need no scores
            assert (b.top_k_ids == -1).all()
    assert spec.stats.resident_fraction == wide.stats.resident_fraction


def test_lagged_rerank_attends_with_the_previous_set_for_one_step():
    """rerank_lag: the reranking step attends as if it had not; the next step uses the new set."""
    runs = {}
    for lag in (False, True):
        seq = _Sequence(prompt=60, seed=3)
        policy = _policy("flexicache", top_k=3, rerank_interval=4, rerank_lag=lag)
        runs[lag] = []
        for _ in range(7):
            seq.append(1)
            runs[lag].append(
                policy.select(0, seq.query(), seq.bounds, seq.table, torch.tensor([seq.length]))
            )
    now, late = runs[False], runs[True]
    assert torch.equal(now[0].page_ids, late[0].page_ids)  # the first step selects at once
    stable = slice(1, 3)
    # step 4 reranks: the lagged policy still attends with step 3's set (plus the new page) ...
    before = [set(now[3].page_ids[0, h].tolist()) - {-1} for h in (1, 2)]
    lagged = [set(late[4].page_ids[0, h].tolist()) - {-1} for h in (1, 2)]
    newest = int(now[4].num_pages[0]) - 1
    assert all(b <= lg <= b | {newest} for b, lg in zip(before, lagged))
    assert not torch.equal(now[4].page_ids[0, stable], late[4].page_ids[0, stable])
    # ... holding both sets resident while the new one is fetched, then switches to it
    fresh = [set(now[4].page_ids[0, h].tolist()) - {-1} for h in (1, 2)]
    assert [late[4].resident[0, h].item() for h in (1, 2)] == [
        len(f | lg) for f, lg in zip(fresh, lagged)
    ]
    assert torch.equal(now[5].page_ids, late[5].page_ids)
    assert torch.equal(now[4].promoted, late[4].promoted)  # the same pages are fetched
    # unstable heads rerank every step, lag or not (rows are padded to the widest head)
    pages = lambda sel: set(sel.page_ids[0, 0].tolist()) - {-1}
    assert all(pages(a) == pages(b) for a, b in zip(now, late))
