"""Builds the tiers from a config, host first (it stages everything else)."""

from __future__ import annotations

import logging

from kvhead.core.spec import HeadPageSpec
from kvstore.config import KVStoreConfig
from kvstore.host_arena import HostArena
from kvstore.manager import TierManager
from kvstore.redis_tier import RedisTier

log = logging.getLogger(__name__)


def build_store(config: KVStoreConfig, spec: HeadPageSpec, fingerprint: str) -> TierManager:
    """A :class:`TierManager` over a host arena and, when configured, the Redis tier.

    An unreachable Redis does not stop start-up: the store runs on the host tier alone, says
    so in the log, and the Redis tier keeps retrying in the background of normal calls.
    """
    arena = HostArena(spec, config.host)
    shared = None
    if config.redis is not None:
        shared = RedisTier(spec, config.redis, fingerprint)
        if not shared.available:
            log.warning("kvstore: starting with the host tier only; Redis will be retried")
    return TierManager(arena, shared, config.manager)
