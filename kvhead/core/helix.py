"""Helix layout: which rank holds which KV tokens and heads, and what one decode step sends.

Helix runs attention with N = KVP × TP ranks. TP cuts the KV heads (and their query heads) into
TP slices; KVP cuts each slice's sequence into KVP shards, placed round robin in blocks of B
tokens, so every rank reads 1/N of the KV cache whatever the split. After attention, the KVP
ranks of one TP slice exchange their partial outputs in one all-to-all split by query head, merge
them exactly by log-sum-exp (:func:`kvhead.core.combine.combine_partials`), and the same N ranks
then run the output projection and the FFN as plain tensor parallelism.

Rank numbering: ``rank = kvp_index * tp + tp_index``, so the ranks of one TP group are adjacent
(the fast links of a node) and the all-to-all runs over the strided ranks of one TP slice.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import torch

LSE_BYTES = 4  # the log-sum-exp travels in fp32 whatever the activation dtype


@dataclass(frozen=True)
class HelixLayout:
    """KVP × TP ranks and the round-robin block size.

    kvp: sequence shards per TP slice. tp: TP slices (each a contiguous range of KV heads).
    block: tokens per round-robin block (B); token t lives on KVP shard ``(t // B) % kvp``.
    """

    kvp: int
    tp: int
    block: int = 16

    def __post_init__(self) -> None:
        for name in ("kvp", "tp", "block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")

    @property
    def world(self) -> int:
        return self.kvp * self.tp

    def coords(self, rank: int) -> tuple[int, int]:
        """``(kvp_index, tp_index)`` of a global rank."""
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside a world of {self.world}")
        return divmod(rank, self.tp)

    def kvp_group(self, tp_index: int) -> list[int]:
        """The global ranks sharing TP slice ``tp_index`` (one all-to-all group), by KVP index."""
        return [k * self.tp + tp_index for k in range(self.kvp)]

    def kv_heads(self, num_kv_heads: int, rank: int) -> range:
        """KV heads whose cache the rank holds (its TP slice)."""
        per = num_kv_heads // self.tp
        tp_index = self.coords(rank)[1]
        return range(tp_index * per, (tp_index + 1) * per)

    def slice_q_heads(self, num_q_heads: int, rank: int) -> range:
        """Query heads the rank attends with: every query head of its TP slice."""
        per = num_q_heads // self.tp
        tp_index = self.coords(rank)[1]
        return range(tp_index * per, (tp_index + 1) * per)

    def owned_q_heads(self, num_q_heads: int, rank: int) -> range:
        """Query heads whose combined output the rank owns after the all-to-all: the
        ``kvp_index``-th of the KVP equal chunks of its TP slice (``num_q_heads / N`` heads)."""
        per = num_q_heads // self.world
        kvp_index = self.coords(rank)[0]
        start = self.slice_q_heads(num_q_heads, rank).start + kvp_index * per
        return range(start, start + per)


def plan_layout(
    num_kv_heads: int,
    num_q_heads: int,
    world_size: int,
    *,
    tp: int | None = None,
    block: int = 16,
) -> HelixLayout:
    """Split ``world_size`` ranks into KVP × TP, or say which Helix rule forbids it.

    Rules: N = KVP × TP; TP ≤ num_kv_heads (a larger TP would duplicate KV heads, which Helix
    replaces by KVP); TP divides both head counts (a TP slice is whole KV heads with their query
    groups); N divides num_q_heads (the all-to-all hands each rank an equal share of query heads).
    Without ``tp`` the largest allowed TP is chosen: every split reads 1/N of the KV per rank, and
    a larger TP sends fewer bytes in the all-to-all and reads fewer projection weights per rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be at least 1, not {world_size}")
    if num_kv_heads < 1 or num_q_heads % num_kv_heads:
        raise ValueError(
            f"num_q_heads ({num_q_heads}) must be a positive multiple of num_kv_heads "
            f"({num_kv_heads})"
        )
    if tp is None:
        tp = gcd(num_kv_heads, world_size)  # divides num_q_heads too (a multiple)
    if tp < 1:
        raise ValueError(f"tp must be at least 1, not {tp}")
    if tp > num_kv_heads:
        raise ValueError(
            f"TP ≤ KV heads: tp={tp} exceeds num_kv_heads={num_kv_heads} (KV would be duplicated)"
        )
    if num_kv_heads % tp or num_q_heads % tp:
        raise ValueError(
            f"TP divides the heads: tp={tp} must divide num_kv_heads={num_kv_heads} and "
            f"num_q_heads={num_q_heads}"
        )
    if world_size % tp:
        raise ValueError(f"N = KVP × TP: world_size={world_size} is not a multiple of tp={tp}")
    if num_q_heads % world_size:
        raise ValueError(
            f"N divides the query heads: num_q_heads={num_q_heads} cannot be split evenly over "
            f"world_size={world_size} ranks by the all-to-all"
        )
    return HelixLayout(kvp=world_size // tp, tp=tp, block=block)


def kv_owner(layout: HelixLayout, positions: torch.Tensor | int) -> torch.Tensor | int:
    """KVP index holding each token position: blocks of B tokens dealt round robin."""
    return (positions // layout.block) % layout.kvp


def local_len(layout: HelixLayout, kvp_index: int, seq_len: int) -> int:
    """Tokens of a ``seq_len``-token sequence that KVP shard ``kvp_index`` holds.

    Whole rounds give every shard B tokens; the last partial round fills shards in order, so a
    sequence shorter than ``kvp_index * B`` leaves this shard empty.
    """
    round_tokens = layout.block * layout.kvp
    rounds, rest = divmod(seq_len, round_tokens)
    return rounds * layout.block + min(max(rest - kvp_index * layout.block, 0), layout.block)


def local_positions(layout: HelixLayout, kvp_index: int, seq_len: int) -> torch.Tensor:
    """Global positions held by shard ``kvp_index``, ascending (its local slot i holds entry i)."""
    positions = torch.arange(seq_len)
    return positions[kv_owner(layout, positions) == kvp_index]


def comm_bytes_per_token(
    layout: HelixLayout, num_q_heads: int, head_dim: int, batch: int, dtype_bytes: int
) -> int:
    """Bytes one rank sends in one layer's all-to-all for one decode step of ``batch`` sequences.

    A rank attends with the ``H_q / TP`` query heads of its TP slice over its own KV shard, giving
    per sequence and head a partial output (``d`` values of ``dtype_bytes``) and an fp32 LSE.
    The all-to-all cuts those heads into KVP equal chunks and keeps its own, so it sends

        (KVP − 1)/KVP · batch · H_q/TP · (d · dtype_bytes + 4)

    bytes (with bf16, ``2d + 4`` per head). The context length does not appear: Helix's exchange
    costs the same at 1k and 1M tokens. The world sends N times this per layer and step.
    """
    chunk_heads = num_q_heads // layout.world  # H_q / (TP · KVP), the heads per destination
    return (layout.kvp - 1) * batch * chunk_heads * (head_dim * dtype_bytes + LSE_BYTES)
