"""FlexiCache page-selection policy: which pages each KV head attends to and keeps on device.

Three modes share one code path so their numbers are comparable:

* ``dense``   every head attends to every page.
* ``quest``   every head attends to its top-K pages, reranked every step; all pages stay resident.
* ``flexicache`` unstable heads behave as in ``quest``. Stable heads rerank only every R steps and
  attend to their top-K set plus every page written since that rerank (the *tail*): those tail
  pages are new, so they are in the device hot pool anyway, and attending to them keeps the
  newest context visible between reranks. Only stable heads save device memory; their resident
  set is ``top-K ∪ tail`` and a rerank fetches just the pages that were not resident before.

Options beyond the spec, all off by default (the defaults are the spec's selection):

* ``sink_pages`` / ``recent_pages``: pages at the start / end of the sequence that every top-K
  set keeps (StreamingLLM's attention sinks and a local window), inside the K budget.
* ``dense_layers``: the first layers attend to every page (Quest leaves its first two layers
  dense: their attention is broad, not sparse); they count as fully resident.
* ``group_score="softmax"``: rank pages by the summed per-query-head softmax of the bounds
  instead of their maximum over the GQA group (see :func:`kvhead.core.pages.score_pages`).
* ``unstable_dense``: in ``flexicache``, unstable heads attend to every page. Their pages are all
  resident anyway, so this costs compute but no device memory, and they need no scoring.
* ``head_top_k``: a per-(layer, head) page budget in place of the one ``top_k`` (head-adaptive
  selection, see :mod:`kvhead.core.budgets`): broad heads get more pages, concentrated ones fewer.
* ``bound_weight``: rank pages by the box centre's logit plus this share of the box's spread
  (1: the spec's upper bound; see :func:`kvhead.core.pages.score_pages`).
* ``compensate``: heads also attend to one summary token per page they skip (see
  :mod:`kvhead.core.summaries`); selections carry the flag to the attention.
* ``rerank_lag``: in ``flexicache``, a stable head's rerank takes effect one step late: the step
  that computes it still attends with the previous set + tail, so a pipelined engine can run the
  scoring on a side stream and fetch the promoted pages while that step decodes (both sets are
  resident during that step and counted so). The first step after prefill selects at once.

The policy keeps per-layer state for one batch of sequences that decode in lock-step; call
:meth:`SelectionPolicy.reset` when a new batch starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

import torch

from kvhead.core.bounds.live import LiveBounds
from kvhead.core.options import SPEC_RERANK_INTERVAL, SPEC_TOP_K
from kvhead.core.pages import (
    PAD,
    PageBounds,
    all_pages,
    mask_to_page_ids,
    page_mask,
    score_pages,
    select_top_k,
)


def _score_and_select(
    query: torch.Tensor,
    bounds: PageBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    top_k: int | torch.Tensor,
    kv_heads: torch.Tensor | None = None,
    *,
    sink_pages: int = 0,
    recent_pages: int = 1,
    group_score: str = "max",
    bound_weight: float = 1.0,
    live: LiveBounds | None = None,
    use_kernels: bool | None = None,
    kernels: Any = None,
) -> torch.Tensor:
    """Top-K page ids ``[B, Hkv, K]``; heads outside ``kv_heads`` (when given) get all -1.

    ``kernels`` (the :mod:`kvhead.kernels` dispatch, handed in by the engine so that the core
    imports no kernel code) runs the spec's selection (``use_kernels``; default: on CUDA tensors):
    from ``live`` int8 bounds when given (``kernels.select_pages``: flat or two-level by size),
    else fused fp32 scoring + top-K; both score every head (cheap there), and the heads not
    asked for are blanked after. The torch reference elsewhere, and for the options the kernels
    lack (sink/window pages, softmax group scores, bound weights, per-head budgets ``top_k [Hkv]``);
    it reads only the bounds of the heads asked for, always the fp32 ``bounds``.
    """
    per_head = isinstance(top_k, torch.Tensor)
    spec = (
        sink_pages == 0
        and recent_pages == 1
        and group_score == "max"
        and bound_weight == 1.0
        and not per_head
    )
    if spec and kernels is not None and (query.is_cuda if use_kernels is None else use_kernels):
        if live is None:
            ids = kernels.score_and_select(query, bounds, block_table, num_pages, top_k)
        else:
            ids = kernels.select_pages(
                query, live.pages, live.supers, block_table, num_pages, top_k, group=live.group
            )
        if kv_heads is not None:
            asked = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)
            ids = ids.masked_fill(
                ~asked.index_fill(0, kv_heads.to(ids.device), True).view(1, -1, 1), PAD
            )
        return ids
    forced = {"sink_pages": sink_pages, "recent_pages": recent_pages}
    if kv_heads is not None and kv_heads.numel() == 0:
        width = min(int(top_k.max()) if per_head else top_k, block_table.shape[1])
        return torch.full((query.shape[0], bounds.kmin.shape[1], width), PAD, device=query.device)
    if kv_heads is None:
        scores = score_pages(
            query,
            bounds,
            block_table,
            num_pages,
            group_score=group_score,
            bound_weight=bound_weight,
        )
        return select_top_k(scores, top_k, num_pages, **forced)
    scores = score_pages(query, bounds, block_table, num_pages, kv_heads, group_score, bound_weight)
    part = select_top_k(scores, top_k[kv_heads] if per_head else top_k, num_pages, **forced)
    full = part.new_full((part.shape[0], bounds.kmin.shape[1], part.shape[2]), PAD)
    full[:, kv_heads] = part
    return full


class Mode(str, Enum):
    dense = "dense"
    quest = "quest"
    flexicache = "flexicache"


@dataclass(frozen=True)
class LayerSelection:
    """One layer's decision for one decode step."""

    page_ids: torch.Tensor  # [B, Hkv, W] logical pages to attend to, ascending, -1 padded
    top_k_ids: torch.Tensor | None  # [B, Hkv, K] this step's top-K; -1 rows for heads not
    # scored this step (stable heads between reranks); None in dense mode
    resident: torch.Tensor  # [B, Hkv] pages each head keeps on device after this step
    num_pages: torch.Tensor  # [B] pages each sequence has
    promoted: torch.Tensor  # [B, Hkv] pages fetched into the device pool by this step's rerank
    reranked: torch.Tensor  # [B, Hkv] whether the head reranked this step
    compensate: bool = False  # heads also attend to summaries of the pages they skip


@dataclass
class PolicyStats:
    """Running totals per (layer, kv head), summed over sequences and decode steps."""

    resident_pages: torch.Tensor
    total_pages: torch.Tensor
    promoted_pages: torch.Tensor
    reranks: torch.Tensor
    steps: int = 0

    @classmethod
    def zeros(cls, num_layers: int, num_kv_heads: int) -> PolicyStats:
        z = lambda: torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        return cls(resident_pages=z(), total_pages=z(), promoted_pages=z(), reranks=z())

    def record(self, layer: int, sel: LayerSelection) -> None:
        """Accumulate on the selection's device: no host sync on the decode path."""
        if self.resident_pages.device != sel.resident.device:
            for name in ("resident_pages", "total_pages", "promoted_pages", "reranks"):
                setattr(self, name, getattr(self, name).to(sel.resident.device))
        self.resident_pages[layer] += sel.resident.double().sum(0)
        self.total_pages[layer] += sel.num_pages.double().sum()
        self.promoted_pages[layer] += sel.promoted.double().sum(0)
        self.reranks[layer] += sel.reranked.double().sum(0)
        if layer == 0:
            self.steps += 1

    @property
    def resident_fraction(self) -> float:
        """Share of KV pages (all layers, heads, steps) that had to be on the device."""
        total = self.total_pages.sum().item()
        return self.resident_pages.sum().item() / total if total else 1.0

    @property
    def promoted_per_rerank(self) -> float:
        reranks = self.reranks.sum().item()
        return self.promoted_pages.sum().item() / reranks if reranks else 0.0


@dataclass
class _LayerState:
    selected: torch.Tensor  # [B, Hkv, N] top-K mask chosen at each head's last rerank
    anchor: torch.Tensor  # [B, Hkv] pages the sequence had at that rerank
    steps: int = 0  # decode steps since the batch started


@dataclass
class SelectionPolicy:
    """Chooses pages per (sequence, kv head) for each decode step of each layer."""

    mode: Mode
    num_layers: int
    num_kv_heads: int
    page_size: int = 16
    top_k: int = SPEC_TOP_K
    rerank_interval: int = SPEC_RERANK_INTERVAL
    unstable: torch.Tensor | None = None  # [L, Hkv] bool; required for flexicache
    sink_pages: int = 0  # first pages every top-K set keeps
    recent_pages: int = 1  # newest pages every top-K set keeps (the partial page at least)
    dense_layers: int = 0  # first layers attend to every page
    unstable_dense: bool = False  # flexicache: unstable heads attend to every (resident) page
    group_score: str = "max"  # "max" over the GQA group (spec) or "softmax" (see score_pages)
    head_top_k: torch.Tensor | None = None  # [L, Hkv] per-head budgets replacing top_k
    bound_weight: float = 1.0  # share of the box spread in page scores (1: Quest's bound)
    compensate: bool = False  # skipped pages enter attention as summary tokens
    rerank_lag: bool = False  # flexicache: stable heads' reranks take effect one step late
    use_kernels: bool | None = None  # Triton selection for the spec case (None: on CUDA)
    kernels: Any = None  # the kvhead.kernels dispatch (None: the torch reference only)
    stats: PolicyStats = field(init=False)
    _state: dict[int, _LayerState] = field(init=False, default_factory=dict)
    _unstable_heads: list[torch.Tensor] = field(init=False, default_factory=list)
    _stable_heads: list[torch.Tensor] = field(init=False, default_factory=list)
    _layer: int = field(init=False, default=0)  # layer being selected (for per-head budgets)
    _live: LiveBounds | None = field(init=False, default=None)  # that layer's int8 bounds

    def __post_init__(self) -> None:
        self.mode = Mode(self.mode)
        if self.top_k <= 0:
            raise ValueError(f"top_k must be positive, got {self.top_k}")
        if self.rerank_interval <= 0:
            raise ValueError(f"rerank_interval must be positive, got {self.rerank_interval}")
        if (
            self.recent_pages < 1
            or self.sink_pages < 0
            or self.sink_pages + self.recent_pages > self.top_k
        ):
            raise ValueError(
                "need recent_pages >= 1, sink_pages >= 0 and "
                f"sink + recent <= top_k ({self.top_k}), "
                f"got recent {self.recent_pages}, sink {self.sink_pages}"
            )
        if self.head_top_k is not None:
            self._check_head_top_k()
        if not 0.0 <= self.bound_weight <= 1.0:
            raise ValueError(f"bound_weight must lie in [0, 1], got {self.bound_weight}")
        if self.group_score not in ("max", "softmax"):
            raise ValueError(f"group_score must be 'max' or 'softmax', got {self.group_score!r}")
        if not 0 <= self.dense_layers <= self.num_layers:
            raise ValueError(
                f"dense_layers must be in [0, {self.num_layers}], got {self.dense_layers}"
            )
        if self.mode is Mode.flexicache:
            if self.unstable is None:
                raise ValueError("flexicache mode needs the unstable-head mask of a head profile")
            if tuple(self.unstable.shape) != (self.num_layers, self.num_kv_heads):
                raise ValueError(
                    f"unstable mask has shape {tuple(self.unstable.shape)}, "
                    f"model has {(self.num_layers, self.num_kv_heads)}"
                )
        self.stats = PolicyStats.zeros(self.num_layers, self.num_kv_heads)
        if self.unstable is not None:
            self._unstable_heads = [row.nonzero().flatten() for row in self.unstable]
            self._stable_heads = [(~row).nonzero().flatten() for row in self.unstable]

    def _check_head_top_k(self) -> None:
        budgets = self.head_top_k
        if tuple(budgets.shape) != (self.num_layers, self.num_kv_heads):
            raise ValueError(
                f"head_top_k has shape {tuple(budgets.shape)}, "
                f"model has {(self.num_layers, self.num_kv_heads)}"
            )
        if int(budgets.min()) < self.sink_pages + self.recent_pages:
            raise ValueError(
                "every head budget must hold sink + recent pages "
                f"({self.sink_pages + self.recent_pages}), "
                f"smallest is {int(budgets.min())}"
            )
        self.head_top_k = budgets.long()

    def reset(self) -> None:
        """Start a new batch: forget selections; statistics keep accumulating."""
        self._state.clear()

    def select(
        self,
        layer: int,
        query: torch.Tensor,
        bounds: PageBounds,
        block_table: torch.Tensor,
        seq_lens: torch.Tensor,
        live: LiveBounds | None = None,
    ) -> LayerSelection:
        """Pages to attend to for decode queries ``[B, Hq, D]`` of ``layer``.

        ``live``: the layer's int8 bounds kept current on append, built for this
        ``block_table``'s width; the kernel path selects from them (see ``_score_and_select``).
        """
        self._layer = layer
        self._live = live
        num_pages = (seq_lens.long() + self.page_size - 1) // self.page_size
        if not block_table.is_cuda and not self.use_kernels:
            # Engines pad block tables to the longest possible sequence; scoring and masks only
            # need the pages that exist (the host sync this costs is free on CPU). The kernels
            # keep the full width: ``live`` super-pages are laid out for it.
            block_table = block_table[:, : max(int(num_pages.max()), 1)]
        batch, width = block_table.shape
        every_page = num_pages.view(-1, 1).expand(batch, self.num_kv_heads)
        none = torch.zeros_like(every_page)
        if self.mode is Mode.dense or layer < self.dense_layers:
            ids = all_pages(num_pages, self.num_kv_heads, width)
            sel = LayerSelection(ids, None, every_page, num_pages, none, none.bool())
        elif self.mode is Mode.quest:
            top = self._top_k(query, bounds, block_table, num_pages, None)
            sel = LayerSelection(
                top, top, every_page, num_pages, none, torch.ones_like(none).bool()
            )
        else:
            state = self._state.get(layer)
            due = state is None or state.steps % self.rerank_interval == 0
            # Between reranks only unstable heads need scores: stable ones reuse their set;
            # unstable heads that attend densely need none at all.
            if self.unstable_dense:
                heads = self._stable_heads[layer] if due else self._unstable_heads[layer][:0]
            else:
                heads = None if due else self._unstable_heads[layer]
            top = self._top_k(query, bounds, block_table, num_pages, heads)
            sel = self._flexicache(layer, top, num_pages, width, due)
        self.stats.record(layer, sel)
        return replace(sel, compensate=True) if self.compensate else sel

    def _top_k(
        self,
        query: torch.Tensor,
        bounds: PageBounds,
        block_table: torch.Tensor,
        num_pages: torch.Tensor,
        heads: torch.Tensor | None,
    ) -> torch.Tensor:
        """Top-K page ids ``[B, Hkv, K]`` of ``heads`` (``None``: every head; the others -1).

        The one scoring step of every mode: a subclass that keeps its page bounds in another
        form (the vLLM plugin's int8 boxes) replaces this, honouring the same options (forced
        pages, group score, bound weight, ``head_top_k``), and inherits every selection rule.
        """
        top_k = (
            self.top_k if self.head_top_k is None else self.head_top_k[self._layer].to(query.device)
        )
        return _score_and_select(
            query,
            bounds,
            block_table,
            num_pages,
            top_k,
            heads,
            sink_pages=self.sink_pages,
            recent_pages=self.recent_pages,
            group_score=self.group_score,
            bound_weight=self.bound_weight,
            live=self._live,
            use_kernels=self.use_kernels,
            kernels=self.kernels,
        )

    def _flexicache(
        self,
        layer: int,
        top: torch.Tensor,
        num_pages: torch.Tensor,
        width: int,
        due: bool,
    ) -> LayerSelection:
        batch = top.shape[0]
        unstable = self.unstable[layer].to(top.device).view(1, -1).expand(batch, -1)
        top_mask = page_mask(top, width)
        state = self._state.get(layer)
        first = state is None
        if first:
            state = _LayerState(selected=top_mask, anchor=num_pages.view(-1, 1).expand_as(unstable))
            resident_before = torch.zeros_like(top_mask)
        else:
            # The table width follows the longest sequence; pages outside it do not exist.
            grown = width - state.selected.shape[-1]
            state.selected = (
                torch.nn.functional.pad(state.selected, (0, grown))
                if grown > 0
                else state.selected[..., :width]
            )
            resident_before = state.selected | self._tail(state.anchor, num_pages, width)
        rerank = unstable | due
        state.selected = torch.where(rerank.unsqueeze(-1), top_mask, state.selected)
        state.anchor = torch.where(rerank, num_pages.view(-1, 1), state.anchor)
        state.steps += 1
        self._state[layer] = state

        stable_attend = state.selected | self._tail(state.anchor, num_pages, width)
        stable_resident = stable_attend
        if self.rerank_lag and not first:
            # resident_before is this step's set as the last rerank left it (tail included)
            stable_resident = stable_attend | resident_before
            stable_attend = resident_before
        unstable_attend = (
            torch.arange(width, device=top.device).view(1, 1, -1) < num_pages.view(-1, 1, 1)
            if self.unstable_dense
            else top_mask
        )
        attend = torch.where(unstable.unsqueeze(-1), unstable_attend, stable_attend)
        resident = torch.where(unstable, num_pages.view(-1, 1), stable_resident.sum(-1))
        promoted = (rerank & ~unstable).unsqueeze(-1) & state.selected & ~resident_before
        return LayerSelection(
            page_ids=mask_to_page_ids(attend),
            top_k_ids=top,
            resident=resident,
            num_pages=num_pages,
            promoted=promoted.sum(-1),
            reranked=rerank,
        )

    @staticmethod
    def _tail(anchor: torch.Tensor, num_pages: torch.Tensor, width: int) -> torch.Tensor:
        """Pages written since each head's last rerank, including the page that was partial then."""
        pos = torch.arange(width, device=anchor.device).view(1, 1, -1)
        return (pos >= anchor.unsqueeze(-1) - 1) & (pos < num_pages.view(-1, 1, 1))
