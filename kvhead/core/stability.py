"""Head stability: how much a KV head's top-K page set drifts during decoding.

Per decode window of R steps, each step's top-K set is compared with the window's first. Raw
overlap grows with K/N by chance alone, so it is corrected: with o shared pages out of K among N,
``RCO = (o/K - K/N) / (1 - K/N)``, clamped at 0. Identical sets give 1, independent random sets
give about 0. A head's instability is ``1 - mean RCO``. Comparisons with K >= N carry no
information (every page is selected) and are skipped.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import torch
from pydantic import BaseModel, Field, model_validator

from kvhead.core.budgets import PageCoverage
from kvhead.core.pages import page_mask


def random_corrected_overlap(
    overlap: torch.Tensor, top_k: int | torch.Tensor, num_pages: torch.Tensor
) -> torch.Tensor:
    """RCO of ``overlap`` shared pages between two top-``top_k`` sets out of ``num_pages``
    (``top_k`` may be per element; only ``top_k < num_pages`` gives a meaningful value)."""
    chance = top_k / num_pages.float()
    return ((overlap.float() / top_k - chance) / (1 - chance)).clamp_min(0.0)


class StabilityAccumulator:
    """Collects RCO per (layer, kv head) from the page sets a decode run selects.

    The driver calls :meth:`observe` once per layer per decode step with that step's top-K page
    ids; the accumulator keeps each window's first set and averages the RCO of the rest.
    """

    def __init__(self, num_layers: int, num_kv_heads: int, top_k: int, window: int) -> None:
        if window < 2:
            raise ValueError(f"window must be at least 2 steps, got {window}")
        self.top_k, self.window = top_k, window
        self.rco_sum = torch.zeros(num_layers, num_kv_heads, dtype=torch.float64)
        self.count = torch.zeros(num_layers, num_kv_heads, dtype=torch.int64)
        self._anchor: dict[int, torch.Tensor] = {}
        self._step: dict[int, int] = {}

    def reset_sequence(self) -> None:
        """Forget window anchors (a new prompt starts); accumulated scores stay."""
        self._anchor.clear()
        self._step.clear()

    def observe(self, layer: int, page_ids: torch.Tensor, num_pages: int) -> None:
        """Record one decode step's top-K ``page_ids [Hkv, K]`` for ``layer``."""
        step = self._step.get(layer, 0)
        self._step[layer] = step + 1
        mask = page_mask(page_ids.unsqueeze(0), num_pages)[0]  # [Hkv, N]
        if step % self.window == 0:
            self._anchor[layer] = mask
            return
        if num_pages <= self.top_k:
            return
        anchor = self._anchor[layer]
        overlap = (mask[:, : anchor.shape[1]] & anchor).sum(dim=1)
        rco = random_corrected_overlap(overlap, self.top_k, torch.tensor(num_pages))
        self.rco_sum[layer] += rco.double().cpu()
        self.count[layer] += 1

    def instability(self) -> torch.Tensor:
        """``1 - mean RCO`` per (layer, head); heads never compared score NaN."""
        mean = self.rco_sum / self.count.clamp_min(1)
        return torch.where(self.count > 0, 1 - mean, torch.nan)


class HeadProfile(BaseModel):
    """Offline classification of KV heads into stable and unstable, tied to one model."""

    model_fingerprint: str = Field(description="Hash of the model's config and weights' shapes.")
    num_layers: int = Field(gt=0, description="Decoder layers.")
    num_kv_heads: int = Field(gt=0, description="KV heads per layer.")
    page_size: int = Field(gt=0, description="Tokens per page when profiled.")
    top_k: int = Field(gt=0, description="Pages per top-K set when profiled.")
    window: int = Field(ge=2, description="Decode steps per RCO window (the rerank interval R).")
    instability: list[list[float | None]] = Field(
        description="1 - mean RCO, [layer][kv head]; null where a head was never compared."
    )
    unstable_fraction: float = Field(ge=0, le=1, description="Share of heads marked unstable.")
    unstable: list[tuple[int, int]] = Field(
        description="(layer, kv head) pairs marked unstable, most unstable first."
    )
    per_layer: bool = Field(
        default=False,
        description="Unstable heads were chosen per layer (same count in every layer).",
    )
    coverage: PageCoverage | None = Field(
        default=None,
        description="Calibration of head-adaptive budgets (kvhead.core.budgets); absent: "
        "uniform top-K.",
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> HeadProfile:
        if len(self.instability) != self.num_layers or any(
            len(row) != self.num_kv_heads for row in self.instability
        ):
            raise ValueError("instability must be [num_layers][num_kv_heads]")
        for layer, head in self.unstable:
            if not (0 <= layer < self.num_layers and 0 <= head < self.num_kv_heads):
                raise ValueError(f"unstable head ({layer}, {head}) is out of range")
        cov = self.coverage
        if cov is not None and (len(cov.mass), len(cov.mass[0])) != (
            self.num_layers,
            self.num_kv_heads,
        ):
            raise ValueError("coverage must be [num_layers][num_kv_heads][grid]")
        return self

    @classmethod
    def from_scores(
        cls,
        instability: torch.Tensor,
        *,
        fraction: float,
        per_layer: bool = False,
        **meta,
    ) -> HeadProfile:
        """Rank heads by instability and mark the top ``fraction`` unstable.

        The count rounds down, so the device-resident share never exceeds the request.
        ``per_layer`` marks the same number in every layer, which keeps vLLM's KV spec uniform.
        NaN scores (never measured) rank as most unstable: unknown heads stay resident.
        """
        if not 0 <= fraction <= 1:
            raise ValueError(f"unstable fraction must be in [0, 1], got {fraction}")
        scores = torch.nan_to_num(instability.double(), nan=float("inf"))
        num_layers, num_heads = scores.shape
        if per_layer:
            count = int(fraction * num_heads)
            picked = [
                (layer, int(h))
                for layer in range(num_layers)
                for h in scores[layer].argsort(descending=True, stable=True)[:count]
            ]
            picked.sort(key=lambda lh: -scores[lh[0], lh[1]].item())
        else:
            count = int(fraction * num_layers * num_heads)
            order = scores.flatten().argsort(descending=True, stable=True)[:count]
            picked = [(int(i) // num_heads, int(i) % num_heads) for i in order]
        return cls(
            num_layers=num_layers,
            num_kv_heads=num_heads,
            instability=[
                [None if math.isnan(v) else v for v in row] for row in instability.tolist()
            ],
            unstable_fraction=fraction,
            unstable=picked,
            per_layer=per_layer,
            **meta,
        )

    def instability_tensor(self) -> torch.Tensor:
        """``[num_layers, num_kv_heads]`` float scores, NaN where never measured."""
        return torch.tensor(
            [[float("nan") if v is None else v for v in row] for row in self.instability]
        )

    def unstable_mask(self, leading_layers: int = 0, count: int | None = None) -> torch.Tensor:
        """Boolean ``[num_layers, num_kv_heads]``: True where a head keeps all pages resident.

        ``leading_layers`` marks every head of the first layers unstable inside the same head
        budget (the least unstable of the profile's other picks give way): early layers attend
        broadly, so a top-K set loses much of their mass whatever their page-set drift.
        ``count`` sets that budget (default: the profile's unstable set's size); it can only
        shrink the ranked set, since heads past it were never ranked unstable.
        """
        if not 0 <= leading_layers <= self.num_layers:
            raise ValueError(
                f"leading_layers must be in [0, {self.num_layers}], got {leading_layers}"
            )
        lead = leading_layers * self.num_kv_heads
        if count is not None and not lead <= count <= len(self.unstable):
            raise ValueError(
                f"unstable head count must be in [{lead}, {len(self.unstable)}] "
                "(the leading layers' "
                f"heads up to the profile's unstable set), got {count}"
            )
        mask = torch.zeros(self.num_layers, self.num_kv_heads, dtype=torch.bool)
        mask[:leading_layers] = True
        budget = (len(self.unstable) if count is None else count) - int(mask.sum())
        rest = [(layer, head) for layer, head in self.unstable if layer >= leading_layers]
        for layer, head in rest[: max(budget, 0)]:
            mask[layer, head] = True
        return mask

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> HeadProfile:
        return cls.model_validate_json(Path(path).read_text())


def model_fingerprint(model_dir: str | Path) -> str:
    """Short hash identifying a model folder: architecture fields plus weight-file sizes.

    Both the reference runner and the vLLM plugin see the same folder, so both compute the same
    value without loading weights; a profile taken on another model (or another quantization)
    is refused at start-up.
    """
    model_dir = Path(model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    keys = (
        "model_type",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "hidden_size",
        "head_dim",
        "vocab_size",
        "rope_theta",
        "max_position_embeddings",
    )
    picked: dict = {k: config.get(k) for k in keys}
    picked["weights"] = sorted((p.name, p.stat().st_size) for p in model_dir.glob("*.safetensors"))
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]
