"""Decode procedures shared by every mode: greedy, teacher-forced and passkey answering.

Each starts from a dense prefill that is computed once and shared: the cache is rewound to the
prompt and the policy reset, so modes differ only in how decode steps select pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvhead.core.policy import SelectionPolicy
from kvhead.eval.paged_cache import PagedKVCache
from kvhead.eval.runner import ReferenceRunner, SelectionObserver


@dataclass(frozen=True)
class Prefilled:
    """A prompt already in the cache, with the dense logits that predict its first new token."""

    cache: PagedKVCache
    length: int
    next_logits: torch.Tensor


def prefill(runner: ReferenceRunner, prompt: torch.Tensor, extra_tokens: int) -> Prefilled:
    cache = runner.new_cache(prompt.numel() + extra_tokens)
    logits = runner.forward(cache, prompt)[-1]
    return Prefilled(cache, prompt.numel(), logits)


@dataclass(frozen=True)
class Forced:
    """One teacher-forced pass: per position the argmax, the target's NLL, the KL to a reference."""

    argmax: list[int]
    nll: list[float]
    kl: list[float]  # KL(reference || this run) per position; empty without a reference


def greedy(
    runner: ReferenceRunner,
    pre: Prefilled,
    steps: int,
    policy: SelectionPolicy,
    observer: SelectionObserver | None = None,
    logprobs: list[torch.Tensor] | None = None,
) -> list[int]:
    """Greedy continuation of ``steps`` tokens decoded under ``policy``.

    ``logprobs`` collects the log-softmax that predicted each token: a dense greedy run is its own
    teacher-forced pass, so its distributions serve as the KL reference at no extra cost.
    """
    pre.cache.rewind(pre.length)
    policy.reset()
    logits = pre.next_logits
    out = []
    for i in range(steps):
        if logprobs is not None:
            logprobs.append(torch.log_softmax(logits.float(), dim=-1))
        out.append(int(logits.argmax()))
        if i + 1 < steps:
            logits = runner.forward(
                pre.cache, torch.tensor([out[-1]]), policy=policy, observer=observer
            )[-1]
    return out


def teacher_forced(
    runner: ReferenceRunner,
    pre: Prefilled,
    targets: list[int],
    policy: SelectionPolicy,
    reference: list[torch.Tensor] | None = None,
) -> Forced:
    """Feed ``targets`` one by one: each position's argmax, its target's NLL and, given the
    reference run's log-probabilities per position, KL(reference || this run)."""
    pre.cache.rewind(pre.length)
    policy.reset()
    logits = pre.next_logits
    argmax, nll, kl = [], [], []
    for i, target in enumerate(targets):
        logp = torch.log_softmax(logits.float(), dim=-1)
        argmax.append(int(logits.argmax()))
        nll.append(float(-logp[target]))
        if reference is not None:
            ref = reference[i]
            kl.append(float((ref.exp() * (ref - logp)).sum()))
        if i + 1 < len(targets):
            logits = runner.forward(pre.cache, torch.tensor([target]), policy=policy)[-1]
    return Forced(argmax, nll, kl)


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token, or the common length if none differs."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
