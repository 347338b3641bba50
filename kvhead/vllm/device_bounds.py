"""Page bounds as the device keeps them: int8 boxes with one fp32 scale per (page, kv head).

fp32 min/max bounds cost ``8 x D`` bytes per page and head, 1/8 of a 16-token bf16 page of that
head. :class:`kvhead.core.bounds.compact.CompactBounds` stores ``2 x D + 4`` (int8 rounded outwards,
so the box still holds every key and the Quest score stays an upper bound of ``q . k``).

Folding a new key into an int8 box re-rounds it outwards each time, so a page written one token
at a time would drift loose. Only pages still being written grow (one per running sequence), so
their exact fp32 box is kept in a small fully associative table (``open_slots`` entries, tag =
block id, least recently used entry replaced, entry freed when the page's last slot is written).
The int8 box of a page in the table is settled (rounded once) when the page closes or leaves the
table; until then it is stale, which is safe because scoring never ranks it: a page is open only
while it is its sequence's newest, and the newest page is always selected. A page without an
entry (evicted, e.g. a finished request's partial page) folds into its settled int8 box instead:
that box contains the exact one, so the result is looser but still an upper bound; correctness
never depends on the table's size, only tightness does.
"""

from __future__ import annotations

import torch

from kvhead.core.bounds.compact import CompactBounds
from kvhead.core.pages import PAD, combine_group, select_top_k


class DeviceBounds:
    """int8 page bounds of one layer, head-major and indexed by vLLM block id.

    ``box[h, block]`` is ``qmax`` then ``qmin`` (``2 x D`` int8) and ``scale[h, block]`` their
    step: scoring reads one contiguous row per (head, page), and between reranks only the
    unstable heads' rows.
    """

    def __init__(
        self,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        open_slots: int,
        device: torch.device | str = "cpu",
    ) -> None:
        self.head_dim = head_dim
        self.box = torch.zeros(
            num_kv_heads, num_blocks, 2 * head_dim, dtype=torch.int8, device=device
        )
        self.scale = torch.zeros(num_kv_heads, num_blocks, device=device)
        open_shape = (open_slots, num_kv_heads, head_dim)
        self.open_min = torch.zeros(open_shape, device=device)
        self.open_max = torch.zeros(open_shape, device=device)
        self.open_tag = torch.full((open_slots,), -1, dtype=torch.int64, device=device)
        self.open_used = torch.zeros(open_slots, dtype=torch.int64, device=device)  # LRU clock
        self.clock = 0

    @property
    def nbytes(self) -> int:
        parts = (self.box, self.scale, self.open_min, self.open_max, self.open_tag, self.open_used)
        return sum(t.numel() * t.element_size() for t in parts)

    @staticmethod
    def bytes_per_block(num_kv_heads: int, head_dim: int) -> int:
        """Bytes one vLLM block adds: an int8 box and an fp32 scale per head (start-up budget)."""
        return num_kv_heads * (2 * head_dim + 4)

    @staticmethod
    def fixed_bytes(open_slots: int, num_kv_heads: int, head_dim: int) -> int:
        """Bytes that do not grow with blocks: the exact-box table of open pages."""
        return open_slots * (2 * num_kv_heads * head_dim * 4 + 2 * 8)

    def update(self, keys: torch.Tensor, slots: torch.Tensor, page_size: int) -> None:
        """Fold keys ``[T, Hkv, D]`` written at flat ``slots`` (>= 0) into their pages' boxes.

        A write at offset 0 starts the page afresh: vLLM handed the block to a new request.
        """
        blocks = slots // page_size
        touched, local = torch.unique(blocks, return_inverse=True)
        fresh = torch.zeros(touched.shape[0], dtype=torch.bool, device=blocks.device)
        fresh[local[slots % page_size == 0]] = True
        k = keys.float()
        index = local.view(-1, 1, 1).expand_as(k).contiguous()
        shape = (touched.shape[0], *k.shape[1:])
        new_min = k.new_full(shape, float("inf")).scatter_reduce_(0, index, k, "amin")
        new_max = k.new_full(shape, float("-inf")).scatter_reduce_(0, index, k, "amax")

        entry = self._entries(touched)
        at = entry.clamp_min(0)
        old_min, old_max = self.open_min[at], self.open_max[at]
        loose = (entry < 0) & ~fresh  # no exact box: fold into the int8 one (it contains it)
        if bool(loose.any()):
            kmax, kmin = self.boxes(touched)
            old_min = torch.where(loose.view(-1, 1, 1), kmin, old_min)
            old_max = torch.where(loose.view(-1, 1, 1), kmax, old_max)
        keep = ~fresh.view(-1, 1, 1)
        box_min = torch.where(keep, torch.minimum(old_min, new_min), new_min)
        box_max = torch.where(keep, torch.maximum(old_max, new_max), new_max)

        last = torch.zeros_like(touched).scatter_reduce_(0, local, slots % page_size, "amax")
        closed = last == page_size - 1
        held = self._claim(touched, entry, ~closed)
        ok = held >= 0
        self.open_min[held[ok]], self.open_max[held[ok]] = box_min[ok], box_max[ok]
        gone = closed & (entry >= 0)
        free = entry[gone]
        free = free[self.open_tag[free] == touched[gone]]  # unless _claim gave it to another page
        self.open_tag[free], self.open_used[free] = -1, 0
        if not bool(ok.all()):  # closed pages and pages the table cannot hold settle now
            self._settle(touched[~ok], box_min[~ok], box_max[~ok])

    def _settle(self, blocks: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> None:
        """Round exact boxes ``[n, Hkv, D]`` outwards into the int8 bounds of ``blocks``."""
        compact = CompactBounds.quantize(kmin, kmax)
        self.box[:, blocks] = torch.cat([compact.qmax, compact.qmin], dim=-1).transpose(0, 1)
        self.scale[:, blocks] = compact.scale.t()

    def boxes(self, blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Dequantised ``(kmax, kmin)`` boxes ``[n, Hkv, D]`` of ``blocks``."""
        scale = self.scale[:, blocks].t().unsqueeze(-1)
        box = self.box[:, blocks].transpose(0, 1).float() * scale
        return box[..., : self.head_dim], box[..., self.head_dim :]

    def _entries(self, blocks: torch.Tensor) -> torch.Tensor:
        """Table entry holding each block's exact box, -1 if none."""
        match = self.open_tag.view(1, -1) == blocks.view(-1, 1)  # [n, C]
        return torch.where(match.any(1), match.long().argmax(1), -1)

    def _claim(self, blocks: torch.Tensor, entry: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
        """Entries for the ``want`` blocks: kept where they have one, else the least recently
        used entries not in use this step (blocks beyond the table's size get -1)."""
        self.clock += 1
        held = torch.where(want, entry, -1)
        self.open_used[held[held >= 0]] = self.clock
        need = (want & (entry < 0)).nonzero().flatten()
        if need.numel():
            lru = self.open_used.argsort()[: need.numel()]
            lru = lru[self.open_used[lru] < self.clock]  # never steal this step's entries
            need = need[: lru.numel()]
            evicted = lru[self.open_tag[lru] >= 0]
            if evicted.numel():  # their pages lose the exact box: settle it first
                self._settle(self.open_tag[evicted], self.open_min[evicted], self.open_max[evicted])
            held[need] = lru
            self.open_tag[lru], self.open_used[lru] = blocks[need], self.clock
        return held

    def select(
        self,
        query: torch.Tensor,
        block_table: torch.Tensor,
        num_pages: torch.Tensor,
        top_k: int | torch.Tensor,
        heads: torch.Tensor | None = None,
        *,
        sink_pages: int = 0,
        recent_pages: int = 1,
        group_score: str = "max",
        bound_weight: float = 1.0,
    ) -> torch.Tensor:
        """Top-K logical pages ``[B, Hkv, K]`` of decode queries ``[B, Hq, D]`` (ascending, -1
        padded); only ``heads`` (when given) are scored, the others get -1 rows.

        Scores and forced pages follow :func:`kvhead.core.pages.score_pages` and
        :func:`~kvhead.core.pages.select_top_k` (``top_k`` may be per-head budgets ``[Hkv]``), on
        the dequantised int8 boxes.
        """
        batch, num_q_heads, head_dim = query.shape
        num_kv_heads = self.box.shape[0]
        largest = int(top_k.max()) if isinstance(top_k, torch.Tensor) else top_k
        k = min(largest, block_table.shape[1])
        if heads is not None and heads.numel() == 0:
            return torch.full((batch, num_kv_heads, k), PAD, dtype=torch.int64, device=query.device)
        q = query.float().view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
        table = block_table.long().clamp_min(0)
        if heads is None:
            heads = torch.arange(num_kv_heads, device=query.device)
        else:
            q = q[:, heads]
        if isinstance(top_k, torch.Tensor):
            top_k = top_k[heads]
        num_heads, width, num_blocks = heads.numel(), table.shape[1], self.box.shape[1]
        # One flat row gather (index_select) per (head, page): much cheaper than 2-d indexing.
        rows = (heads.view(-1, 1) * num_blocks + table.flatten().view(1, -1)).flatten()
        box = self.box.view(-1, 2 * head_dim).index_select(0, rows).float()
        scale = self.scale.view(-1).index_select(0, rows).view(num_heads, batch, 1, width)
        # centre logit + w x spread = kmax.(q + w|q|)/2 + kmin.(q - w|q|)/2: one product with
        # the concatenated box (w = 1 gives Quest's relu(q).kmax + min(q, 0).kmin exactly).
        spread = bound_weight * q.abs()
        q2 = torch.cat([(q + spread) / 2, (q - spread) / 2], dim=-1).transpose(0, 1)  # [h,B,G,2D]
        raw = torch.bmm(
            q2.reshape(num_heads * batch, -1, 2 * head_dim),
            box.view(num_heads * batch, width, 2 * head_dim).transpose(1, 2),
        )
        per_query = (raw.view(num_heads, batch, -1, width) * scale).transpose(0, 1)  # [B,h,G,W]
        scores = combine_group(per_query, num_pages, group_score, head_dim)
        top = select_top_k(
            scores, top_k, num_pages, sink_pages=sink_pages, recent_pages=recent_pages
        )
        if num_heads == num_kv_heads:
            return top
        full = top.new_full((batch, num_kv_heads, top.shape[2]), PAD)
        full[:, heads] = top
        return full
