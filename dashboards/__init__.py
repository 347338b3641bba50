"""Grafana dashboards of a kvhead deployment, as code: specs, Grafana JSON, push and snapshots.

Dependency rule: builds on grafana-foundation-sdk, grafana-client and matplotlib; imports
nothing of kvhead's serving stack (the metric names it queries are checked against the
exporters by the tests), and only the CLI imports it.
"""

from dashboards.promql import PanelQuery, expand, queries

__all__ = ["PanelQuery", "expand", "queries"]
