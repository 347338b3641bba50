"""Online head stability: the profile's RCO measured again from the reranks a server does anyway.

A stable head reranks every R steps of a request. Comparing each rerank's top-K set with the
same request's previous one gives the random-corrected overlap of
:func:`kvhead.core.stability.random_corrected_overlap` at lag R, for free. The profile averages
lags 1..R-1 inside a window instead, so online values sit somewhat lower for every head; the
ranking of heads is what carries over (docs/serving.md reports the Spearman correlation).

Drift guard: a head whose smoothed online RCO stays below its profile's expectation by more
than ``margin`` for ``patience`` consecutive reranks is *drifted*: its traffic no longer looks
like the calibration data, so its top-K set may be missing mass. The guard counts and reports
it (and clears it with hysteresis); acting on it is the engine's choice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kvhead.core.pages import page_mask
from kvhead.core.stability import random_corrected_overlap


@dataclass(frozen=True)
class DriftGuard:
    """When a head counts as drifted (defaults measured in docs/serving.md)."""

    margin: float = 0.35  # EMA of RCO below the profile's expected RCO by more than this
    patience: int = 32  # ...for this many consecutive reranks of the head
    alpha: float = 0.05  # EMA weight of one rerank
    warmup: int = 32  # reranks observed before the guard judges a head


@dataclass
class OnlineStability:
    """Per-head running RCO of one layer's stable heads (``expected`` = 1 - profile instability,
    NaN where the profile never measured the head: such heads are never judged)."""

    expected: torch.Tensor  # [S] float64
    guard: DriftGuard = field(default_factory=DriftGuard)

    def __post_init__(self) -> None:
        n = self.expected.shape[0]
        self.rco_sum = torch.zeros(n, dtype=torch.float64)  # cumulative (Prometheus counters)
        self.observations = torch.zeros(n, dtype=torch.int64)
        self.ema = torch.full((n,), float("nan"), dtype=torch.float64)
        self.streak = torch.zeros(n, dtype=torch.int64)
        self.drifted = torch.zeros(n, dtype=torch.bool)
        self.drift_events = torch.zeros(n, dtype=torch.int64)

    def observe(
        self,
        previous: torch.Tensor,
        current: torch.Tensor,
        num_pages: torch.Tensor,
        budgets: torch.Tensor,
    ) -> torch.Tensor:
        """Account reranks of B rows: ``previous``/``current`` ``[B, S, W]`` page ids (-1 pads)
        of the same requests, ``num_pages [B]`` at this rerank, ``budgets [S]`` the top-K size
        of each head. Rows where a head's set holds every page carry no information and are
        skipped. Returns the heads that became drifted now (bool ``[S]``).
        """
        width = int(num_pages.max()) if num_pages.numel() else 0
        if width == 0:
            return torch.zeros_like(self.drifted)
        rows, heads = current.shape[:2]
        old = page_mask(previous.reshape(rows * heads, 1, -1), width).view(rows, heads, width)
        new = page_mask(current.reshape(rows * heads, 1, -1), width).view(rows, heads, width)
        overlap = (old & new).sum(-1)  # [B, S]
        k = budgets.view(1, -1).expand(rows, -1)
        n = num_pages.view(-1, 1).expand(-1, heads)
        informative = (k < n) & old.any(-1)
        rco = torch.where(informative, random_corrected_overlap(overlap, k, n).double(), 0.0)
        counts = informative.sum(0)
        self.rco_sum += rco.sum(0)
        self.observations += counts
        return self._judge(rco, informative)

    def _judge(self, rco: torch.Tensor, informative: torch.Tensor) -> torch.Tensor:
        g = self.guard
        for row in range(rco.shape[0]):  # EMA and streaks advance one rerank at a time
            seen = informative[row]
            value = rco[row]
            first = seen & self.ema.isnan()
            self.ema = torch.where(first, value, self.ema)
            step = seen & ~first
            self.ema = torch.where(step, (1 - g.alpha) * self.ema + g.alpha * value, self.ema)
            low = self.ema < self.expected - g.margin
            self.streak = torch.where(seen, torch.where(low, self.streak + 1, 0), self.streak)
        judged = (self.observations >= g.warmup) & ~self.expected.isnan()
        now = judged & (self.streak >= g.patience) & ~self.drifted
        recovered = self.drifted & (self.ema >= self.expected - g.margin / 2)
        self.drifted = (self.drifted | now) & ~recovered
        self.drift_events += now.long()
        return now

    def instability(self) -> torch.Tensor:
        """1 - mean online RCO per head over everything observed (NaN before any rerank)."""
        mean = self.rco_sum / self.observations.clamp_min(1)
        return torch.where(self.observations > 0, 1 - mean, torch.nan)
