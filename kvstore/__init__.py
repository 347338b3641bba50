"""kvstore: head-page store tiers behind one interface (host arena, Redis, tier manager).

See ``kvstore/README.md`` for the API the vLLM plugin codes against.

Dependency rule: imports ``kvhead.core`` only (page geometry); the vLLM plugin builds on it.
"""

from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.config import HostArenaConfig, KVStoreConfig, RedisTierConfig, TierManagerConfig
from kvstore.factory import build_store
from kvstore.host_arena import HostArena
from kvstore.manager import TierManager
from kvstore.prefix import hashes_from_bytes, prefix_hashes, prefix_hex
from kvstore.redis_tier import RedisTier

__all__ = [
    "HostArena",
    "HostArenaConfig",
    "KVStoreConfig",
    "PageBatch",
    "PageKeys",
    "PageStore",
    "RedisTier",
    "RedisTierConfig",
    "TierManager",
    "TierManagerConfig",
    "TierStats",
    "build_store",
    "hashes_from_bytes",
    "prefix_hashes",
    "prefix_hex",
]
