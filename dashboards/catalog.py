"""The dashboards kvhead ships, in the order Grafana lists them (no Grafana SDK needed here, so
snapshots and the query list work without the ``ops`` extra)."""

from __future__ import annotations

from dashboards.heads import HEADS_DASHBOARD
from dashboards.serving import SERVING
from dashboards.spec import Dashboard
from dashboards.tiers import TIERS_DASHBOARD

DASHBOARDS: tuple[Dashboard, ...] = (SERVING, HEADS_DASHBOARD, TIERS_DASHBOARD)
