"""One attention layer under FlexiCache: where its KV goes on write, what it reads on attend.

Resident heads (the profile's unstable heads) live in vLLM's paged cache and attend to their
top-K pages every step with all pages kept. Stable heads live in the host arena (kvstore, keyed
by (layer, vLLM block id, head)); at decode they attend through the device hot pool, which holds
exactly the pages the policy selects (top-K at the last rerank plus the tail written since), so
only pages that were not resident are copied in. Prefill of stable heads reads the whole
sequence from the arena, as a GPU host would stage it. Page selection is
:class:`kvhead.policy.SelectionPolicy`; this module only moves pages and runs kernels.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvhead.pages import page_mask
from kvhead.policy import SelectionPolicy
from kvhead.vllm_plugin.bounds import DeviceBounds
from kvhead.vllm_plugin.hot_pool import HotPool
from kvhead.vllm_plugin.kernels import one_thread, paged_attention, single_head_view, write_cache
from kvstore import PageKeys, PageStore

_THREADED_WRITE = 512  # tokens per write from which OpenMP threads pay off (prefill chunks)
_ARENA_BATCH = 256  # stable-head tokens staged before one read-modify-write of the arena


@dataclass
class LayerStats:
    """Page traffic of one layer, summed over steps (what benchmarks and metrics report)."""

    promoted_pages: int = 0  # stable pages copied arena -> hot pool
    demoted_pages: int = 0  # stable pages dropped from the hot pool
    decode_steps: int = 0
    attended_pages: dict[str, int] = field(default_factory=lambda: {"resident": 0, "stable": 0})


class FlexiLayer:
    """State and data movement of one decoder layer."""

    def __init__(
        self, layer: int, resident: torch.Tensor, stable: torch.Tensor, *, num_kv_heads: int,
        group: int, num_blocks: int, page_size: int, head_dim: int, dtype: torch.dtype,
        isa: str, arena: PageStore, pool_pages: int, open_pages: int,
        kernel_threads: int | None = 1,
    ) -> None:
        self.layer, self.isa, self.page_size, self.group = layer, isa, page_size, group
        self.resident, self.stable = resident.long(), stable.long()
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.bounds = DeviceBounds(num_blocks, num_kv_heads, head_dim, open_pages)
        self.pool = HotPool(pool_pages, num_blocks, len(stable), page_size, head_dim, dtype)
        self.arena = arena
        self.kernel_threads = kernel_threads  # decode attention threads (None: the caller's)
        self.stats = LayerStats()
        # Stable-head tokens not yet in the arena: (key, value, flat slot) per write. The arena
        # stores whole pages, so every write is a read-modify-write of its pages; staging turns
        # one per step into one per _ARENA_BATCH tokens. Decode reads the newest pages from the
        # hot pool (written at once), and every arena read flushes first.
        self._staged: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self._staged_tokens = 0

    # -- writes ------------------------------------------------------------------------------
    def write(
        self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor,
    ) -> None:
        """Store new tokens ``[T, Hkv, D]`` at vLLM slots: resident heads to vLLM's cache,
        stable heads to the arena (and to the hot pool where their page is resident)."""
        if slots.numel() > _THREADED_WRITE:  # prefill: big copies, let them use the threads
            self._write(key, value, slots, cache)
            return
        with one_thread():
            self._write(key, value, slots, cache)

    def _write(
        self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor, cache: torch.Tensor,
    ) -> None:
        key, value = key[: slots.numel()], value[: slots.numel()]
        keep = slots >= 0
        key, value, slots = key[keep], value[keep], slots[keep].long()
        if not slots.numel():
            return
        if len(self.resident):
            write_cache(cache, key[:, self.resident].contiguous(),
                        value[:, self.resident].contiguous(), slots, self.isa)
        self.bounds.update(key, slots, self.page_size)
        if not len(self.stable):
            return
        blocks, offsets = slots // self.page_size, slots % self.page_size
        self.pool.release_blocks(blocks[offsets == 0])  # a reused block: old pages are stale
        self._stage_arena(key[:, self.stable], value[:, self.stable], slots)
        self._write_pool(key[:, self.stable], value[:, self.stable], blocks, offsets)

    def _stage_arena(self, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor) -> None:
        """Queue stable-head tokens for the arena; a slot written twice flushes the first write
        (writes to distinct slots commute, so only a rewrite needs the order kept)."""
        if self._staged:
            pending = torch.cat([staged for _, _, staged in self._staged])
            if bool(torch.isin(slots, pending).any()):
                self.flush_arena()
        self._staged.append((key, value, slots))
        self._staged_tokens += slots.numel()
        if self._staged_tokens >= _ARENA_BATCH:
            self.flush_arena()

    def flush_arena(self) -> None:
        """Write every staged token to the arena (before anything reads it)."""
        if not self._staged:
            return
        key, value, slots = (torch.cat(parts) for parts in zip(*self._staged, strict=True))
        self._staged, self._staged_tokens = [], 0
        self._write_arena(key, value, slots // self.page_size, slots % self.page_size)

    def _write_arena(
        self, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
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

    def _write_pool(
        self, key: torch.Tensor, value: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
    ) -> None:
        slots = self.pool.slot_of[blocks]  # [T, S]
        hit = slots >= 0
        if not bool(hit.any()):
            return
        flat = slots[hit] * self.page_size + offsets.view(-1, 1).expand_as(slots)[hit]
        write_cache(self.pool.pages, key[hit].unsqueeze(1).contiguous(),
                    value[hit].unsqueeze(1).contiguous(), flat, self.isa)

    def _keys(self, blocks: torch.Tensor) -> PageKeys:
        """Arena keys of every stable head of ``blocks``, block-major."""
        num_stable = len(self.stable)
        return PageKeys(self.layer, blocks.repeat_interleave(num_stable),
                        self.stable.repeat(len(blocks)))

    # -- attention ---------------------------------------------------------------------------
    def prefill(
        self, query: torch.Tensor, out: torch.Tensor, tokens: list[torch.Tensor],
        seq_lens: torch.Tensor, block_table: torch.Tensor, cache: torch.Tensor, scale: float,
    ) -> None:
        """Dense causal attention for prefill rows; ``tokens[r]`` are row r's token indices."""
        q4, o4 = self._heads(query), self._heads(out)
        qlens = torch.tensor([len(t) for t in tokens])
        starts = torch.zeros(len(tokens) + 1, dtype=torch.int64)
        starts[1:] = qlens.cumsum(0)
        all_tokens = torch.cat(tokens)
        if len(self.resident):
            self._prefill_resident(q4, o4, all_tokens, starts, seq_lens, block_table, cache, scale)
        if len(self.stable):
            self._prefill_stable(q4, o4, tokens, seq_lens, block_table, cache, scale)

    def _prefill_resident(
        self, q4: torch.Tensor, o4: torch.Tensor, all_tokens: torch.Tensor, starts: torch.Tensor,
        seq_lens: torch.Tensor, block_table: torch.Tensor, cache: torch.Tensor, scale: float,
    ) -> None:
        num_res = len(self.resident)
        q_res = q4[all_tokens][:, self.resident].reshape(-1, num_res * self.group, self.head_dim)
        o_res = torch.empty_like(q_res)
        paged_attention(q_res.contiguous(), cache, o_res, starts, seq_lens, block_table,
                        scale, self.isa)
        o4[all_tokens.view(-1, 1), self.resident.view(1, -1)] = o_res.view(
            -1, num_res, self.group, self.head_dim)

    def _prefill_stable(
        self, q4: torch.Tensor, o4: torch.Tensor, tokens: list[torch.Tensor],
        seq_lens: torch.Tensor, block_table: torch.Tensor, cache: torch.Tensor, scale: float,
    ) -> None:
        """Stable heads: stage each row's pages from the arena into a scratch cache."""
        num_pages = (seq_lens + self.page_size - 1) // self.page_size
        blocks = torch.cat([block_table[r, : int(n)].long() for r, n in enumerate(num_pages)])
        self.flush_arena()
        staged = self.arena.get(self._keys(blocks))
        scratch = torch.empty(len(blocks) * len(self.stable), 1, self.page_size,
                              2 * self.head_dim, dtype=cache.dtype)
        flat = torch.arange(scratch.shape[0] * self.page_size)
        write_cache(scratch, staged.k.reshape(-1, 1, self.head_dim).to(cache.dtype),
                    staged.v.reshape(-1, 1, self.head_dim).to(cache.dtype), flat, self.isa)
        rows_tok, rows_head, tables, lens = [], [], [], []
        first_page = 0
        for r, n in enumerate(num_pages.tolist()):
            for s, head in enumerate(self.stable.tolist()):
                rows_tok.append(tokens[r])
                rows_head.append(torch.full_like(tokens[r], head))
                tables.append((first_page + torch.arange(n)) * len(self.stable) + s)
                lens.append(int(seq_lens[r]))
            first_page += n
        self._run_rows(q4, o4, rows_tok, rows_head, tables, lens, scratch, scale)

    def decode(
        self, query: torch.Tensor, out: torch.Tensor, rows_token: torch.Tensor,
        seq_lens: torch.Tensor, block_table: torch.Tensor, cache: torch.Tensor, scale: float,
        policy: SelectionPolicy,
    ) -> None:
        """One decode step for rows whose single query token is ``rows_token[r]``."""
        with one_thread() as threads:
            self._decode(query, out, rows_token, seq_lens, block_table, cache, scale, policy,
                         self.kernel_threads or threads)

    def _decode(
        self, query: torch.Tensor, out: torch.Tensor, rows_token: torch.Tensor,
        seq_lens: torch.Tensor, block_table: torch.Tensor, cache: torch.Tensor, scale: float,
        policy: SelectionPolicy, threads: int,
    ) -> None:
        q4, o4 = self._heads(query), self._heads(out)
        q_dec = query[rows_token]
        sel = policy.select(self.layer, q_dec, self.bounds, block_table, seq_lens)
        ids = sel.page_ids.long()  # [B, Hkv, W] ascending, newest page last, -1 padded
        valid = ids >= 0
        blocks = torch.gather(block_table.long().unsqueeze(1).expand(-1, ids.shape[1], -1), 2,
                              ids.clamp_min(0))
        last = sel.num_pages.view(-1, 1) - 1
        lens = (valid.sum(-1) - 1) * self.page_size + (seq_lens.view(-1, 1) - last * self.page_size)

        if len(self.resident):
            res_blocks = blocks[:, self.resident] * len(self.resident) + torch.arange(
                len(self.resident)).view(1, -1, 1)
            self._run_batch(q4, o4, rows_token, self.resident, res_blocks,
                            valid[:, self.resident], lens[:, self.resident],
                            single_head_view(cache), scale, threads)
        self.stats.decode_steps += 1
        self.stats.attended_pages["resident"] += int(valid[:, self.resident].sum())
        if not len(self.stable):
            return
        stable_blocks = blocks[:, self.stable]
        stable_valid = valid[:, self.stable]
        slots = self._make_resident(stable_blocks, stable_valid, block_table, sel.num_pages,
                                    ids[:, self.stable], bool(sel.reranked[:, self.stable].any()))
        self._run_batch(q4, o4, rows_token, self.stable, slots, stable_valid,
                        lens[:, self.stable], self.pool.pages, scale, threads)
        self.stats.attended_pages["stable"] += int(stable_valid.sum())

    def _make_resident(
        self, blocks: torch.Tensor, valid: torch.Tensor, block_table: torch.Tensor,
        num_pages: torch.Tensor, ids: torch.Tensor, reranked: bool,
    ) -> torch.Tensor:
        """Hot-pool slots ``[B, S, W]`` of the attended stable pages: drop pages no longer
        attended, copy in only the ones that were not resident.

        Pages leave the attended set only when a stable head reranks (between reranks the set
        only gains tail pages), so the drop scan runs on rerank steps alone.
        """
        heads = torch.arange(len(self.stable)).view(1, -1, 1)
        if reranked:
            width = block_table.shape[1]
            wanted = page_mask(ids.masked_fill(~valid, -1), width)  # [B, S, width]
            owned = torch.arange(width).view(1, -1) < num_pages.view(-1, 1)
            table = block_table.long().clamp_min(0)
            held = self.pool.slot_of[table].permute(0, 2, 1)  # [B, S, width]
            drop = (held >= 0) & owned.unsqueeze(1) & ~wanted
            self.pool.release(held[drop])
            self.stats.demoted_pages += int(drop.sum())

        slots = self.pool.slot_of[blocks, heads.expand_as(blocks)]
        missing = valid & (slots < 0)
        if bool(missing.any()):
            need_blocks = blocks[missing]
            need_heads = heads.expand_as(blocks)[missing]
            fresh = self.pool.allocate(need_blocks, need_heads)
            self.flush_arena()
            got = self.arena.get(PageKeys(self.layer, need_blocks, self.stable[need_heads]))
            flat = (fresh.view(-1, 1) * self.page_size + torch.arange(self.page_size)).flatten()
            dtype = self.pool.pages.dtype
            write_cache(self.pool.pages, got.k.reshape(-1, 1, self.head_dim).to(dtype),
                        got.v.reshape(-1, 1, self.head_dim).to(dtype), flat, self.isa)
            slots = self.pool.slot_of[blocks, heads.expand_as(blocks)]
            self.stats.promoted_pages += int(missing.sum())
        return slots

    # -- kernel plumbing ---------------------------------------------------------------------
    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], self.num_kv_heads, self.group, self.head_dim)

    def _run_batch(
        self, q4: torch.Tensor, o4: torch.Tensor, rows_token: torch.Tensor, heads: torch.Tensor,
        blocks: torch.Tensor, valid: torch.Tensor, lens: torch.Tensor, cache: torch.Tensor,
        scale: float, threads: int,
    ) -> None:
        """Decode pseudo-rows (row, head): one query token over that head's listed blocks."""
        batch, num_heads, width = blocks.shape
        table = blocks.masked_fill(~valid, 0).view(-1, width)  # page lists are -1 padded at the end
        tok = rows_token.view(-1, 1).expand(batch, num_heads).flatten()
        head = heads.view(1, -1).expand(batch, num_heads).flatten()
        q = q4[tok, head].contiguous()  # [B*H, G, D]
        o = torch.empty_like(q)
        starts = torch.arange(batch * num_heads + 1)
        paged_attention(q, cache, o, starts, lens.flatten(), table, scale, self.isa, threads)
        o4[tok, head] = o

    def _run_rows(
        self, q4: torch.Tensor, o4: torch.Tensor, rows_tok: list[torch.Tensor],
        rows_head: list[torch.Tensor], tables: list[torch.Tensor], lens: list[int],
        cache: torch.Tensor, scale: float,
    ) -> None:
        """Prefill pseudo-rows of any query length over single-head blocks."""
        tok, head = torch.cat(rows_tok), torch.cat(rows_head)
        width = max(len(t) for t in tables)
        table = torch.zeros(len(tables), width, dtype=torch.int64)
        for r, t in enumerate(tables):
            table[r, : len(t)] = t
        starts = torch.zeros(len(rows_tok) + 1, dtype=torch.int64)
        starts[1:] = torch.tensor([len(t) for t in rows_tok]).cumsum(0)
        q = q4[tok, head].contiguous()
        o = torch.empty_like(q)
        paged_attention(q, cache, o, starts, torch.tensor(lens), table, scale, self.isa)
        o4[tok, head] = o
