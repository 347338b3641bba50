"""The placement plan in Redis: one JSON value per cluster, replaced whole by compare-and-set.

The key is ``kvhead:placement:<cluster>``; the value is :class:`~cluster.plan.PlacementPlan`
with its schema ``version`` and a ``generation`` that every save bumps. A save WATCHes the key
and writes only if the stored generation is the one this writer last read, so an actor that
lost its name to a newer one (a restart racing an old incarnation) can never overwrite the
newer plan. Unlike the page tier, Redis is a dependency here: an unreachable server raises.
"""

from __future__ import annotations

import json

import redis
from pydantic import ValidationError

from cluster.plan import PLAN_VERSION, PlacementPlan
from kvstore.config import RedisTierConfig

KEY_PREFIX = "kvhead:placement:"


class StoreError(RuntimeError):
    """Redis could not be reached, or holds a plan this code cannot read."""


class StalePlanError(StoreError):
    """Another writer saved a newer plan since this one was read."""


class PlanStore:
    """Loads and saves one cluster's plan."""

    def __init__(self, config: RedisTierConfig, cluster: str) -> None:
        self.key = KEY_PREFIX + cluster
        self.where = f"{self.key} at {_safe_url(config.url)}"
        self.client = redis.Redis.from_url(config.url, **config.connection_kwargs())

    def load(self) -> PlacementPlan | None:
        """The stored plan, None if there is none yet."""
        try:
            raw = self.client.get(self.key)
        except redis.RedisError as exc:
            raise StoreError(f"cannot read the placement plan {self.where}: {exc}") from exc
        return None if raw is None else _parse(raw, self.where)

    def save(self, plan: PlacementPlan, expected_generation: int) -> PlacementPlan:
        """Store ``plan`` as generation ``expected_generation + 1`` if Redis still holds
        ``expected_generation`` (0: no plan); return what was stored."""
        stored = plan.model_copy(update={"generation": expected_generation + 1})
        try:
            with self.client.pipeline() as pipe:
                pipe.watch(self.key)
                raw = pipe.get(self.key)
                current = 0 if raw is None else int(json.loads(raw).get("generation", 0))
                if current != expected_generation:
                    raise StalePlanError(
                        f"the placement plan {self.where} is at generation {current}, this "
                        f"writer expected {expected_generation}: another actor owns it"
                    )
                pipe.multi()
                pipe.set(self.key, stored.model_dump_json())
                pipe.execute()
        except redis.WatchError as exc:
            raise StalePlanError(f"the placement plan {self.where} changed while saving") from exc
        except redis.RedisError as exc:
            raise StoreError(f"cannot save the placement plan {self.where}: {exc}") from exc
        return stored

    def close(self) -> None:
        self.client.close()


def _parse(raw: bytes, where: str) -> PlacementPlan:
    try:
        version = json.loads(raw).get("version")
        if version != PLAN_VERSION:
            raise StoreError(
                f"the placement plan {where} has schema version {version}; this code reads "
                f"version {PLAN_VERSION}"
            )
        return PlacementPlan.model_validate_json(raw)
    except (ValueError, ValidationError) as exc:  # json and pydantic errors
        raise StoreError(f"the placement plan {where} is not readable: {exc}") from exc


def _safe_url(url: str) -> str:
    """The URL without credentials, for messages."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.rpartition('@')[2]}"
