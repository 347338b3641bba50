"""Llama decoder-layer weights and math for the Helix reference decode (:mod:`kvhead.eval.helix`).

Whole layers, a Helix rank's shard of one (:func:`shard_layer`: q/k/v rows of its TP slice, the
output-projection columns of the query heads it owns, a 1/N slice of the MLP) and a whole model
loaded from a Hugging Face folder (:class:`Llama`), in the names and ``[out, in]`` layouts that
folder uses, so the reference reads real checkpoints without a model library.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file

from kvhead.core.helix import HelixLayout

if TYPE_CHECKING:
    from kvhead.eval.helix import Decoder


@dataclass(frozen=True)
class BlockShape:
    """Geometry of a Llama decoder layer."""

    hidden: int
    intermediate: int
    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    eps: float = 1e-6


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer, Hugging Face names and ``[out, in]`` layouts; whole or a rank's shard."""

    input_layernorm: torch.Tensor
    q_proj: torch.Tensor
    k_proj: torch.Tensor
    v_proj: torch.Tensor
    o_proj: torch.Tensor
    post_attention_layernorm: torch.Tensor
    gate_proj: torch.Tensor
    up_proj: torch.Tensor
    down_proj: torch.Tensor

    def to(self, device: torch.device) -> LayerWeights:
        return LayerWeights(*(getattr(self, f.name).to(device) for f in fields(self)))


def random_layer(
    shape: BlockShape, seed: int, dtype: torch.dtype = torch.float32, std: float = 0.02
) -> LayerWeights:
    """N(0, std) projections and N(1, 0.1) norms from a seeded generator (same on every rank).

    Tests raise ``std``: tiny models with Llama's 0.02 attend almost uniformly, where a wrong
    combine weight hardly shows."""
    gen = torch.Generator().manual_seed(seed)
    h, d = shape.hidden, shape.head_dim

    def normal(*size: int, mean: float = 0.0, std: float = std) -> torch.Tensor:
        return (mean + std * torch.randn(*size, generator=gen)).to(dtype)

    return LayerWeights(
        input_layernorm=normal(h, mean=1.0, std=0.1),
        q_proj=normal(shape.num_q_heads * d, h),
        k_proj=normal(shape.num_kv_heads * d, h),
        v_proj=normal(shape.num_kv_heads * d, h),
        o_proj=normal(h, shape.num_q_heads * d),
        post_attention_layernorm=normal(h, mean=1.0, std=0.1),
        gate_proj=normal(shape.intermediate, h),
        up_proj=normal(shape.intermediate, h),
        down_proj=normal(h, shape.intermediate),
    )


def shard_layer(w: LayerWeights, shape: BlockShape, layout: HelixLayout, rank: int) -> LayerWeights:
    """The rank's part: q/k/v rows of its TP slice, o columns of the query heads it owns after
    the all-to-all, a 1/N slice of the MLP's intermediate units; norms are replicated."""
    if shape.intermediate % layout.world:
        raise ValueError(f"intermediate {shape.intermediate} must split over {layout.world} ranks")
    d = shape.head_dim

    def rows(heads: range) -> slice:
        return slice(heads.start * d, heads.stop * d)

    units = shape.intermediate // layout.world
    mlp = slice(rank * units, (rank + 1) * units)
    owned = rows(layout.owned_q_heads(shape.num_q_heads, rank))
    kv = rows(layout.kv_heads(shape.num_kv_heads, rank))
    return replace(
        w,
        q_proj=w.q_proj[rows(layout.slice_q_heads(shape.num_q_heads, rank))],
        k_proj=w.k_proj[kv],
        v_proj=w.v_proj[kv],
        o_proj=w.o_proj[:, owned],
        gate_proj=w.gate_proj[mlp],
        up_proj=w.up_proj[mlp],
        down_proj=w.down_proj[:, mlp],
    )


@dataclass(frozen=True)
class Llama:
    """A whole Llama-family model as layers plus tied embeddings (what the tiny test models are)."""

    shape: BlockShape
    layers: list[LayerWeights]
    embed: torch.Tensor  # [vocab, hidden], also the LM head
    norm: torch.Tensor

    @classmethod
    def load(cls, model_dir: str | Path) -> Llama:
        """From a folder with ``config.json`` and one ``model.safetensors`` (no sharded files)."""
        folder = Path(model_dir)
        cfg = json.loads((folder / "config.json").read_text())
        tensors = load_file(str(folder / "model.safetensors"))
        rope = cfg.get("rope_parameters") or {"rope_theta": cfg.get("rope_theta", 10000.0)}
        shape = BlockShape(
            hidden=cfg["hidden_size"],
            intermediate=cfg["intermediate_size"],
            num_q_heads=cfg["num_attention_heads"],
            num_kv_heads=cfg["num_key_value_heads"],
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"],
            rope_theta=rope["rope_theta"],
            eps=cfg["rms_norm_eps"],
        )
        names = {f.name: f.name for f in fields(LayerWeights)}
        names |= {n: f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        names |= {n: f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}
        layers = [
            LayerWeights(**{k: tensors[f"model.layers.{i}.{n}.weight"] for k, n in names.items()})
            for i in range(cfg["num_hidden_layers"])
        ]
        embed, norm = tensors["model.embed_tokens.weight"], tensors["model.norm.weight"]
        return cls(shape, layers, embed, norm)

    def logits(self, decoder: Decoder, token_ids: torch.Tensor) -> torch.Tensor:
        """Decode one token per sequence (``token_ids [B]``) and return fp32 logits ``[B, V]``."""
        embed = self.embed.to(decoder.device)
        hidden = decoder.step(embed[token_ids.to(decoder.device)])
        return (rms_norm(hidden, self.norm.to(hidden.device), self.shape.eps) @ embed.T).float()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    return weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Llama's rotary embedding (rotate-half form) of ``x [B, H, d]`` at ``positions [B]``."""
    d = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, device=x.device).float() / d)
    angles = positions.float().unsqueeze(-1) * inv_freq  # [B, d/2]
    cos = torch.cat([angles, angles], -1).cos().unsqueeze(1).to(x.dtype)
    sin = torch.cat([angles, angles], -1).sin().unsqueeze(1).to(x.dtype)
    half = torch.cat([-x[..., d // 2 :], x[..., : d // 2]], -1)
    return x * cos + half * sin
