"""kvstore: head-page store tiers behind one interface (host arena, Redis, tier manager).

See ``kvstore/README.md`` for the API the vLLM plugin codes against.
"""

from kvstore.base import PageBatch, PageKeys, PageStore, TierStats
from kvstore.config import HostArenaConfig, KVStoreConfig, RedisTierConfig, TierManagerConfig
from kvstore.host_arena import HostArena
from kvstore.prefix import hashes_from_bytes, prefix_hashes, prefix_hex

__all__ = [
    "HostArena", "HostArenaConfig", "KVStoreConfig", "PageBatch", "PageKeys", "PageStore",
    "RedisTierConfig", "TierManagerConfig", "TierStats", "hashes_from_bytes", "prefix_hashes",
    "prefix_hex",
]
