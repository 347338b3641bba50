"""Page metadata and page selection (Quest-style bounds).

Each physical page keeps, per KV head, the elementwise minimum and maximum of its keys. For a
query q the bound ``sum_d max(q_d * kmax_d, q_d * kmin_d)`` is at least ``q . k`` for every key k
in the page, so ranking pages by it never under-rates a page that holds a strongly attended key.
A KV head serves a GQA group of query heads; its page score is the maximum over the group.

Selections are lists of *logical* page indices per (sequence, kv head), padded with -1; logical
page i of sequence b lives in physical block ``block_table[b, i]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1


@dataclass
class PageBounds:
    """Per-page key bounds by physical block: ``kmin``/``kmax`` are [num_blocks, Hkv, D]."""

    kmin: torch.Tensor
    kmax: torch.Tensor

    @classmethod
    def empty(
        cls,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> PageBounds:
        shape = (num_blocks, num_kv_heads, head_dim)
        return cls(
            kmin=torch.full(shape, float("inf"), dtype=dtype, device=device),
            kmax=torch.full(shape, float("-inf"), dtype=dtype, device=device),
        )

    def update(self, keys: torch.Tensor, slot_mapping: torch.Tensor, page_size: int) -> None:
        """Fold newly written keys ``[T, Hkv, D]`` at flat slots ``block * page_size + offset``.

        A slot at offset 0 starts a page, so that block's old bounds (from a freed request that
        used the block before) are dropped; this is what keeps reused blocks correct.
        """
        slot_mapping = slot_mapping.long()
        keep = slot_mapping >= 0  # vLLM marks padded slots with -1
        keys, slot_mapping = keys[keep], slot_mapping[keep]
        if keys.numel() == 0:
            return
        blocks = slot_mapping // page_size
        # Reduce over the touched blocks only: a decode step touches one block per sequence,
        # and a scatter over the whole pool would cost as much as the pool is large.
        touched, local = torch.unique(blocks, return_inverse=True)
        fresh = torch.zeros(touched.shape[0], dtype=torch.bool, device=blocks.device)
        fresh[local[slot_mapping % page_size == 0]] = True
        k = keys.to(self.kmin.dtype)
        index = local.view(-1, 1, 1).expand_as(k).contiguous()  # a stride-0 index is ~1000x slower
        shape = (touched.shape[0], *k.shape[1:])
        new_min = k.new_full(shape, float("inf")).scatter_reduce_(0, index, k, "amin")
        new_max = k.new_full(shape, float("-inf")).scatter_reduce_(0, index, k, "amax")
        keep = ~fresh.view(-1, 1, 1)
        self.kmin[touched] = torch.where(keep, torch.minimum(self.kmin[touched], new_min), new_min)
        self.kmax[touched] = torch.where(keep, torch.maximum(self.kmax[touched], new_max), new_max)


def score_pages(
    query: torch.Tensor,
    bounds: PageBounds,
    block_table: torch.Tensor,
    num_pages: torch.Tensor,
    kv_heads: torch.Tensor | None = None,
    group_score: str = "max",
    bound_weight: float = 1.0,
) -> torch.Tensor:
    """Upper-bound scores ``[B, Hkv, max_pages]`` for decode queries ``[B, Hq, D]``.

    Pages past ``num_pages[b]`` score -inf. The bound splits q into its positive and negative
    parts: ``max(q*kmax, q*kmin) = relu(q)*kmax + min(q, 0)*kmin`` elementwise. ``kv_heads``
    restricts scoring (and the bounds read) to those KV heads: the result is ``[B, h, max_pages]``.

    ``group_score`` combines the query heads of a GQA group: ``"max"`` (the spec) takes the
    largest bound; ``"softmax"`` sums each query head's softmax of its bounds over the pages
    (scaled by 1/sqrt(D), as attention is), an estimate of the attention mass the group puts on
    each page. With ``max`` one query head with large logits ranks the pages for the whole group;
    the softmax gives each query head a normalized say.

    ``bound_weight`` w in [0, 1] writes the bound as the box centre's logit plus its spread,
    ``q.c + sum_d |q_d| h_d`` (c = (kmax + kmin) / 2, h = (kmax - kmin) / 2), and keeps w of the
    spread: 1 is the upper bound above; below 1 the score estimates a page's typical logit rather
    than its best case, so a page whose box is wide only because its keys disagree stops
    outranking one whose keys all point at q (on SmolLM2 at 8k, w = 0.5 cuts the stable heads'
    attention-output error by ~20% at the same K; see benchmarks/accuracy/accuracy_scoring.py).
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = bounds.kmin.shape[1]
    q = query.to(bounds.kmin.dtype).view(batch, num_kv_heads, num_q_heads // num_kv_heads, head_dim)
    table = block_table.long().clamp_min(0)
    if kv_heads is None:
        kmax, kmin = bounds.kmax[table], bounds.kmin[table]  # [B, N, Hkv, D]
    else:
        q = q[:, kv_heads]
        kmax = bounds.kmax[table.unsqueeze(-1), kv_heads]
        kmin = bounds.kmin[table.unsqueeze(-1), kv_heads]
    kmax, kmin = kmax.permute(0, 2, 3, 1), kmin.permute(0, 2, 3, 1)  # [B, h, D, N]
    if bound_weight == 1.0:
        scores = q.clamp_min(0) @ kmax + q.clamp_max(0) @ kmin  # [B, Hkv, G, N]
    elif 0.0 <= bound_weight < 1.0:
        scores = q @ ((kmax + kmin) / 2) + bound_weight * (q.abs() @ ((kmax - kmin) / 2))
    else:
        raise ValueError(f"bound_weight must lie in [0, 1], got {bound_weight}")
    return combine_group(scores, num_pages, group_score, head_dim)


def combine_group(
    per_query: torch.Tensor, num_pages: torch.Tensor, group_score: str, head_dim: int
) -> torch.Tensor:
    """Page scores ``[B, h, N]`` of GQA groups from their query heads' bound logits
    ``[B, h, G, N]`` (``group_score`` as in :func:`score_pages`); pages past ``num_pages[b]``
    score -inf. Shared by the scorers of fp32 and int8 (vLLM plugin) page bounds."""
    batch, _, _, width = per_query.shape
    invalid = torch.arange(width, device=per_query.device) >= num_pages.view(-1, 1)
    invalid = invalid.view(batch, 1, 1, -1)
    if group_score == "max":
        scores = per_query.amax(dim=2)
    elif group_score == "softmax":
        scaled = (per_query * head_dim**-0.5).masked_fill(invalid, float("-inf"))
        scores = scaled.softmax(dim=-1).nan_to_num(0.0).sum(dim=2)
    else:
        raise ValueError(f"group_score must be 'max' or 'softmax', got {group_score!r}")
    return scores.masked_fill(invalid[:, :, 0], float("-inf"))


def select_top_k(
    scores: torch.Tensor,
    top_k: int | torch.Tensor,
    num_pages: torch.Tensor,
    *,
    sink_pages: int = 0,
    recent_pages: int = 1,
) -> torch.Tensor:
    """Top-``top_k`` logical pages per (sequence, kv head), ascending, padded with -1.

    The newest ``recent_pages`` (at least the newest, still being written: its bounds describe
    only the tokens so far, and the query's own recent context lives there) and the first
    ``sink_pages`` (StreamingLLM's attention sinks, which soak up most of the softmax mass in
    many heads) are always kept; they count inside the ``top_k`` budget.

    ``top_k`` may be a tensor ``[Hkv]`` of per-head budgets (head-adaptive selection): each head
    keeps its own best ``top_k[h]`` pages; rows are padded to the largest budget.
    """
    per_head = isinstance(top_k, torch.Tensor)
    smallest = int(top_k.min()) if per_head else top_k
    largest = int(top_k.max()) if per_head else top_k
    if smallest <= 0:
        raise ValueError(f"top_k must be positive, got {smallest}")
    if recent_pages < 1 or sink_pages < 0 or sink_pages + recent_pages > smallest:
        raise ValueError(
            f"need recent_pages >= 1, sink_pages >= 0 and their sum <= top_k ({smallest}), "
            f"got {recent_pages} and {sink_pages}"
        )
    batch, num_heads, max_pages = scores.shape
    k = min(largest, max_pages)
    pos = torch.arange(max_pages, device=scores.device).view(1, 1, -1)
    num_pages = num_pages.long().view(batch, 1, 1)
    keep = ((pos < sink_pages) | (pos >= num_pages - recent_pages)) & (pos < num_pages)
    forced = scores.masked_fill(keep, float("inf"))
    values, ids = forced.topk(k, dim=2)
    if per_head:
        if top_k.shape != (num_heads,):
            raise ValueError(
                f"per-head top_k has shape {tuple(top_k.shape)}, scores have {num_heads} heads"
            )
        rank = torch.arange(k, device=scores.device).view(1, 1, -1)
        values = values.masked_fill(rank >= top_k.to(scores.device).view(1, -1, 1), float("-inf"))
    ids = ids.masked_fill(values == float("-inf"), PAD)
    ids = torch.where(ids == PAD, torch.iinfo(ids.dtype).max, ids).sort(dim=2).values
    return ids.masked_fill(ids == torch.iinfo(ids.dtype).max, PAD)


def page_sums(per_token: torch.Tensor, page_size: int) -> torch.Tensor:
    """Sums of ``[..., T]`` over each page of ``page_size`` tokens: ``[..., ceil(T / page_size)]``.

    Applied to attention weights it gives the true mass each page holds, the quantity page
    scores estimate (coverage calibration, oracle rankings, selection screens).
    """
    pages = -(-per_token.shape[-1] // page_size)
    padded = torch.nn.functional.pad(per_token, (0, pages * page_size - per_token.shape[-1]))
    return padded.view(*per_token.shape[:-1], pages, page_size).sum(-1)


def all_pages(num_pages: torch.Tensor, num_kv_heads: int, max_pages: int) -> torch.Tensor:
    """Every valid logical page for every head (dense mode), padded with -1."""
    ids = torch.arange(max_pages, device=num_pages.device).expand(num_pages.shape[0], max_pages)
    ids = ids.masked_fill(ids >= num_pages.view(-1, 1), PAD)
    return ids.unsqueeze(1).expand(-1, num_kv_heads, -1).contiguous()


def page_mask(page_ids: torch.Tensor, max_pages: int) -> torch.Tensor:
    """Boolean membership ``[B, Hkv, max_pages]`` of a padded page-id list."""
    mask = torch.zeros(*page_ids.shape[:2], max_pages + 1, dtype=torch.bool, device=page_ids.device)
    mask.scatter_(2, page_ids.long().masked_fill(page_ids < 0, max_pages), True)
    return mask[..., :max_pages]


def mask_to_page_ids(mask: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`page_mask`: ascending page ids, padded with -1 to the widest row."""
    width = max(int(mask.sum(dim=2).max().item()) if mask.numel() else 0, 1)
    positions = torch.arange(mask.shape[2], device=mask.device).expand_as(mask)
    keyed = torch.where(mask, positions, mask.shape[2])
    ids = keyed.sort(dim=2).values[..., :width]
    return ids.masked_fill(ids == mask.shape[2], PAD)


@dataclass(frozen=True)
class RerankDiff:
    """What a rerank changed, per (sequence, kv head) as masks over logical pages.

    ``promoted`` pages must be copied into the device hot pool; ``demoted`` ones may be released.
    """

    promoted: torch.Tensor
    demoted: torch.Tensor

    @property
    def num_promoted(self) -> torch.Tensor:
        return self.promoted.sum(dim=2)

    @property
    def num_demoted(self) -> torch.Tensor:
        return self.demoted.sum(dim=2)


def rerank_diff(resident_before: torch.Tensor, selected_after: torch.Tensor) -> RerankDiff:
    """Diff of a head's device-resident page mask before a rerank and its new selection."""
    return RerankDiff(
        promoted=selected_after & ~resident_before,
        demoted=resident_before & ~selected_after,
    )
