"""Helix: exact combination of partial attentions computed over disjoint KV shards.

Each shard returns its softmax-normalised output O_i and the log-sum-exp LSE_i of its logits.
The full attention is ``O = sum_i exp(LSE_i - LSE) * O_i`` with ``LSE = logsumexp_i LSE_i``. A
shard that holds no key for a query contributes O_i = 0, LSE_i = -inf, which drops out exactly.
"""

from __future__ import annotations

import torch


def combine_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine ``outs [S, ..., D]`` and ``lses [S, ...]`` over the shard axis 0.

    Returns ``(out [..., D] in the dtype of outs, lse [...] fp32)``; a query that no shard
    covers gets out = 0, lse = -inf.
    """
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse.clamp_min(torch.finfo(torch.float32).min).unsqueeze(0))
    out = (weights.unsqueeze(-1) * outs.float()).sum(dim=0)
    return out.to(outs.dtype), lse
