"""Summary tokens for the pages a sparse head skips (attention compensation).

A top-K head drops the softmax mass of every page it does not read; at 8k on SmolLM2 that is
~7% of a stable head's mass, spread thinly over hundreds of pages, and the renormalised output
drifts towards the selected pages' values. Each skipped page instead enters the attention as one
pseudo-token: its key is the centre of the page's key box (the bounds scoring already keeps), its
value the mean of the page's values (one extra vector per page, summed on append), and its logit
gets ``log(count)`` since it stands for ``count`` tokens. The summary attention is combined with
the sparse one by log-sum-exp (:func:`kvhead.core.combine.combine_partials`), exactly as Helix
shards are, so a head that reads every page is unchanged. The idea is RazorAttention's compensation
token, given per page so that the pages a rerank demotes keep a voice.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvhead.core.combine import combine_partials
from kvhead.core.pages import PageBounds, page_mask


@dataclass
class PageValueSums:
    """Per-page sums of values, indexed by physical block: ``sums`` is [num_blocks, Hkv, D] fp32."""

    sums: torch.Tensor

    @classmethod
    def empty(
        cls,
        num_blocks: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str = "cpu",
    ) -> PageValueSums:
        return cls(torch.zeros(num_blocks, num_kv_heads, head_dim, device=device))

    def update(self, values: torch.Tensor, slot_mapping: torch.Tensor, page_size: int) -> None:
        """Add newly written values ``[T, Hkv, D]`` at flat slots ``block * page_size + offset``.

        A slot at offset 0 starts its page afresh (the block may hold a freed sequence's sums,
        or a rewound one's), as :meth:`kvhead.core.pages.PageBounds.update` does for bounds.
        """
        slots = slot_mapping.long()
        keep = slots >= 0
        values, slots = values[keep].float(), slots[keep]
        if values.numel() == 0:
            return
        blocks = slots // page_size
        self.sums[blocks[slots % page_size == 0]] = 0.0
        self.sums.index_add_(0, blocks, values)


def summary_attention(
    query: torch.Tensor,
    bounds: PageBounds,
    sums: PageValueSums,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    page_size: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of queries ``[B, Hq, D]`` over one summary token per page *not* in ``attended``.

    ``attended`` is the selection's page list ``[B, Hkv, W]`` (-1 padded). Returns ``(out
    [B, Hq, D] fp32, lse [B, Hq] fp32)``; a head that skips no page gets out = 0, lse = -inf.
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads = bounds.kmin.shape[1]
    width = block_table.shape[1]
    table = block_table.long().clamp_min(0)
    pos = torch.arange(width, device=query.device).view(1, -1)
    count = (seq_lens.view(-1, 1) - pos * page_size).clamp(0, page_size)  # [B, N] tokens per page
    skipped = ~page_mask(attended, width) & (count > 0).unsqueeze(1)  # [B, Hkv, N]
    centre = ((bounds.kmax[table] + bounds.kmin[table]) / 2).permute(0, 2, 3, 1)  # [B, Hkv, D, N]
    mean = sums.sums[table] / count.clamp_min(1).view(batch, width, 1, 1)  # [B, N, Hkv, D]
    q = query.float().view(batch, num_kv_heads, -1, head_dim)
    logits = (q @ centre.nan_to_num(0.0)) * scale + count.clamp_min(1).log().view(
        batch, 1, 1, width
    )
    logits = logits.masked_fill(~skipped.unsqueeze(2), float("-inf"))  # [B, Hkv, G, N]
    lse = torch.logsumexp(logits, dim=-1)
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = weights @ mean.permute(0, 2, 1, 3)  # [B, Hkv, G, D]
    return out.reshape(batch, num_q_heads, head_dim), lse.reshape(batch, num_q_heads)


def compensate(
    out: torch.Tensor,
    lse: torch.Tensor,
    query: torch.Tensor,
    bounds: PageBounds,
    sums: PageValueSums,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    attended: torch.Tensor,
    page_size: int,
    scale: float,
) -> torch.Tensor:
    """The sparse attention ``(out, lse)`` with the skipped pages' summaries folded in."""
    extra, extra_lse = summary_attention(
        query, bounds, sums, block_table, seq_lens, attended, page_size, scale
    )
    both, _ = combine_partials(
        torch.stack([out.float(), extra]), torch.stack([lse.float(), extra_lse])
    )
    return both.to(out.dtype)
