"""Configuration of the page-store tiers (pydantic, one field description each)."""

from __future__ import annotations

import os

from pydantic import BaseModel, Field, field_validator

# Where a deployment (the Helm chart) tells every process its Redis: the URL without
# credentials, and the password, which never travels in a config that vLLM or Ray logs.
REDIS_URL_ENV = "KVHEAD_REDIS_URL"
REDIS_PASSWORD_ENV = "KVHEAD_REDIS_PASSWORD"


class HostArenaConfig(BaseModel):
    """The host arena: fixed capacity, preallocated, indexed by (layer, block id, head)."""

    capacity_pages: int = Field(gt=0, description="Pages (one KV head, K and V) the arena holds.")
    num_layers: int = Field(gt=0, description="Layers whose stable-head pages the arena keys.")
    num_blocks: int = Field(
        gt=0, description="Size of the block-id space (vLLM's num_gpu_blocks); ids are 0..n-1."
    )
    evict_fraction: float = Field(
        default=1 / 64,
        gt=0,
        le=1,
        description="Share of capacity freed per eviction round, so eviction cost is amortised.",
    )
    pin_memory: bool | None = Field(
        default=None, description="Pin the buffer for async device copies; None = when CUDA exists."
    )


class RedisTierConfig(BaseModel):
    """The cluster-wide Redis tier."""

    url: str = Field(
        default_factory=lambda: os.environ.get(REDIS_URL_ENV, "redis://127.0.0.1:6379/0"),
        description=f"redis:// or rediss:// (TLS) URL; credentials may be embedded (default: "
        f"${REDIS_URL_ENV}, else a local Redis).",
    )
    username: str | None = Field(default=None, description="ACL user (None: default user).")
    password: str | None = Field(
        default=None,
        description=f"requirepass / ACL password (None: ${REDIS_PASSWORD_ENV} when set).",
    )
    ssl_ca_certs: str | None = Field(default=None, description="CA bundle for rediss:// URLs.")
    ssl_certfile: str | None = Field(default=None, description="Client certificate (mutual TLS).")
    ssl_keyfile: str | None = Field(default=None, description="Client key (mutual TLS).")
    ttl_seconds: int | None = Field(
        default=3600, gt=0, description="Page lifetime; None keeps pages until Redis evicts them."
    )
    pipeline_depth: int = Field(
        default=64, gt=0, description="Pages per pipelined round trip (MGET keys / SET commands)."
    )
    max_connections: int = Field(default=8, gt=0, description="Connection-pool bound.")
    socket_timeout_s: float = Field(
        default=0.5, gt=0, description="Per-operation timeout; a slower Redis counts as down."
    )
    connect_timeout_s: float = Field(default=0.5, gt=0, description="TCP connect timeout.")
    retry_after_s: float = Field(
        default=1.0,
        gt=0,
        description="After a failure, calls return misses at once for this long, then retry.",
    )
    memory_budget_bytes: int | None = Field(
        default=None,
        gt=0,
        description="If set, CONFIG SET maxmemory to this and an LRU policy at connect.",
    )
    eviction_policy: str = Field(
        default="allkeys-lru", description="maxmemory-policy applied with memory_budget_bytes."
    )

    @field_validator("url")
    @classmethod
    def _check_scheme(cls, url: str) -> str:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"redis url must start with redis://, rediss:// or unix://: {url}")
        return url

    def connection_kwargs(self) -> dict:
        """redis-py connection arguments besides the URL: credentials, timeouts and, for a
        rediss:// URL, the TLS files (every client of a kvhead Redis connects the same way)."""
        kwargs: dict = {
            "username": self.username,
            "password": self.password or os.environ.get(REDIS_PASSWORD_ENV),
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
        }
        if self.url.startswith("rediss://"):
            kwargs |= {
                "ssl_ca_certs": self.ssl_ca_certs,
                "ssl_certfile": self.ssl_certfile,
                "ssl_keyfile": self.ssl_keyfile,
            }
        return kwargs


class TierManagerConfig(BaseModel):
    """How the tiers cooperate."""

    publish_on_put: bool = Field(
        default=True,
        description="Copy named pages to the shared tier when written (cross-replica reuse), "
        "not only when the host arena evicts them.",
    )
    promote_on_hit: bool = Field(
        default=True, description="Copy pages found in a lower tier into the host arena."
    )
    write_queue_pages: int = Field(
        default=65536,
        gt=0,
        description="Write-behind queue bound; beyond it writes are dropped (and counted), "
        "never waited for, so decode never blocks on Redis.",
    )


class KVStoreConfig(BaseModel):
    """Everything :func:`kvstore.factory.build_store` needs besides the spec and fingerprint."""

    host: HostArenaConfig
    redis: RedisTierConfig | None = Field(default=None, description="None: host tier only.")
    manager: TierManagerConfig = Field(default_factory=TierManagerConfig)
