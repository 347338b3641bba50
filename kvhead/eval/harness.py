"""``kvhead eval``: accuracy of quest and flexicache against dense, per context length.

The modes are the spec's ``quest`` and ``flexicache`` and, on request, ``quest+`` and
``flexicache+``: the same policies with the selection options of :class:`SelectionOptions`
(sink/window pages, dense leading layers, softmax group scores, bound weights, summary tokens for
skipped pages, unstable heads attending densely, head-adaptive page budgets from the profile's
coverage calibration).

Per context length, for each sparse mode, following DESIGN.md's agreed definitions:
token agreement (teacher-forced on dense's greedy continuation), free-running match (first
divergence and identical share), perplexity ratio on held-out corpus text, passkey accuracy,
and the resident-page fraction with promoted pages per rerank over all of that mode's decode steps.
With ``prompts > 1`` agreement and perplexity pool several corpus windows per context (each
window's own numbers are kept too); the agreement's binomial standard error says how far one run's
number can be trusted, and the mean KL to dense ranks settings whose agreements tie.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable

import torch
from pydantic import BaseModel, Field, field_validator, model_validator

from kvhead.core.budgets import allocate_residency
from kvhead.core.options import (
    SPEC_RERANK_INTERVAL,
    SPEC_TOP_K,
    SelectionOptions,
    matching_coverage,
    page_budgets,
)
from kvhead.core.policy import Mode, SelectionPolicy
from kvhead.core.stability import HeadProfile
from kvhead.eval.inputs import Corpus, corpus_window, passkey_prompt
from kvhead.eval.runner import ReferenceRunner
from kvhead.eval.tasks import first_divergence, greedy, prefill, teacher_forced

SPEC_MODES = ("quest", "flexicache")
EXTRA_MODES = ("quest+", "flexicache+")
PASSKEY_TOKENS = 8  # enough for a five-digit answer under any tokenizer


class EvalConfig(BaseModel):
    """What ``kvhead eval`` measures; every field is a CLI option."""

    contexts: list[int] = Field(
        default=[2048, 4096, 8192],
        description="Sequence lengths in tokens: prompt plus generated tokens fit in each.",
    )
    gen_tokens: int = Field(default=256, ge=2, description="Tokens generated / teacher-forced.")
    top_k: int = Field(default=SPEC_TOP_K, gt=0, description="Pages per head's top-K set.")
    page_size: int = Field(default=16, gt=0, description="Tokens per page.")
    rerank_interval: int = Field(
        default=SPEC_RERANK_INTERVAL, gt=0, description="Stable heads rerank every R steps."
    )
    passkey_depths: list[float] = Field(
        default=[0.1, 0.3, 0.5, 0.7, 0.9], description="Needle positions as prompt fractions."
    )
    seed: int = Field(default=0, description="Seeds passkeys and text offsets.")
    prompts: int = Field(
        default=1, gt=0, description="Corpus windows per context for agreement and perplexity."
    )
    first_window: int = Field(
        default=0,
        ge=0,
        description="Index of the first corpus window: a later run can add windows to an earlier "
        "one's without repeating them (window i's text depends only on i, seed and context).",
    )
    modes: list[str] = Field(
        default=list(SPEC_MODES), description="Sparse modes to compare with dense, in order."
    )
    corpus: Corpus = Field(
        default="licenses",
        description="Text the agreement and perplexity windows are cut from (kvhead.eval.inputs).",
    )
    options: SelectionOptions = Field(
        default_factory=SelectionOptions, description="Selection options of the + modes."
    )

    @model_validator(mode="after")
    def _options_fit(self) -> EvalConfig:
        """Options only act in the ``+`` modes: given without one they would be silently ignored."""
        opt = self.options
        every_mode = {"top_k", "rerank_interval"}  # K and R: this config's own fields
        if opt.model_dump(exclude=every_mode) != SelectionOptions().model_dump(
            exclude=every_mode
        ) and not any(m in EXTRA_MODES for m in self.modes):
            raise ValueError(
                f"selection options apply only to the modes {EXTRA_MODES}; add one to modes"
            )
        if (
            opt.unstable_dense or opt.rerank_lag or opt.unstable_heads is not None
        ) and "flexicache+" not in self.modes:
            raise ValueError(
                "act only in flexicache+ (add it to modes): "
                "unstable_dense, unstable_heads, rerank_lag"
            )
        if opt.unstable_heads is not None and opt.dense_heads == "coverage":
            raise ValueError(
                "unstable_heads counts the profile's dense heads; "
                "dense_heads=coverage chooses its own"
            )
        if opt.dense_heads == "coverage" and not (
            "flexicache+" in self.modes
            and opt.unstable_dense
            and opt.head_budgets
            and opt.leading_layers == 0
        ):
            raise ValueError(
                "dense_heads=coverage chooses flexicache+'s dense heads and budgets together: "
                "it needs "
                "flexicache+ in modes, unstable_dense and head_budgets, and no leading_layers"
            )
        if opt.sink_pages + opt.recent_pages > self.top_k:
            raise ValueError(
                f"sink_pages + recent_pages ({opt.sink_pages} + {opt.recent_pages}) must fit in "
                f"top_k ({self.top_k})"
            )
        return self

    @field_validator("modes")
    @classmethod
    def _known_modes(cls, value: list[str]) -> list[str]:
        unknown = [m for m in value if m not in SPEC_MODES + EXTRA_MODES]
        if not value or unknown or len(set(value)) != len(value):
            raise ValueError(
                f"modes must be distinct names from {SPEC_MODES + EXTRA_MODES}, got {value}"
            )
        return value

    @field_validator("contexts")
    @classmethod
    def _positive_contexts(cls, value: list[int]) -> list[int]:
        if not value or any(c < 64 for c in value):
            raise ValueError("contexts must be a non-empty list of lengths >= 64 tokens")
        return value

    def prompt_tokens(self, context: int) -> int:
        """Prompt length that leaves room for the generated tokens inside ``context``."""
        if context <= self.gen_tokens + 32:
            raise ValueError(
                f"context {context} leaves no room for a prompt and {self.gen_tokens} tokens"
            )
        return context - self.gen_tokens

    @field_validator("passkey_depths")
    @classmethod
    def _depths_in_range(cls, value: list[float]) -> list[float]:
        if any(not 0 <= d <= 1 for d in value):
            raise ValueError("passkey depths must lie in [0, 1]")
        return value


class ModeResult(BaseModel):
    token_agreement: float = Field(description="Teacher-forced argmax agreement with dense.")
    free_match: float = Field(description="Share of identical tokens when decoding freely.")
    first_divergence: int = Field(description="First position where free decoding differs.")
    perplexity: float
    perplexity_ratio: float = Field(description="Perplexity / dense perplexity.")
    passkey_accuracy: float
    resident_fraction: float = Field(description="Device-resident share of KV pages.")
    promoted_per_rerank: float = Field(description="Pages fetched per stable-head rerank.")
    scored_tokens: int = Field(description="Teacher-forced positions behind the agreement.")
    agreement_stderr: float = Field(description="Binomial standard error of the agreement.")
    window_agreement: list[float] = Field(
        description="Token agreement of each corpus window, in order."
    )
    window_perplexity_ratio: list[float] = Field(
        description="Perplexity ratio of each window, in order."
    )
    mean_kl: float = Field(
        description="Mean KL(dense || sparse) per position of the teacher-forced continuation: "
        "compares settings far more finely than agreement, whose 256 tokens flip only at near-ties."
    )
    window_kl: list[float] = Field(description="Mean KL to dense of each window, in order.")
    miss_margins: list[float] = Field(
        description="Dense top-2 log-probability margin at each agreement miss (small: a near-tie)."
    )


class ContextResult(BaseModel):
    context: int
    dense_perplexity: float
    dense_passkey_accuracy: float
    modes: dict[str, ModeResult]
    seconds: float


class EvalReport(BaseModel):
    model: str
    model_fingerprint: str
    config: EvalConfig
    unstable_fraction: float
    device: str = Field(default="cpu", description="torch device the runner decoded on.")
    coverage: dict | None = Field(
        default=None,
        description="The profile's coverage calibration (curves left out) that set "
        "head budgets: which context and corpus windows the budgets were fitted on.",
    )
    dense_heads: list[list[int]] | None = Field(
        default=None, description="(layer, kv head) of the dense heads dense_heads=coverage chose."
    )
    load_average: list[float] = Field(
        default_factory=list, description="Host 1/5/15-minute load when the run ended."
    )
    results: list[ContextResult]


def _policy(
    runner: ReferenceRunner, mode: str, cfg: EvalConfig, profile: HeadProfile
) -> SelectionPolicy:
    """The policy of a mode name; ``+`` modes carry ``cfg.options``."""
    base = Mode(mode.rstrip("+"))
    kwargs = {"top_k": cfg.top_k, "rerank_interval": cfg.rerank_interval}
    if mode.endswith("+"):
        opt = cfg.options
        kwargs |= {
            "sink_pages": opt.sink_pages,
            "recent_pages": opt.recent_pages,
            "group_score": opt.group_score,
            "bound_weight": opt.bound_weight,
            "compensate": opt.compensate,
        }
        if base is Mode.flexicache and opt.dense_heads == "coverage":
            dense, budgets = coverage_dense_heads(profile, cfg)
            return runner.policy(
                base,
                **kwargs,
                unstable=dense,
                unstable_dense=True,
                rerank_lag=opt.rerank_lag,
                head_top_k=budgets,
            )
        if base is Mode.flexicache:
            unstable = profile.unstable_mask(opt.leading_layers, opt.unstable_heads)
            return runner.policy(
                base,
                **kwargs,
                unstable=unstable,
                unstable_dense=opt.unstable_dense,
                rerank_lag=opt.rerank_lag,
                head_top_k=page_budgets(profile, opt, ~unstable, cfg.top_k),
            )
        sparse = torch.ones(profile.num_layers, profile.num_kv_heads, dtype=torch.bool)
        sparse[: opt.leading_layers] = False
        kwargs |= {
            "dense_layers": opt.leading_layers,
            "head_top_k": page_budgets(profile, opt, sparse, cfg.top_k),
        }
    elif base is Mode.flexicache:
        kwargs["unstable"] = profile.unstable_mask()
    return runner.policy(base, **kwargs)


def coverage_dense_heads(
    profile: HeadProfile, cfg: EvalConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``dense_heads=coverage``: dense heads and budgets for no more resident pages than the
    profile's unstable set (every page) plus ``top_k`` per other head, counted where decoding at
    the calibration context starts (fewer dense heads than the profile's hold more pages the
    shorter the sequence, so that is where the pools must match)."""
    cov = matching_coverage(profile, cfg.options)
    if cov.rerank_interval != cfg.rerank_interval:
        raise ValueError(
            "dense_heads=coverage needs coverage ranked every "
            f"{cfg.rerank_interval} steps, as stable "
            f"heads rerank; the profile's was ranked every {cov.rerank_interval} "
            "(kvhead coverage --rerank-interval)"
        )
    start, pool = profile_pool(profile, cov.context, cfg.gen_tokens, cfg.top_k)
    return allocate_residency(cov, pool, dense_pages=start)


def profile_pool(
    profile: HeadProfile, context: int, gen_tokens: int, top_k: int
) -> tuple[int, int]:
    """``(pages a dense head holds, resident pages)`` where decoding of a ``context``-token
    sequence starts, with the profile's unstable set dense and ``top_k`` pages per other head:
    the residency other splits of dense and stable heads are sized to match."""
    heads = profile.num_layers * profile.num_kv_heads
    start = -(-max(context - gen_tokens, 1) // profile.page_size)
    return start, len(profile.unstable) * start + (heads - len(profile.unstable)) * top_k


def _margin(logprobs: torch.Tensor) -> float:
    """Gap between the two most likely tokens (log-probabilities differ as logits do)."""
    top = logprobs.topk(2).values
    return float(top[0] - top[1])


def _passkey_correct(runner, tokenizer, pre, policy, passkey: int) -> bool:
    answer = tokenizer.decode(greedy(runner, pre, PASSKEY_TOKENS, policy))
    digits = "".join(ch for ch in answer if ch.isdigit() or ch == " ").split()
    return bool(digits) and digits[0] == str(passkey)


def evaluate_context(
    runner: ReferenceRunner,
    tokenizer,
    profile: HeadProfile,
    cfg: EvalConfig,
    context: int,
) -> ContextResult:
    """All metrics for one prompt length; prefills are dense and shared by every mode."""
    start = time.perf_counter()
    gen = cfg.gen_tokens
    dense = _policy(runner, Mode.dense.value, cfg, profile)
    sparse = {m: _policy(runner, m, cfg, profile) for m in cfg.modes}

    length = cfg.prompt_tokens(context)
    free, first = {m: 0 for m in sparse}, {m: gen for m in sparse}
    agree: dict[str, list[int]] = {m: [] for m in sparse}  # matches per window
    kl: dict[str, list[float]] = {m: [] for m in sparse}  # mean KL to dense per window
    margins: dict[str, list[float]] = {m: [] for m in sparse}  # dense top-2 margin at each miss
    nll: dict[str, list[float]] = {m: [] for m in ("dense", *sparse)}  # summed NLL per window
    for i in range(cfg.first_window, cfg.first_window + cfg.prompts):
        # Window 0 is the one every earlier report used; more windows step through the corpus.
        prompt = corpus_window(
            tokenizer, length, offset=cfg.seed * 997 + i * 7919, corpus=cfg.corpus
        )
        pre = prefill(runner, prompt, gen)
        dense_logprobs: list[torch.Tensor] = []
        reference = greedy(runner, pre, gen, dense, logprobs=dense_logprobs)
        for mode, policy in sparse.items():
            forced = teacher_forced(runner, pre, reference, policy, reference=dense_logprobs)
            hits = [a == r for a, r in zip(forced.argmax, reference)]
            agree[mode].append(sum(hits))
            kl[mode].append(sum(forced.kl) / gen)
            margins[mode] += [_margin(dense_logprobs[j]) for j, hit in enumerate(hits) if not hit]
            decoded = greedy(runner, pre, gen, policy)
            free[mode] += sum(a == b for a, b in zip(decoded, reference))
            first[mode] = min(first[mode], first_divergence(decoded, reference))

        text = corpus_window(
            tokenizer, context, offset=context * 3 + cfg.seed * 131 + i * 6007, corpus=cfg.corpus
        )
        pre = prefill(runner, text[:length], gen)
        targets = text[length:].tolist()
        for mode, policy in [("dense", dense), *sparse.items()]:
            nll[mode].append(sum(teacher_forced(runner, pre, targets, policy).nll))
    scored = gen * cfg.prompts
    mean_nll = {mode: sum(sums) / scored for mode, sums in nll.items()}

    rng = torch.Generator().manual_seed(cfg.seed + context)
    hits = {m: 0 for m in ("dense", *cfg.modes)}
    for depth in cfg.passkey_depths:
        passkey = int(torch.randint(10_000, 100_000, (1,), generator=rng))
        pre = prefill(
            runner,
            passkey_prompt(tokenizer, context - PASSKEY_TOKENS, depth, passkey),
            PASSKEY_TOKENS,
        )
        for mode, policy in [("dense", dense), *sparse.items()]:
            hits[mode] += _passkey_correct(runner, tokenizer, pre, policy, passkey)
    depths = len(cfg.passkey_depths)

    modes = {}
    for mode, policy in sparse.items():
        agreement = sum(agree[mode]) / scored
        modes[mode] = ModeResult(
            token_agreement=agreement,
            free_match=free[mode] / scored,
            first_divergence=first[mode],
            perplexity=math.exp(mean_nll[mode]),
            perplexity_ratio=math.exp(mean_nll[mode] - mean_nll["dense"]),
            passkey_accuracy=hits[mode] / depths if depths else float("nan"),
            resident_fraction=policy.stats.resident_fraction,
            promoted_per_rerank=policy.stats.promoted_per_rerank,
            scored_tokens=scored,
            agreement_stderr=math.sqrt(agreement * (1 - agreement) / scored),
            window_agreement=[n / gen for n in agree[mode]],
            window_perplexity_ratio=[
                math.exp((s - d) / gen) for s, d in zip(nll[mode], nll["dense"])
            ],
            mean_kl=sum(kl[mode]) / cfg.prompts,
            window_kl=kl[mode],
            miss_margins=[round(m, 4) for m in margins[mode]],
        )
    return ContextResult(
        context=context,
        dense_perplexity=math.exp(mean_nll["dense"]),
        dense_passkey_accuracy=hits["dense"] / depths if depths else float("nan"),
        modes=modes,
        seconds=time.perf_counter() - start,
    )


def evaluate(
    runner: ReferenceRunner,
    tokenizer,
    profile: HeadProfile,
    cfg: EvalConfig,
    *,
    model: str,
    on_context: Callable[[EvalReport], None] | None = None,
) -> EvalReport:
    """Every context of ``cfg``; ``on_context`` sees the report so far after each one (so a run
    cut short still leaves the contexts it finished)."""
    if cfg.options.leading_layers > runner.num_layers:
        raise ValueError(
            f"leading_layers {cfg.options.leading_layers} exceeds the model's "
            f"{runner.num_layers} layers"
        )
    report = EvalReport(
        model=model,
        model_fingerprint=profile.model_fingerprint,
        config=cfg,
        unstable_fraction=len(profile.unstable) / (profile.num_layers * profile.num_kv_heads),
        device=str(runner.device),
        results=[],
        coverage=profile.coverage.model_dump(exclude={"mass"})
        if cfg.options.head_budgets and profile.coverage is not None
        else None,
        dense_heads=coverage_dense_heads(profile, cfg)[0].nonzero().tolist()
        if cfg.options.dense_heads == "coverage"
        else None,
    )
    for context in cfg.contexts:
        report.results.append(evaluate_context(runner, tokenizer, profile, cfg, context))
        report.load_average = [round(x, 2) for x in os.getloadavg()]
        if on_context is not None:
            on_context(report)
    return report
