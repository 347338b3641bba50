"""Decode procedures shared by every mode: greedy, teacher-forced and passkey answering.

Each starts from a dense prefill that is computed once and shared: the cache is rewound to the
prompt and the policy reset, so modes differ only in how decode steps select pages.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvhead.policy import SelectionPolicy
from kvhead.runner import PagedKVCache, ReferenceRunner
from kvhead.runner.hf_runner import SelectionObserver


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


def greedy(
    runner: ReferenceRunner, pre: Prefilled, steps: int, policy: SelectionPolicy,
    observer: SelectionObserver | None = None,
) -> list[int]:
    """Greedy continuation of ``steps`` tokens decoded under ``policy``."""
    pre.cache.rewind(pre.length)
    policy.reset()
    token = int(pre.next_logits.argmax())
    out = [token]
    for _ in range(steps - 1):
        logits = runner.forward(pre.cache, torch.tensor([token]), policy=policy, observer=observer)
        token = int(logits[-1].argmax())
        out.append(token)
    return out


def teacher_forced(
    runner: ReferenceRunner, pre: Prefilled, targets: list[int], policy: SelectionPolicy,
) -> tuple[list[int], list[float]]:
    """Feed ``targets`` one by one; return each position's argmax and the NLL of its target."""
    pre.cache.rewind(pre.length)
    policy.reset()
    logits = pre.next_logits
    argmax, nll = [], []
    for i, target in enumerate(targets):
        argmax.append(int(logits.argmax()))
        nll.append(float(-torch.log_softmax(logits, dim=-1)[target]))
        if i + 1 < len(targets):
            logits = runner.forward(pre.cache, torch.tensor([target]), policy=policy)[-1]
    return argmax, nll


def first_divergence(a: list[int], b: list[int]) -> int:
    """Index of the first differing token, or the common length if none differs."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
