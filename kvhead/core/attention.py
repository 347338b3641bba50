"""Paged decode attention over per-head page lists (torch reference; the oracle for kernels).

Layout follows vLLM: ``k_cache``/``v_cache`` are ``[num_blocks, page_size, Hkv, D]``; logical page
i of sequence b lives in block ``block_table[b, i]``. A page list ``[B, Hkv, K]`` names, per KV
head, the logical pages it attends to (-1 = padding), so heads of one GQA layer may read
different pages. Results come with the log-sum-exp of the logits so partial attentions over
disjoint page sets (Helix shards, hot/cold splits) combine exactly.
"""

from __future__ import annotations

import torch

from kvhead.core.pages import all_pages


def sparse_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    page_ids: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of decode queries ``[B, Hq, D]`` over the listed pages.

    Returns ``(out [B, Hq, D] in the query dtype, lse [B, Hq] fp32)``. Tokens at or past
    ``seq_lens[b]`` are masked, so the newest partial page may be listed. A head with no valid
    token returns out = 0, lse = -inf (the neutral element of the LSE combine).
    """
    batch, num_q_heads, head_dim = query.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    ids = page_ids.long()
    valid_page = ids >= 0
    safe = ids.clamp_min(0)
    blocks = torch.gather(
        block_table.long().unsqueeze(1).expand(-1, num_kv_heads, -1), 2, safe
    )  # [B, Hkv, K]
    # One flat row gather: row (slot * Hkv + head) of the pool viewed as [slots * Hkv, D].
    offsets = torch.arange(page_size, device=query.device)
    heads = torch.arange(num_kv_heads, device=query.device).view(1, num_kv_heads, 1, 1)
    rows = ((blocks.unsqueeze(-1) * page_size + offsets) * num_kv_heads + heads).flatten()
    gathered = (batch, num_kv_heads, ids.shape[2] * page_size, head_dim)
    keys = k_cache.reshape(-1, head_dim).index_select(0, rows).view(gathered).float()
    values = v_cache.reshape(-1, head_dim).index_select(0, rows).view(gathered).float()
    pos = safe.unsqueeze(-1) * page_size + offsets
    valid = valid_page.unsqueeze(-1) & (pos < seq_lens.view(-1, 1, 1, 1))  # [B, Hkv, K, P]

    q = query.float().view(batch, num_kv_heads, group, head_dim)
    logits = (q @ keys.transpose(-1, -2)) * scale  # [B, Hkv, G, K*P]
    logits = logits.masked_fill(~valid.flatten(2).unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [B, Hkv, G]
    weights = torch.exp(logits - lse.unsqueeze(-1).clamp_min(torch.finfo(torch.float32).min))
    out = weights @ values  # [B, Hkv, G, D]
    return (
        out.reshape(batch, num_q_heads, head_dim).to(query.dtype),
        lse.reshape(batch, num_q_heads),
    )


def dense_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over every token of each sequence: the sparse path with all pages listed."""
    page_size = k_cache.shape[1]
    num_pages = (seq_lens + page_size - 1) // page_size
    ids = all_pages(num_pages, k_cache.shape[2], block_table.shape[1])
    return sparse_decode_attention(query, k_cache, v_cache, block_table, seq_lens, ids, scale)
