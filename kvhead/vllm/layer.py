"""One attention layer under FlexiCache: where its KV goes on write, what it reads on attend.

Resident heads (the profile's unstable heads) live in vLLM's paged cache and attend to their
top-K pages every step with all pages kept. Stable heads live in the host arena (kvstore, keyed
by (layer, vLLM block id, head)); at decode they attend through the device hot pool, which holds
exactly the pages the policy selects (top-K at the last rerank plus the tail written since), so
only pages that were not resident are copied in. Prefill of stable heads reads the whole
sequence from the arena, as a GPU host would stage it. Selection follows
:class:`kvhead.core.policy.SelectionPolicy`'s flexicache rules (its int8-bounds form,
:class:`~tests.selection_oracle.CompactSelectionPolicy`, is the tests' oracle); the
per-step scoring, top-K, attention and writes run in the native kernels (:mod:`native`), and
this module keeps the rerank schedule and moves pages. Selections belong to requests (a row of
:class:`SelectionStore` per request slot, see :mod:`kvhead.vllm.request_state`), so a request
never attends with another's page choice, whatever blocks vLLM hands around.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from kvhead.core.online import OnlineStability
from kvhead.core.pages import page_mask
from kvhead.kernels.cpu import native
from kvhead.vllm.device_bounds import DeviceBounds
from kvhead.vllm.hot_pool import HotPool, HotPoolFullError
from kvhead.vllm.ops import one_thread, paged_attention, set_threads, write_cache
from kvhead.vllm.request_state import DecodeRows
from kvstore import PageKeys, PageStore

logger = logging.getLogger(__name__)

_ARENA_BATCH = 256  # stable-head tokens staged before one read-modify-write of the arena


@dataclass
class LayerStats:
    """Page traffic of one layer, summed over steps (what benchmarks and metrics report)."""

    promoted_pages: int = 0  # stable pages copied arena -> hot pool
    demoted_pages: int = 0  # stable pages dropped from the hot pool
    decode_steps: int = 0
    reranks: int = 0  # request rows whose stable heads picked a new top-K set
    # promoted pages per stable head (the layer's ``stable`` order)
    promoted_by_head: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    # (sequence, head) pages resident on the device / existing, summed over decode steps
    page_steps: torch.Tensor = field(default_factory=lambda: torch.zeros(2, dtype=torch.float64))


@dataclass(frozen=True)
class StableRanking:
    """How stable heads rank pages at a rerank (the flexicache+ options of
    :func:`kvhead.core.pages.score_pages` / :func:`~kvhead.core.pages.select_top_k`; the defaults
    are the spec's ranking); scored natively from the int8 boxes (``select_pages``, equal to
    :meth:`DeviceBounds.select`), 1 step in R."""

    budgets: torch.Tensor  # [Hkv] pages of each head's top-K set (only stable heads' are used)
    sink_pages: int = 0
    recent_pages: int = 1
    group_score: str = "max"
    bound_weight: float = 1.0


class SelectionStore:
    """Stable heads' top-K sets of one layer, one row per request slot
    (:class:`~kvhead.vllm.request_state.RequestStates`), with the epoch each row was ranked
    for: a row whose epoch differs from its request's was ranked for someone else."""

    def __init__(self, num_kv_heads: int, width: int) -> None:
        self.selected = torch.full((0, num_kv_heads, width), -1, dtype=torch.int64)
        self.anchor = torch.zeros(0, num_kv_heads, dtype=torch.int64)  # pages at the rerank
        self.epoch = torch.zeros(0, dtype=torch.int64)

    def gather(
        self, rows: DecodeRows
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of the rows' sets and anchors, which rows must rerank now, and which rows'
        sets are their own request's (the previous rerank online stability compares with)."""
        need = int(rows.slots.max()) + 1 if rows.slots.numel() else 0
        if need > self.epoch.shape[0]:  # slots are handed out densely: grow to the new one
            grow = need - self.epoch.shape[0]
            self.selected = torch.cat(
                [self.selected, self.selected.new_full((grow, *self.selected.shape[1:]), -1)]
            )
            self.anchor = torch.cat(
                [self.anchor, self.anchor.new_zeros(grow, self.anchor.shape[1])]
            )
            self.epoch = torch.cat([self.epoch, self.epoch.new_full((grow,), -1)])
        own = self.epoch[rows.slots] == rows.epochs
        return self.selected[rows.slots], self.anchor[rows.slots], rows.due | ~own, own

    def put(
        self, rows: DecodeRows, which: torch.Tensor, selected: torch.Tensor, anchor: torch.Tensor
    ) -> None:
        """Keep the new sets of rows ``which`` (a mask over ``rows``)."""
        slots = rows.slots[which]
        self.selected[slots] = selected[which]
        self.anchor[slots] = anchor[which]
        self.epoch[slots] = rows.epochs[which]


class FlexiLayer:
    """State and data movement of one decoder layer."""

    def __init__(
        self,
        layer: int,
        resident: torch.Tensor,
        stable: torch.Tensor,
        *,
        num_kv_heads: int,
        group: int,
        num_blocks: int,
        page_size: int,
        head_dim: int,
        dtype: torch.dtype,
        prefill_isa: str,
        arena: PageStore,
        pool_pages: int,
        open_pages: int,
        top_k: int,
        resident_dense: bool = False,
        kernel_threads: int | None = None,
        ranking: StableRanking,
        prefill_block: int | None = None,
        summaries: bool = False,
        online: OnlineStability | None = None,
    ) -> None:
        self.layer, self.page_size, self.group = layer, page_size, group
        self.resident, self.stable = resident.long(), stable.long()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.top_k = top_k
        # Prefill runs vLLM's kernel on a scratch cache of ``prefill_block``-token blocks (stock's
        # 32 for AMX) with the matching ISA. Decode never hands vLLM's cache to vLLM's kernels:
        # the native kernels write and read it (and the hot pool) in their own layout.
        self.prefill_isa, self.prefill_block = prefill_isa, prefill_block or page_size
        self.resident_dense = resident_dense  # resident heads attend to all pages, unscored
        self.ranking = ranking
        # width of a stable head's top-K row: its largest budget
        self.set_width = int(self.ranking.budgets[stable].max()) if len(stable) else top_k
        self.res_index = torch.full((num_kv_heads,), -1, dtype=torch.int64)
        self.res_index[self.resident] = torch.arange(len(resident))
        self.stable_index = torch.full((num_kv_heads,), -1, dtype=torch.int64)
        self.stable_index[self.stable] = torch.arange(len(stable))
        self.bounds = DeviceBounds(num_blocks, num_kv_heads, head_dim, open_pages)
        self.pool = HotPool(pool_pages, num_blocks, len(stable), page_size, head_dim, dtype)
        # summary tokens (kvhead.core.summaries): per-page mean values of the stable heads, which
        # are the only heads that skip pages ([blocks, stable heads, D] in the cache's dtype, kept
        # by the native writer); empty when off (the native decode's switch)
        means_shape = (
            (num_blocks, len(stable), head_dim) if summaries and len(stable) else (0, 0, 0)
        )
        self.value_means = torch.zeros(means_shape, dtype=dtype)
        self.arena = arena
        self.kernel_threads = kernel_threads  # decode threads (None: torch's, i.e. vLLM's)
        self.stats = LayerStats(promoted_by_head=torch.zeros(len(stable), dtype=torch.long))
        # online RCO of the stable heads from their reranks (and the drift guard)
        self.online = online or OnlineStability(torch.full((len(stable),), torch.nan).double())
        self.selections = SelectionStore(num_kv_heads, self.set_width)
        self._native = native.kernels()
        # Stable-head tokens not yet in the arena: (key, value, flat slot) per write. The arena
        # stores whole pages, so every write is a read-modify-write of its pages; staging turns
        # one per step into one per _ARENA_BATCH tokens. Decode reads the newest pages from the
        # hot pool (written at once), and every arena read flushes first.
        self._staged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._staged_slots: set[int] = set()

    # -- writes ------------------------------------------------------------------------------
    def write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        slots: torch.Tensor,
        cache: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Store new tokens ``[T, Hkv, D]`` at vLLM slots: resident heads to vLLM's cache,
        stable heads to the arena and to their hot-pool page where it has one (``keep``: every
        block this step's rows read or write, whose pool pages must stay).

        A stable page that opens here and is still open afterwards (a decode token, or the
        partial last page of a prefill chunk) is its sequence's newest page, which is always
        attended, so it gets its pool slot now. Slot bookkeeping runs on Python ints: decode
        writes a handful of tokens, and even an 8k prefill chunk is a few milliseconds of it,
        while tiny tensor ops each pay an OpenMP fork/join.
        """
        key, value = key[: slots.numel()], value[: slots.numel()]
        listed = slots.tolist()
        if min(listed, default=-1) < 0:  # vLLM pads with -1
            keep = slots >= 0
            key, value, listed = key[keep], value[keep], [s for s in listed if s >= 0]
            if not listed:
                return
        with one_thread():
            self._write(key.contiguous(), value.contiguous(), listed, cache, keep)

    def _write(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        listed: list[int],
        cache: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        page, num_stable = self.page_size, len(self.stable)
        slots = torch.tensor(listed, dtype=torch.int64)
        b = self.bounds
        b.clock += 1
        self._native.update_bounds(
            key,
            slots,
            page,
            b.box,
            b.scale,
            b.open_min,
            b.open_max,
            b.open_tag,
            b.open_used,
            b.clock,
        )
        opened = {s // page for s in listed if s % page == 0}
        if num_stable and opened:  # a reused block: its old pages are stale
            self.pool.release_blocks(torch.tensor(sorted(opened), dtype=torch.int64))
            newest = sorted(opened - {s // page for s in listed if s % page == page - 1})
            if newest:
                blocks = torch.tensor(newest, dtype=torch.int64)
                self._allocate(
                    blocks.repeat_interleave(num_stable),
                    torch.arange(num_stable).repeat(len(newest)),
                    keep,
                )
        self._native.write_tokens(
            key,
            value,
            slots,
            cache,
            self.res_index,
            self.pool.pages,
            self.pool.slot_of,
            self.stable_index,
            self.value_means,
        )
        if num_stable:
            self._stage_arena(key[:, self.stable], value[:, self.stable], slots, listed)

    def _stage_arena(
        self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, listed: list[int]
    ) -> None:
        """Queue stable-head tokens for the arena (``listed``: ``slots`` as ints); a slot
        written twice flushes the first write (writes to distinct slots commute, so only a
        rewrite needs the order kept)."""
        if not self._staged_slots.isdisjoint(listed):
            self.flush_arena()
        self._staged.append((key, value, slots))
        self._staged_slots.update(listed)
        if len(self._staged_slots) >= _ARENA_BATCH:
            self.flush_arena()

    def _flush_arena_for(self, blocks: torch.Tensor) -> None:
        """Flush staged tokens before the arena is read for ``blocks``, only if some of them are
        staged: a rerank promotes old pages, while staged tokens belong to the newest, so most
        reranks read without cutting the staging batch short (each flush is a read-modify-write
        of every page it touches)."""
        page = self.page_size
        if self._staged and not {s // page for s in self._staged_slots}.isdisjoint(blocks.tolist()):
            self.flush_arena()

    def flush_arena(self) -> None:
        """Write every staged token to the arena (before anything reads it)."""
        if not self._staged:
            return
        key, value, slots = (torch.cat(parts) for parts in zip(*self._staged, strict=True))
        self._staged, self._staged_slots = [], set()
        self._write_arena(key, value, slots // self.page_size, slots % self.page_size)

    def _write_arena(
        self,
        key: torch.Tensor,
        value: torch.Tensor,
        blocks: torch.Tensor,
        offsets: torch.Tensor,
    ) -> None:
        """Read-modify-write the touched pages: the arena stores whole pages."""
        num_stable = len(self.stable)
        uniq, inverse = torch.unique(blocks, return_inverse=True)
        keys = self._keys(uniq)
        old = self.arena.get(keys)
        shape = (len(uniq), num_stable, self.page_size, self.head_dim)
        k, v = old.k.view(shape), old.v.view(shape)  # get() returned a fresh copy: edit in place
        k[inverse, :, offsets] = key.to(k.dtype)
        v[inverse, :, offsets] = value.to(v.dtype)
        stored = self.arena.put(keys, k.flatten(0, 1), v.flatten(0, 1))
        if not bool(stored.all()):
            raise RuntimeError(f"kvhead: host arena refused {int((~stored).sum())} pages")

    def _keys(self, blocks: torch.Tensor) -> PageKeys:
        """Arena keys of every stable head of ``blocks``, block-major."""
        num_stable = len(self.stable)
        return PageKeys(
            self.layer, blocks.repeat_interleave(num_stable), self.stable.repeat(len(blocks))
        )

    # -- attention ---------------------------------------------------------------------------
    def prefill(
        self,
        query: torch.Tensor,
        out: torch.Tensor,
        tokens: list[torch.Tensor],
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        cache: torch.Tensor,
        scale: float,
    ) -> None:
        """Dense causal attention for prefill rows; ``tokens[r]`` are row r's token indices.

        Every head of each row's whole sequence so far (resident heads from vLLM's cache,
        stable ones from the arena) is staged into a scratch cache of ``prefill_block``-token
        blocks, and one call of vLLM's kernel attends all query heads, as stock vLLM does: with
        32-token blocks that is its AMX kernel on CPUs that have it, several times faster than
        16-token blocks. Staging reads O(sequence) bytes per chunk; the attention is
        O(sequence x chunk) work.
        """
        page, block = self.page_size, self.prefill_block
        num_pages = ((seq_lens + page - 1) // page).tolist()
        blocks = torch.cat([block_table[r, :n].long() for r, n in enumerate(num_pages)])
        k, v = self.stage_pages(blocks, cache)  # [N, P, Hkv, D]
        # Row r's tokens start at a scratch block boundary: block_base[r] * block.
        row_blocks = [(n * page + block - 1) // block for n in num_pages]
        base = [0]
        for count in row_blocks:
            base.append(base[-1] + count)
        slots = torch.cat(
            [base[r] * block + torch.arange(n * page) for r, n in enumerate(num_pages)]
        )
        scratch = torch.empty(
            base[-1], self.num_kv_heads, block, 2 * self.head_dim, dtype=cache.dtype
        )
        # A row's last block is only partly written; vLLM's kernel multiplies its masked tail
        # by zero weights, so it must hold finite values (0 x NaN garbage is NaN).
        scratch[torch.tensor(base[1:]) - 1] = 0
        write_cache(scratch, k.flatten(0, 1), v.flatten(0, 1), slots, self.prefill_isa)
        width = max(row_blocks)
        table = torch.zeros(len(tokens), width, dtype=torch.int32)
        for r, count in enumerate(row_blocks):
            table[r, :count] = torch.arange(base[r], base[r] + count)
        starts = torch.zeros(len(tokens) + 1, dtype=torch.int64)
        starts[1:] = torch.tensor([len(t) for t in tokens]).cumsum(0)
        all_tokens = torch.cat(tokens)
        q = query[all_tokens].reshape(len(all_tokens), -1, self.head_dim).contiguous()
        o = torch.empty_like(q)
        paged_attention(q, scratch, o, starts, seq_lens, table, scale, self.prefill_isa)
        out[all_tokens] = o.view(len(all_tokens), *out.shape[1:])

    def stage_pages(
        self,
        blocks: torch.Tensor,
        cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``[N, P, Hkv, D]`` of every head of ``blocks``."""
        n, page, dim = len(blocks), self.page_size, self.head_dim
        k = torch.empty(n, page, self.num_kv_heads, dim, dtype=cache.dtype)
        v = torch.empty_like(k)
        if len(self.resident):  # vLLM's layout: keys [D][P] then values [P][D] per block, head
            held = cache[blocks].view(n, len(self.resident), 2, page * dim)
            k[:, :, self.resident] = held[:, :, 0].view(n, -1, dim, page).permute(0, 3, 1, 2)
            v[:, :, self.resident] = held[:, :, 1].view(n, -1, page, dim).transpose(1, 2)
        if len(self.stable):
            self.flush_arena()
            got = self.arena.get(self._keys(blocks))
            shape = (n, len(self.stable), page, dim)
            k[:, :, self.stable] = got.k.view(shape).transpose(1, 2).to(k.dtype)
            v[:, :, self.stable] = got.v.view(shape).transpose(1, 2).to(v.dtype)
        return k, v

    def decode(
        self,
        query: torch.Tensor,
        out: torch.Tensor,
        rows_token: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        cache: torch.Tensor,
        scale: float,
        rows: DecodeRows,
        keep: torch.Tensor,
    ) -> None:
        """One decode step for rows whose single query token is ``rows_token[r]``.

        ``block_table`` is int32 ``[B, W]``, ``seq_lens`` int64 ``[B]`` (contiguous); ``rows``
        says whose each row is, ``keep`` every block this step's rows read or write. Resident
        heads pick their top-K every step inside the native call; stable heads rerank every R
        steps of their request here (scored natively, then pages move in the hot pool) and
        otherwise attend to their request's last top-K plus its tail.
        """
        with one_thread() as threads:
            batch = seq_lens.shape[0]
            every = batch == query.shape[0]  # a pure decode batch: rows are tokens 0..B-1
            q = (query if every else query[rows_token]).reshape(batch, -1, self.head_dim)
            q = q.contiguous()
            selected, anchor, due, own = self.selections.gather(rows)
            if len(self.stable) and bool(due.any()):
                self._rerank(q, seq_lens, block_table, selected, anchor, due & own, due, keep)
                self.selections.put(rows, due, selected, anchor)
            direct = every and out.is_contiguous()
            o = out.view(batch, -1, self.head_dim) if direct else torch.empty_like(q)
            set_threads(self.kernel_threads or threads)
            lost = self._decode_step(q, o, cache, block_table, seq_lens, selected, anchor, scale)
            if lost:  # pages left the pool under pressure: copy them back in, attend again
                self._recover(lost, rows, block_table, seq_lens, selected, anchor, keep)
                lost = self._decode_step(
                    q, o, cache, block_table, seq_lens, selected, anchor, scale
                )
                if lost:
                    raise RuntimeError(
                        f"kvhead: layer {self.layer}: {lost} attended stable pages of requests "
                        f"{', '.join(rows.req_ids)} are not in the hot pool after recovery"
                    )
            set_threads(1)
            if not direct:
                out[rows_token] = o.view(batch, *out.shape[1:])
            self.stats.decode_steps += 1

    def _decode_step(
        self,
        q: torch.Tensor,
        o: torch.Tensor,
        cache: torch.Tensor,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        selected: torch.Tensor,
        anchor: torch.Tensor,
        scale: float,
    ) -> int:
        """The native decode of every row and head; returns how many attended stable pages were
        not in the pool (those rows' outputs are not written then)."""
        b = self.bounds
        return self._native.decode_step(
            q,
            o,
            cache,
            self.res_index,
            self.pool.pages,
            self.pool.slot_of,
            self.stable_index,
            block_table,
            seq_lens,
            b.box,
            b.scale,
            selected,
            anchor,
            self.top_k,
            self.resident_dense,
            scale,
            self.stats.page_steps,
            self.value_means,
        )

    def _recover(
        self,
        lost: int,
        rows: DecodeRows,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        selected: torch.Tensor,
        anchor: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Copy every attended stable page that is not in the pool back in from the arena, and
        say whose they were."""
        num_pages = (seq_lens + self.page_size - 1) // self.page_size
        short = self._make_resident(selected, anchor, block_table, num_pages, keep)
        logger.warning(
            "kvhead: layer %d: %d attended stable pages of requests %s were not in "
            "the hot pool; copied them in from the host arena",
            self.layer,
            lost,
            ", ".join(rows.req_ids[i] for i in short.tolist()),
        )

    def _rerank(
        self,
        q: torch.Tensor,
        seq_lens: torch.Tensor,
        block_table: torch.Tensor,
        selected: torch.Tensor,
        anchor: torch.Tensor,
        again: torch.Tensor,
        due: torch.Tensor,
        keep: torch.Tensor,
    ) -> None:
        """Stable heads of rows ``due`` pick a new top-K (in place in ``selected``/``anchor``);
        the pool drops their pages no longer attended and copies in only the new ones (their
        tail is just the newest page, part of the new top-K). Rows ``again`` (their request's
        previous set is at hand) feed online stability."""
        whole = bool(due.all())
        idx = None if whole else due.nonzero().flatten()
        pick = (lambda t: t) if whole else (lambda t: t[idx].contiguous())
        q, seq_lens, block_table = pick(q), pick(seq_lens), pick(block_table)
        sel, anc, again = pick(selected), pick(anchor), pick(again)
        previous = sel[again][:, self.stable] if bool(again.any()) else None
        num_pages = (seq_lens + self.page_size - 1) // self.page_size
        b, r = self.bounds, self.ranking
        self._native.select_pages(
            q,
            b.box,
            b.scale,
            block_table,
            num_pages,
            self.stable,
            r.budgets,
            r.sink_pages,
            r.recent_pages,
            r.group_score == "softmax",
            r.bound_weight,
            sel,
        )
        anc[:, self.stable] = num_pages.view(-1, 1)
        self.stats.reranks += sel.shape[0]
        if previous is not None:
            self._observe(previous, sel[again][:, self.stable], num_pages[again])
        if not whole:
            selected[idx], anchor[idx] = sel, anc
        self._make_resident(sel, anc, block_table, num_pages, keep)

    def _observe(
        self, previous: torch.Tensor, current: torch.Tensor, num_pages: torch.Tensor
    ) -> None:
        """Online RCO between consecutive reranks; a newly drifted head is logged once."""
        drifted = self.online.observe(
            previous, current, num_pages, self.ranking.budgets[self.stable]
        )
        for i in drifted.nonzero().flatten().tolist():
            logger.warning(
                "kvhead: layer %d head %d drifted: online RCO %.2f, profile expects %.2f",
                self.layer,
                int(self.stable[i]),
                float(self.online.ema[i]),
                float(self.online.expected[i]),
            )

    def _attended(
        self, selected: torch.Tensor, anchor: torch.Tensor, num_pages: torch.Tensor, width: int
    ) -> torch.Tensor:
        """Pages ``[B, S, width]`` the native decode attends for each stable head: its set's
        pages before the tail, then every page from the one partial at the rerank."""
        ids = selected[:, self.stable]
        start = (anchor[:, self.stable] - 1).clamp_min(0).unsqueeze(-1)  # [B, S, 1]
        pages = torch.arange(width)
        chosen = page_mask(ids.masked_fill(ids >= start, -1), width)
        return (chosen | (pages >= start)) & (pages < num_pages.view(-1, 1, 1))

    def _make_resident(
        self,
        selected: torch.Tensor,
        anchor: torch.Tensor,
        block_table: torch.Tensor,
        num_pages: torch.Tensor,
        keep: torch.Tensor,
    ) -> torch.Tensor:
        """Make the hot pool hold exactly the pages these rows' stable heads attend (and no
        other page of their sequences): drop the others, copy in only the missing ones.
        Returns the rows that missed a page."""
        width = int(num_pages.max())
        wanted = self._attended(selected, anchor, num_pages, width)  # [B, S, width]
        table = block_table[:, :width].long().clamp_min(0)
        held = self.pool.slot_of[table].permute(0, 2, 1)  # [B, S, width]
        owned = torch.arange(width).view(1, 1, -1) < num_pages.view(-1, 1, 1)
        drop = (held >= 0) & owned & ~wanted
        self.pool.release(held[drop])
        self.stats.demoted_pages += int(drop.sum())

        missing = wanted & (held < 0)
        if bool(missing.any()):
            rows, heads, pages = missing.nonzero(as_tuple=True)
            need_blocks = table[rows, pages]
            fresh = self._allocate(need_blocks, heads, keep)
            self._flush_arena_for(need_blocks)
            got = self.arena.get(PageKeys(self.layer, need_blocks, self.stable[heads]))
            pool = self.pool.pages.view(self.pool.capacity, 2, -1)  # keys [D][P], values [P][D]
            pool[fresh, 0] = got.k.transpose(1, 2).reshape(len(fresh), -1).to(pool.dtype)
            pool[fresh, 1] = got.v.reshape(len(fresh), -1).to(pool.dtype)
            self.stats.promoted_pages += len(fresh)
            self.stats.promoted_by_head += torch.bincount(heads, minlength=len(self.stable))
        return missing.flatten(1).any(1).nonzero().flatten()

    def _allocate(
        self, blocks: torch.Tensor, heads: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """Pool slots for pages ``(blocks[i], heads[i])``; when the pool is full, pages of blocks
        this step does not touch (requests waiting or preempted) make room first: they come back
        from the arena when their request runs again."""
        try:
            return self.pool.allocate(blocks, heads)
        except HotPoolFullError:
            freed = self.pool.release_unreferenced(keep)
            logger.info(
                "kvhead: layer %d: hot pool full, released %d pages of idle requests",
                self.layer,
                freed,
            )
            return self.pool.allocate(blocks, heads)
