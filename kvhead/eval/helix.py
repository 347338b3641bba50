"""Reference Helix decode over torch.distributed, and the same decode on one device.

This is the exactness oracle for Helix (tests compare the two paths in fp32) and the engine of
``benchmarks/helix``. A decode step of a Llama decoder layer on Helix rank (k, t):

1. q/k/v projections of TP slice t (every KVP rank of the slice computes them; they are tiny);
   the new token's K/V is kept only by the KVP rank that owns its position (round robin).
2. Attention of all the slice's query heads over the rank's local KV shard: a partial output
   and its LSE. A rank with no local token returns O = 0, LSE = −inf, which the combine drops.
3. ONE all-to-all that moves data only among the slice's KVP ranks, split by query head, O and
   LSE in one byte buffer; each rank merges the KVP partials of its ``H_q / N`` heads with
   :func:`combine_partials`.
4. Output projection row-parallel over the rank's heads, all-reduce, residual; SwiGLU MLP
   column- then row-parallel over all N ranks, all-reduce, residual.

Prefill is not what Helix changes: a context is loaded straight into each rank's shard
(:meth:`load_context`), or fed token by token through :meth:`step`. Ranks run as forked
processes on CPU (gloo; fork, because each spawned rank would re-import torch) and as spawned
ones on CUDA (NCCL), one per device, see :func:`run_ranks`.
"""

from __future__ import annotations

import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from kvhead.core.attention import dense_decode_attention
from kvhead.core.combine import combine_partials
from kvhead.core.helix import HelixLayout, kv_owner, local_len, local_positions
from kvhead.eval.llama_layers import (
    BlockShape,
    LayerWeights,
    rms_norm,
    rope,
    shard_layer,
)


class KVBuffer:
    """One layer's K/V ``[B, tokens, H, d]`` with per-sequence lengths.

    Contiguous per sequence, so viewed as ``[B * pages, page, H, d]`` with block table
    ``arange`` it is a vLLM-layout paged pool that :mod:`kvhead.core.attention` reads.
    """

    def __init__(self, size: tuple[int, int, int, int], page: int, like: torch.Tensor) -> None:
        """``size``: (B, tokens, H, d); ``like``: a tensor of the wanted dtype and device."""
        batch, tokens, heads, head_dim = size
        self.page = page
        pages = max(1, -(-tokens // page))
        shape = (batch, pages * page, heads, head_dim)
        self.keys = torch.zeros(shape, dtype=like.dtype, device=like.device)
        self.values = torch.zeros_like(self.keys)
        self.lens = torch.zeros(batch, dtype=torch.long, device=like.device)
        self.table = torch.arange(batch * pages, device=like.device).view(batch, pages)

    def fill(self, b: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Sequence ``b`` holds exactly ``keys/values [T, H, d]``."""
        self.keys[b, : len(keys)] = keys
        self.values[b, : len(values)] = values
        self.lens[b] = len(keys)

    def append(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> None:
        """Append ``keys/values [B, H, d]`` of the sequences where ``rows [B]`` is true."""
        idx = rows.nonzero().flatten()
        self.keys[idx, self.lens[idx]] = keys[idx]
        self.values[idx, self.lens[idx]] = values[idx]
        self.lens[idx] += 1

    def paged(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1, self.page, *self.keys.shape[2:])
        return self.keys.view(shape), self.values.view(shape)


class Decoder(ABC):
    """A stack of decoder layers decoding one token per sequence per :meth:`step`.

    Subclasses say which KV they keep (:meth:`_held`, ``kv_heads``), how they attend
    (:meth:`_attend`) and how partial sums meet (:meth:`_reduce`); the layer arithmetic is
    shared, so Helix and one device differ only in what Helix changes.
    """

    def __init__(
        self,
        shape: BlockShape,
        layers: Sequence[LayerWeights],
        batch: int,
        kv_heads: range,
        tokens: int,
        page: int,
    ):
        """``layers``: this decoder's weights, on its device; ``tokens``: KV slots per sequence."""
        self.shape, self.layers, self.kv_heads = shape, list(layers), kv_heads
        self.device = self.layers[0].k_proj.device
        size = (batch, tokens, len(kv_heads), shape.head_dim)
        self.caches = [KVBuffer(size, page, like=w.k_proj) for w in self.layers]
        self.seq_lens = torch.zeros(batch, dtype=torch.long, device=self.device)
        self.scale = shape.head_dim**-0.5

    def load_context(
        self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], lens: Sequence[int]
    ) -> None:
        """Give each sequence ``b`` the first ``lens[b]`` post-RoPE keys/values ``[B, T, Hkv, d]``
        of every layer (a prefill done elsewhere); the decoder keeps its part."""
        heads = slice(self.kv_heads.start, self.kv_heads.stop)
        for cache, k, v in zip(self.caches, keys, values):
            for b, n in enumerate(lens):
                held = self._held(n)
                cache.fill(b, k[b, held, heads].to(self.device), v[b, held, heads].to(self.device))
        self.seq_lens = torch.tensor(list(lens), dtype=torch.long, device=self.device)

    @torch.inference_mode()
    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, hidden]`` of the next token of each sequence through every layer."""
        x = x.to(self.device)
        for layer, w in enumerate(self.layers):
            x = self._layer(layer, w, x)
        self.seq_lens += 1
        return x

    def _layer(self, layer: int, w: LayerWeights, x: torch.Tensor) -> torch.Tensor:
        s, batch = self.shape, x.shape[0]
        h = rms_norm(x, w.input_layernorm, s.eps)
        q = rope((h @ w.q_proj.T).view(batch, -1, s.head_dim), self.seq_lens, s.rope_theta)
        k = rope((h @ w.k_proj.T).view(batch, -1, s.head_dim), self.seq_lens, s.rope_theta)
        v = (h @ w.v_proj.T).view(batch, -1, s.head_dim)
        attn = self._attend(self.caches[layer], q, k, v)
        x = x + self._reduce(attn.flatten(1) @ w.o_proj.T)
        h = rms_norm(x, w.post_attention_layernorm, s.eps)
        return x + self._reduce((F.silu(h @ w.gate_proj.T) * (h @ w.up_proj.T)) @ w.down_proj.T)

    @abstractmethod
    def _held(self, seq_len: int) -> torch.Tensor:
        """Positions of a ``seq_len``-token context that this decoder keeps, ascending."""

    @abstractmethod
    def _attend(
        self, cache: KVBuffer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store the new token's ``k/v`` where they belong, return the attention output of the
        query heads whose output projection this decoder holds."""

    @abstractmethod
    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of a row-parallel projection's partial results over all ranks."""


class OneDevice(Decoder):
    """Every weight and every token on one device; attention is a plain masked softmax."""

    def __init__(self, shape: BlockShape, layers, batch: int, capacity: int, device="cpu"):
        layers = [w.to(torch.device(device)) for w in layers]
        super().__init__(shape, layers, batch, range(shape.num_kv_heads), capacity, page=1)

    def _held(self, seq_len):
        return torch.arange(seq_len)

    def _attend(self, cache, q, k, v):
        cache.append(k, v, torch.ones_like(self.seq_lens, dtype=torch.bool))
        group = q.shape[1] // k.shape[1]
        keys = cache.keys.float().repeat_interleave(group, dim=2)  # [B, T, Hq, d]
        values = cache.values.float().repeat_interleave(group, dim=2)
        logits = torch.einsum("bhd,bthd->bht", q.float(), keys) * self.scale
        beyond = torch.arange(keys.shape[1], device=q.device) >= cache.lens.view(-1, 1, 1)
        weights = torch.softmax(logits.masked_fill(beyond, float("-inf")), dim=-1)
        return torch.einsum("bht,bthd->bhd", weights, values).to(q.dtype)

    def _reduce(self, partial):
        return partial


class HelixRank(Decoder):
    """This process's rank of a Helix decoder over ``group`` (default: the whole world).

    Every rank of ``group`` builds one, with the same full weights; it keeps only its shard.
    ``bytes_sent`` counts the all-to-all bytes this rank handed to other ranks, ``reduced_bytes``
    the payload of its all-reduces (the wire bytes depend on the backend's algorithm).
    """

    def __init__(
        self,
        shape: BlockShape,
        layers: Sequence[LayerWeights],
        layout: HelixLayout,
        batch: int,
        capacity: int,
        *,
        page: int = 16,
        group: dist.ProcessGroup | None = None,
    ):
        if (size := dist.get_world_size(group)) != layout.world:
            raise ValueError(f"layout needs {layout.world} ranks, the group has {size}")
        rank = dist.get_rank(group)
        nccl = dist.get_backend(group) == "nccl"
        device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.layout, self.group = layout, group
        self.kvp_index, tp_index = layout.coords(rank)
        super().__init__(
            shape,
            [shard_layer(w, shape, layout, rank).to(device) for w in layers],
            batch,
            layout.kv_heads(shape.num_kv_heads, rank),
            local_len(layout, self.kvp_index, capacity),
            page,
        )
        self.rank, self.in_slice = rank, [r % layout.tp == tp_index for r in range(layout.world)]
        self.bytes_sent = self.reduced_bytes = 0

    def _held(self, seq_len):
        return local_positions(self.layout, self.kvp_index, seq_len)

    def _attend(self, cache, q, k, v):
        cache.append(k, v, kv_owner(self.layout, self.seq_lens) == self.kvp_index)
        k_pool, v_pool = cache.paged()
        out, lse = dense_decode_attention(q, k_pool, v_pool, cache.table, cache.lens, self.scale)
        if self.layout.kvp == 1:  # a lone shard's partial is already the whole attention
            return out
        return self._exchange(out, lse)

    def _exchange(self, out: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
        """All-to-all of partials split by query head, then the exact LSE combine.

        O (activation dtype) and LSE (fp32) travel as one byte buffer ``[KVP, B, H/N, d·s + 4]``
        so the step costs one collective; chunk i goes to the slice's KVP rank i. The collective
        spans the Helix group with empty chunks for other TP slices, so data moves only within
        the slice and no per-slice group is needed (gloo cannot split a group, and torch names
        locally created groups by each rank's own group count, so those can deadlock).
        """
        kvp = self.layout.kvp
        batch, heads, d = out.shape
        o = out.view(batch, kvp, heads // kvp, d).transpose(0, 1).contiguous()
        l = lse.view(batch, kvp, heads // kvp, 1).transpose(0, 1).contiguous()
        send = torch.cat([o.view(torch.uint8), l.view(torch.uint8)], dim=-1)
        recv = torch.empty_like(send)
        splits = [send[0].numel() if peer else 0 for peer in self.in_slice]
        # Ranks are kvp_index * tp + tp_index, so the slice's chunks come in KVP order.
        dist.all_to_all_single(recv.view(-1), send.view(-1), splits, splits, group=self.group)
        self.bytes_sent += sum(splits) - splits[self.rank]
        width = d * out.element_size()
        outs = recv[..., :width].contiguous().view(out.dtype)  # [KVP, B, H/N, d]
        lses = recv[..., width:].contiguous().view(torch.float32).squeeze(-1)
        return combine_partials(outs, lses)[0]

    def _reduce(self, partial):
        if self.layout.world == 1:  # as one device: no collective call
            return partial
        dist.all_reduce(partial, group=self.group)
        self.reduced_bytes += partial.numel() * partial.element_size()
        return partial


def run_ranks(
    world_size: int, fn: Callable[..., object], *args, device: str = "cpu", timeout_s: int = 300
) -> list[object]:
    """Run ``fn(*args)`` on ``world_size`` new processes joined in the default process group
    (gloo on CPU, NCCL with one GPU per rank on CUDA); return each rank's result, by rank.

    A rank stands for a device, so each runs torch with one thread. The first failing rank's
    traceback is raised here and the other ranks are stopped.
    """
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            _rank_main,
            args=(world_size, tmp, device, timeout_s, fn, args),
            nprocs=world_size,
            start_method="spawn" if device == "cuda" else "fork",
        )
        return [torch.load(Path(tmp) / f"{r}.pt", weights_only=False) for r in range(world_size)]


def _rank_main(rank, world_size, tmp, device, timeout_s, fn, args) -> None:
    torch.set_num_threads(1)
    if device == "cuda":
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if device == "cuda" else "gloo",
        init_method=f"file://{tmp}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    try:
        torch.save(fn(*args), Path(tmp) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()
