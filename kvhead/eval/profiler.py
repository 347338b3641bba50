"""``kvhead profile``: measure each KV head's stability offline and save a head profile.

The driver decodes greedily in ``quest`` mode (every head reranks every step, all pages
resident) on long corpus windows and feeds each step's top-K sets to a
:class:`StabilityAccumulator`. Prompts are drawn with a seeded generator, so a fixed seed gives
the same profile.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, Field

from kvhead.core.budgets import PageCoverage
from kvhead.core.options import SPEC_TOP_K, SelectionOptions
from kvhead.core.pages import PageBounds, page_sums, score_pages
from kvhead.core.policy import LayerSelection
from kvhead.core.stability import HeadProfile, StabilityAccumulator, model_fingerprint
from kvhead.eval.inputs import Corpus, corpus_window
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner
from kvhead.eval.tasks import greedy, prefill


class ProfileConfig(BaseModel):
    """What ``kvhead profile`` measures; every field is a CLI option."""

    num_prompts: int = Field(default=3, gt=0, description="Corpus windows to decode from.")
    context: int = Field(default=4096, ge=64, description="Prompt length in tokens.")
    decode_steps: int = Field(default=97, ge=2, description="Greedy steps per prompt.")
    top_k: int = Field(default=SPEC_TOP_K, gt=0, description="Pages per top-K set.")
    page_size: int = Field(default=16, gt=0, description="Tokens per page.")
    window: int = Field(default=16, ge=2, description="Steps per RCO window (rerank interval R).")
    unstable_fraction: float = Field(default=0.25, ge=0, le=1, description="Heads marked unstable.")
    per_layer: bool = Field(default=False, description="Same unstable count in every layer.")
    seed: int = Field(default=0, description="Seeds the choice of corpus windows.")


def profile_heads(
    runner: ReferenceRunner,
    tokenizer,
    model_dir: str | Path,
    cfg: ProfileConfig,
) -> HeadProfile:
    if cfg.page_size != runner.spec.page_size:
        raise ValueError(
            f"runner pages hold {runner.spec.page_size} tokens, config says {cfg.page_size}"
        )
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
        acc.instability(),
        fraction=cfg.unstable_fraction,
        per_layer=cfg.per_layer,
        model_fingerprint=model_fingerprint(model_dir),
        page_size=cfg.page_size,
        top_k=cfg.top_k,
        window=cfg.window,
    )


class CoverageConfig(BaseModel):
    """Calibration of head-adaptive budgets (``kvhead profile --coverage``)."""

    offsets: list[int] = Field(
        default=[16384],
        min_length=1,
        description="Corpus token offsets of the calibration windows (in --corpus). The "
        "default window, 16384-24575, is one no default `kvhead eval` window touches (agreement "
        "reads from 0, perplexity 6144-8191, 12288-16383 and 24576 on at 2k/4k/8k), so budgets are "
        "not fitted to the text they are scored on; later license windows (--first-window 2 and 3 "
        "at 8k) do overlap it, python-docs windows never do.",
    )
    corpus: Corpus = Field(
        default="licenses", description="Text the calibration windows are cut from."
    )
    context: int = Field(default=8192, ge=64, description="Sequence length (prompt + steps).")
    steps: int = Field(default=64, gt=0, description="Dense decode steps measured per window.")
    step_pages: int = Field(default=8, gt=0, description="Grid spacing of k in pages.")
    group_score: Literal["max", "softmax"] = Field(
        default="softmax", description="GQA page score ranking the pages."
    )
    sink_pages: int = Field(default=1, ge=0, description="First pages always ranked first.")
    recent_pages: int = Field(default=4, ge=1, description="Newest pages always ranked first.")
    bound_weight: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of the box spread in page scores."
    )
    rerank_interval: int = Field(
        default=1,
        gt=0,
        description="Steps between the rankings the curves are measured with: at R > 1 a step is "
        "scored with the order ranked up to R - 1 steps earlier plus the pages written since, as a "
        "stable head attends, so a head whose top pages drift loses covered mass.",
    )


class _CoverageProbe:
    """Stands in for the dense policy: measures each layer's covered mass, then attends densely."""

    def __init__(
        self, runner: ReferenceRunner, cache: PagedKVCache, cfg: CoverageConfig, grid: list[int]
    ) -> None:
        self.dense = runner.policy("dense")
        self.cache, self.spec, self.cfg = cache, runner.spec, cfg
        self.budgets = torch.tensor(grid)
        self.total = torch.zeros(
            runner.num_layers, runner.spec.num_kv_heads, len(grid), dtype=torch.float64
        )
        self.count = 0  # decode steps measured, all windows
        self.step = 0  # decode steps of the current window
        self.ranked: dict[int, torch.Tensor] = {}  # layer -> [Hkv, pages then] ranking scores

    def reset(self) -> None:
        self.dense.reset()
        self.ranked.clear()
        self.step = 0

    def select(
        self, layer, query, bounds: PageBounds, block_table, seq_lens, live=None
    ) -> LayerSelection:
        if layer == 0:
            self.count += 1
            self.step += 1
        self._measure(layer, query, bounds, block_table, seq_lens)
        return self.dense.select(layer, query, bounds, block_table, seq_lens, live)

    def _measure(self, layer, query, bounds, block_table, seq_lens) -> None:
        spec, cfg, total = self.spec, self.cfg, int(seq_lens[0])
        num_pages = (seq_lens.long() + spec.page_size - 1) // spec.page_size
        width = int(num_pages[0])
        keys, _ = self.cache.keys_values(layer, total)
        q = query[0].float().view(spec.num_kv_heads, -1, spec.head_dim)
        weights = (torch.einsum("hgd,thd->hgt", q, keys.float()) * spec.head_dim**-0.5).softmax(-1)
        mass = page_sums(weights.mean(1), spec.page_size)  # [Hkv, N]
        if (self.step - 1) % cfg.rerank_interval == 0:
            scores = score_pages(
                query,
                bounds,
                block_table[:, :width],
                num_pages,
                group_score=cfg.group_score,
                bound_weight=cfg.bound_weight,
            )[0]
            # forced pages rank first, as the policy keeps them
            pos = torch.arange(width, device=query.device).view(1, -1)
            keep = (pos < cfg.sink_pages) | (pos >= width - cfg.recent_pages)
            self.ranked[layer] = scores.masked_fill(keep, float("inf"))
        self.total[layer] += covered_mass(mass, self.ranked[layer], self.budgets).double().cpu()


def covered_mass(mass: torch.Tensor, ranked: torch.Tensor, budgets: torch.Tensor) -> torch.Tensor:
    """``[H, len(budgets)]`` attention mass a head covers with each budget of pages.

    ``mass`` ``[H, N]`` is this step's true mass per page; ``ranked`` ``[H, N0]`` the page scores
    of the last ranking (N0 <= N: it may be older than this step). A budget of k pages keeps the k
    best-ranked pages plus every page written since the ranking, as a stable head attends between
    reranks; budgets beyond the pages that exist cover everything.
    """
    heads, width = mass.shape
    fresh = width - ranked.shape[-1]
    ranked = torch.cat([ranked, ranked.new_full((heads, fresh), float("inf"))], dim=-1)
    order = ranked.argsort(dim=-1, descending=True, stable=True)
    covered = mass.gather(1, order).cumsum(-1)
    return covered[:, (budgets.to(covered.device) + fresh - 1).clamp(0, width - 1)]


def measure_coverage(runner: ReferenceRunner, tokenizer, cfg: CoverageConfig) -> PageCoverage:
    """Mean attention mass covered by each head's k best-ranked pages, k every ``step_pages``.

    Decoding is dense (the model's own greedy continuation of calibration windows), so the
    curves describe the model, not a sparse run's drift; ranking uses the policy's scoring
    options and rerank interval, so a budget of k pages keeps what the curve says.
    """
    pages = runner.spec.num_pages(cfg.context)
    grid = list(range(cfg.step_pages, pages + 1, cfg.step_pages))
    if not grid:
        raise ValueError(f"context {cfg.context} holds fewer than {cfg.step_pages} pages")
    probe = None
    for offset in cfg.offsets:
        pre = prefill(
            runner,
            corpus_window(tokenizer, cfg.context - cfg.steps, offset, corpus=cfg.corpus),
            cfg.steps,
        )
        if probe is None:
            probe = _CoverageProbe(runner, pre.cache, cfg, grid)
        probe.cache = pre.cache
        greedy(runner, pre, cfg.steps + 1, probe)
    mass = (probe.total / max(probe.count, 1)).clamp_max(1.0)
    return PageCoverage(
        corpus=cfg.corpus,
        context=cfg.context,
        offsets=cfg.offsets,
        steps=cfg.steps,
        group_score=cfg.group_score,
        sink_pages=cfg.sink_pages,
        recent_pages=cfg.recent_pages,
        bound_weight=cfg.bound_weight,
        rerank_interval=cfg.rerank_interval,
        pages=grid,
        mass=[[[round(v, 6) for v in row] for row in layer] for layer in mass.tolist()],
    )


def save_heatmap(profile: HeadProfile, path: str | Path, title: str) -> Path:
    """PNG heatmap (layer x kv head) of instability; unstable heads are outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = profile.instability_tensor()
    fig, ax = plt.subplots(
        figsize=(2 + 0.6 * profile.num_kv_heads, 1.5 + 0.22 * profile.num_layers)
    )
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


def calibrate(
    model_dir: str | Path,
    options: SelectionOptions,
    *,
    page_size: int = 16,
    status: Callable[[str], None] = lambda message: None,
) -> Path:
    """Profile a model that has no head profile yet, with the coverage curves head budgets need,
    and save it where the plugin finds profiles (``KVHEAD_HOME/profiles``, by fingerprint).

    What ``kvhead profile`` then ``kvhead coverage`` do with their defaults, with contexts cut to
    the model's own length and pages ranked as ``options`` rank them (budgets are only valid for
    the ranking their curves measured); ``status`` hears each stage.
    """
    import json

    from transformers import AutoTokenizer

    from kvhead.models.profiles import user_profile_dir

    limit = json.loads((Path(model_dir) / "config.json").read_text())["max_position_embeddings"]
    prof = ProfileConfig(page_size=page_size)
    prof.context = min(prof.context, limit - prof.decode_steps)
    cover = CoverageConfig(
        group_score=options.group_score,
        sink_pages=options.sink_pages,
        recent_pages=options.recent_pages,
        bound_weight=options.bound_weight,
    )
    cover.context = min(cover.context, limit)
    status(f"loading {Path(model_dir).name} for its head profile")
    runner = ReferenceRunner.from_pretrained(model_dir, page_size=page_size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    status(f"profiling head stability: {prof.num_prompts} prompts of {prof.context} tokens")
    profile = profile_heads(runner, tokenizer, model_dir, prof)
    status(f"measuring page coverage for head budgets: {cover.context} tokens")
    profile.coverage = measure_coverage(runner, tokenizer, cover)
    out = user_profile_dir() / f"{Path(model_dir).name}-{profile.model_fingerprint}.json"
    profile.save(out)
    return out
