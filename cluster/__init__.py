"""kvhead's cluster actors: the placement actor and what it stands on.

:mod:`~cluster.config` (what users set), :mod:`~cluster.plan` (pure planner and router, no
Ray), :mod:`~cluster.store` (the plan in Redis), :mod:`~cluster.metrics` (``kvhead_*``
placement metrics), :mod:`~cluster.actor` (the named, detached Ray actor).

Dependency rule: the top of the stack beside ``deployments``. It may import ``kvhead.core`` and
``kvstore``; nothing below imports it (import-layer contracts in ``pyproject.toml``). Importing
the package loads no Ray: only :mod:`cluster.actor` does.
"""
