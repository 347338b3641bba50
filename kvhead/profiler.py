"""``kvhead profile``: measure each KV head's stability offline and save a head profile.

The driver decodes greedily in ``quest`` mode (every head reranks every step, all pages
resident) on long corpus windows and feeds each step's top-K sets to a
:class:`StabilityAccumulator`. Prompts are drawn with a seeded generator, so a fixed seed gives
the same profile.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pydantic import BaseModel, Field

from kvhead.evaluation.inputs import corpus_window
from kvhead.evaluation.tasks import greedy, prefill
from kvhead.policy import LayerSelection
from kvhead.runner import ReferenceRunner
from kvhead.stability import HeadProfile, StabilityAccumulator, model_fingerprint


class ProfileConfig(BaseModel):
    """What ``kvhead profile`` measures; every field is a CLI option."""

    num_prompts: int = Field(default=3, gt=0, description="Corpus windows to decode from.")
    context: int = Field(default=4096, ge=64, description="Prompt length in tokens.")
    decode_steps: int = Field(default=97, ge=2, description="Greedy steps per prompt.")
    top_k: int = Field(default=64, gt=0, description="Pages per top-K set.")
    page_size: int = Field(default=16, gt=0, description="Tokens per page.")
    window: int = Field(default=16, ge=2, description="Steps per RCO window (rerank interval R).")
    unstable_fraction: float = Field(default=0.25, ge=0, le=1, description="Heads marked unstable.")
    per_layer: bool = Field(default=False, description="Same unstable count in every layer.")
    seed: int = Field(default=0, description="Seeds the choice of corpus windows.")


def profile_heads(
    runner: ReferenceRunner, tokenizer, model_dir: str | Path, cfg: ProfileConfig,
) -> HeadProfile:
    if cfg.page_size != runner.spec.page_size:
        raise ValueError(f"runner pages hold {runner.spec.page_size} tokens, config says {cfg.page_size}")
    acc = StabilityAccumulator(runner.num_layers, runner.spec.num_kv_heads, cfg.top_k, cfg.window)
    policy = runner.policy("quest", top_k=cfg.top_k)

    def observe(layer: int, sel: LayerSelection) -> None:
        acc.observe(layer, sel.top_k_ids[0], int(sel.num_pages[0]))

    rng = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.num_prompts):
        offset = int(torch.randint(0, 1 << 20, (1,), generator=rng))
        pre = prefill(runner, corpus_window(tokenizer, cfg.context, offset), cfg.decode_steps)
        acc.reset_sequence()
        greedy(runner, pre, cfg.decode_steps, policy, observer=observe)
    return HeadProfile.from_scores(
        acc.instability(), fraction=cfg.unstable_fraction, per_layer=cfg.per_layer,
        model_fingerprint=model_fingerprint(model_dir), page_size=cfg.page_size,
        top_k=cfg.top_k, window=cfg.window,
    )


def save_heatmap(profile: HeadProfile, path: str | Path, title: str) -> Path:
    """PNG heatmap (layer x kv head) of instability; unstable heads are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = profile.instability_tensor()
    fig, ax = plt.subplots(figsize=(2 + 0.6 * profile.num_kv_heads, 1.5 + 0.22 * profile.num_layers))
    image = ax.imshow(scores.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=1)
    for layer, head in profile.unstable:
        ax.add_patch(plt.Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False, ec="red", lw=1.5))
    ax.set_xlabel("KV head")
    ax.set_ylabel("layer")
    ax.set_xticks(range(profile.num_kv_heads))
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="instability = 1 - mean RCO")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
