"""FlexiCache layer data movement against the torch reference attention (no vLLM engine)."""

from __future__ import annotations

import pytest
import torch
from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

from kvhead.core.attention import dense_decode_attention, sparse_decode_attention
from kvhead.core.pages import PageBounds
from kvhead.core.policy import Mode
from kvhead.core.spec import HeadPageSpec
from kvhead.core.summaries import PageValueSums, compensate
from kvhead.vllm.hot_pool import HotPool, HotPoolFullError
from kvhead.vllm.layer import FlexiLayer, StableRanking
from kvhead.vllm.request_state import DecodeRows
from kvstore import HostArena, HostArenaConfig
from tests.selection_oracle import CompactSelectionPolicy

P, D, HKV, G, NB = 16, 32, 3, 2, 64
RESIDENT, STABLE = torch.tensor([1]), torch.tensor([0, 2])
SCALE = D**-0.5
ALL_BLOCKS = torch.arange(NB)  # what a step keeps in the pool: the tests use every block


class Setup:
    """One layer, two sequences, a reference cache holding every head in kvhead's layout."""

    def __init__(
        self,
        top_k: int,
        seq_lens: list[int],
        seed: int = 0,
        prefill_block: int | None = None,
        ranking: StableRanking | None = None,
        summaries: bool = False,
    ) -> None:
        torch.manual_seed(seed)
        spec = HeadPageSpec(HKV * G, HKV, D, P, torch.float32)
        arena = HostArena(
            spec, HostArenaConfig(capacity_pages=NB * HKV, num_layers=1, num_blocks=NB)
        )
        self.layer = FlexiLayer(
            0,
            RESIDENT,
            STABLE,
            num_kv_heads=HKV,
            group=G,
            num_blocks=NB,
            page_size=P,
            head_dim=D,
            dtype=torch.float32,
            arena=arena,
            pool_pages=NB * len(STABLE),
            open_pages=8,
            top_k=top_k,
            prefill_block=prefill_block,
            resident_dense=ranking is not None,
            ranking=ranking or StableRanking(budgets=torch.full((HKV,), top_k)),
            summaries=summaries,
            prefill_isa=_get_attn_isa(torch.float32, prefill_block or P, D),
        )
        self.cache = torch.zeros(NB, len(RESIDENT), P, 2 * D)
        self.k_ref = torch.zeros(NB, P, HKV, D)
        self.v_ref = torch.zeros(NB, P, HKV, D)
        self.seq_lens = torch.tensor(seq_lens)
        self.steps = 0
        width = 12
        perm = torch.randperm(NB)
        self.table = perm[: 2 * width].view(2, width).int()
        for b, n in enumerate(seq_lens):
            self.append(b, torch.arange(n))
        policy_args = {
            "mode": Mode.flexicache,
            "num_layers": 1,
            "num_kv_heads": HKV,
            "page_size": P,
            "top_k": top_k,
            "rerank_interval": 4,
            "unstable": torch.tensor([[False, True, False]]),
        }
        if ranking is not None:  # flexicache+: the same options, unstable heads dense
            policy_args |= {
                "unstable_dense": True,
                "head_top_k": ranking.budgets.view(1, -1),
                "sink_pages": ranking.sink_pages,
                "recent_pages": ranking.recent_pages,
                "group_score": ranking.group_score,
                "bound_weight": ranking.bound_weight,
                "compensate": summaries,
            }
        self.oracle = CompactSelectionPolicy(**policy_args)

    def append(self, b: int, positions: torch.Tensor) -> None:
        slots = self.table[b, positions // P].long() * P + positions % P
        k, v = torch.randn(len(positions), HKV, D), torch.randn(len(positions), HKV, D)
        self.layer.write(k, v, slots, self.cache, ALL_BLOCKS)
        self.k_ref.view(-1, HKV, D)[slots] = k
        self.v_ref.view(-1, HKV, D)[slots] = v

    def decode(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One lock-step decode step: (FlexiCache output, reference output, query)."""
        for b in range(2):
            self.append(b, self.seq_lens[b : b + 1])
        self.seq_lens = self.seq_lens + 1
        q = torch.randn(2, HKV * G, D)
        out = torch.zeros_like(q)
        rows = DecodeRows.lock_step(2, self.steps, rerank_interval=4)
        self.layer.decode(
            q, out, torch.arange(2), self.seq_lens, self.table, self.cache, SCALE, rows, ALL_BLOCKS
        )
        self.steps += 1
        sel = self.oracle.select(0, q, self.layer.bounds, self.table, self.seq_lens)
        ref, lse = sparse_decode_attention(
            q, self.k_ref, self.v_ref, self.table, self.seq_lens, sel.page_ids, SCALE
        )
        if sel.compensate:  # summary tokens from the same int8 boxes and the values' page sums
            kmax, kmin = self.layer.bounds.boxes(torch.arange(NB))
            ref = compensate(
                ref,
                lse,
                q,
                PageBounds(kmin=kmin, kmax=kmax),
                PageValueSums(self.v_ref.sum(1)),
                self.table,
                self.seq_lens,
                sel.page_ids,
                P,
                SCALE,
            )
        return out, ref, q


def test_all_pages_selected_equals_dense_attention() -> None:
    setup = Setup(top_k=1000, seq_lens=[70, 33])
    for _ in range(5):
        out, _, q = setup.decode()
        dense, _ = dense_decode_attention(
            q, setup.k_ref, setup.v_ref, setup.table, setup.seq_lens, SCALE
        )
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_sparse_decode_matches_reference_over_reranks() -> None:
    setup = Setup(top_k=2, seq_lens=[150, 97])
    for _ in range(9):  # crosses two rerank windows (R=4) and a page boundary
        out, ref, _ = setup.decode()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    stats = setup.layer.stats
    assert stats.promoted_pages > 0 and stats.demoted_pages > 0
    # the pool holds exactly what stable heads attend to: at most K + tail pages per head
    assert setup.layer.pool.in_use <= 2 * len(STABLE) * (2 + 2)


def test_pages_evicted_from_the_pool_come_back_from_the_arena(caplog) -> None:
    """Between reranks the pool loses every page (as when it makes room for other requests):
    the next step copies the attended pages back from the arena, says whose they were, and
    decodes exactly as before."""
    setup = Setup(top_k=2, seq_lens=[150, 97])
    for _ in range(2):
        setup.decode()
    setup.layer.pool.release_unreferenced(torch.zeros(0, dtype=torch.int64))
    assert setup.layer.pool.in_use == 0
    with caplog.at_level("WARNING", logger="kvhead.vllm.layer"):
        out, ref, _ = setup.decode()  # step 2 of R = 4: no rerank would bring them back
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert "requests row0, row1 were not in the hot pool" in caplog.text


@pytest.mark.parametrize("summaries", [False, True])
def test_flexicache_plus_options_decode_as_the_reference_policy(summaries: bool) -> None:
    """Sink and window pages, softmax group scores, bound weight 0.5 and per-head budgets (3 and
    5 pages for the two stable heads), with and without summary tokens for skipped pages:
    outputs equal the reference policy's over reranks (summaries as kvhead.core.summaries computes
    them), and the pool holds each head's own budget plus its tail."""
    ranking = StableRanking(
        budgets=torch.tensor([3, 64, 5]),
        sink_pages=1,
        recent_pages=2,
        group_score="softmax",
        bound_weight=0.5,
    )
    setup = Setup(top_k=4, seq_lens=[150, 97], ranking=ranking, summaries=summaries)
    for _ in range(9):
        out, ref, _ = setup.decode()
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert setup.layer.selections.selected.shape[2] == 5  # the stable heads' largest budget
    assert setup.layer.stats.promoted_pages > 0
    assert setup.layer.pool.in_use <= 2 * ((3 + 2) + (5 + 2))


@pytest.mark.parametrize("prefill_block", [None, 32])
def test_prefill_matches_causal_reference(
    prefill_block: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Prefill on a scratch cache of the page size and of stock's 32-token blocks.

    Fresh allocations are poisoned with NaN: the unwritten tail of a row's last scratch block
    once held NaN garbage now and then, which vLLM's kernel turned into NaN outputs.
    """
    setup = Setup(top_k=2, seq_lens=[40, 21], prefill_block=prefill_block)
    empty = torch.empty

    def poisoned(*shape, **kwargs) -> torch.Tensor:
        got = empty(*shape, **kwargs)
        return got.fill_(float("nan")) if got.is_floating_point() else got

    monkeypatch.setattr(torch, "empty", poisoned)
    q = torch.randn(61, HKV * G, D)
    out = torch.zeros_like(q)
    tokens = [torch.arange(0, 40), torch.arange(40, 61)]
    setup.layer.prefill(q, out, tokens, setup.seq_lens, setup.table, setup.cache, SCALE)
    for b, tok in enumerate(tokens):
        n = len(tok)
        pos = torch.arange(n)
        keys = setup.k_ref.view(-1, HKV, D)[setup.table[b, pos // P].long() * P + pos % P]
        vals = setup.v_ref.view(-1, HKV, D)[setup.table[b, pos // P].long() * P + pos % P]
        keys = keys.repeat_interleave(G, dim=1)  # [n, Hq, D]
        vals = vals.repeat_interleave(G, dim=1)
        logits = torch.einsum("thd,shd->hts", q[tok], keys) * SCALE
        logits = logits.masked_fill(pos.view(1, 1, -1) > pos.view(1, -1, 1), float("-inf"))
        ref = torch.einsum("hts,shd->thd", logits.softmax(-1), vals)
        torch.testing.assert_close(out[tok], ref, atol=1e-5, rtol=1e-5)


def test_reused_block_drops_stale_pool_pages() -> None:
    pool = HotPool(4, num_blocks=8, num_stable=2, page_size=P, head_dim=D, dtype=torch.float32)
    slots = pool.allocate(torch.tensor([3, 3, 5]), torch.tensor([0, 1, 0]))
    assert pool.slot_of[3].tolist() == slots[:2].tolist() and pool.in_use == 3
    pool.release_blocks(torch.tensor([3]))
    assert pool.slot_of[3].tolist() == [-1, -1] and pool.in_use == 1
    assert pool.release_unreferenced(torch.tensor([1, 2])) == 1 and pool.in_use == 0
    pool.allocate(torch.tensor([0, 1, 2, 4]), torch.tensor([0, 0, 0, 0]))
    with pytest.raises(HotPoolFullError, match="hot_pool_pages"):
        pool.allocate(torch.tensor([6]), torch.tensor([1]))
