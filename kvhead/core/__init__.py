"""The engine-agnostic core: what FlexiCache, Helix and the tiers compute, in plain torch.

Page geometry (:mod:`~kvhead.core.spec`), page bounds and scoring (:mod:`~kvhead.core.bounds`,
:mod:`~kvhead.core.pages`), selection policies (:mod:`~kvhead.core.policy`), head budgets,
stability and head profiles, summary tokens, reference attention, the exact log-sum-exp combine
of partial attentions (:mod:`~kvhead.core.combine`) and the selection options every front end
shares (:mod:`~kvhead.core.options`).

Dependency rule: ``kvhead.core`` imports nothing of ours. Everything else builds on it; the
import-layer contracts in ``pyproject.toml`` (checked by the test suite) hold the rule.
"""
