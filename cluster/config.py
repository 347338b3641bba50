"""What users set for placement: the models to serve and how devices are counted (pydantic)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kvstore.config import RedisTierConfig

# ':' separates the parts of placement-group names and Redis keys, so names may not hold one.
NAME_PATTERN = r"^[^:\s]+$"


class ModelSpec(BaseModel):
    """One served model: the shape that sizes its KV cache and the lengths it must serve."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=NAME_PATTERN, description="Model name, as requests name it.")
    num_layers: int = Field(gt=0, description="Layers holding a KV cache.")
    num_q_heads: int = Field(gt=0, description="Query heads per layer.")
    num_kv_heads: int = Field(gt=0, description="KV heads per layer (GQA groups).")
    head_dim: int = Field(gt=0, description="Dimension of one head.")
    dtype_bytes: int = Field(default=2, gt=0, description="Bytes per KV element (2 for bf16).")
    context_tokens: int = Field(
        gt=0, description="Context target: the longest sequence (prompt + output) served."
    )
    plain_max_tokens: int = Field(
        gt=0,
        description="Longest sequence a plain single-device replica takes; longer ones go "
        "to a Helix group.",
    )
    helix_groups: int = Field(default=1, ge=0, description="Helix groups to place.")
    plain_replicas: int = Field(default=0, ge=0, description="Plain replicas to place.")
    block: int = Field(
        default=16, gt=0, description="Tokens per round-robin block of the Helix KV shards."
    )

    @model_validator(mode="after")
    def _check_shape(self) -> ModelSpec:
        if self.num_q_heads % self.num_kv_heads:
            raise ValueError(
                f"num_q_heads ({self.num_q_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.plain_max_tokens > self.context_tokens:
            raise ValueError(
                f"plain_max_tokens ({self.plain_max_tokens}) exceeds context_tokens "
                f"({self.context_tokens})"
            )
        return self

    def kv_bytes(self, tokens: int, kv_heads: int | None = None) -> int:
        """K and V of ``tokens`` tokens over every layer and ``kv_heads`` heads (default all)."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        return 2 * self.num_layers * heads * self.head_dim * self.dtype_bytes * tokens


class PlacementConfig(BaseModel):
    """Everything the placement actor needs besides the cluster it runs in."""

    cluster_name: str = Field(
        default="kvhead",
        pattern=NAME_PATTERN,
        description="Names the plan's Redis key and the placement groups, so several clusters "
        "can share one Redis.",
    )
    redis: RedisTierConfig = Field(
        default_factory=RedisTierConfig,
        description="Where the plan is kept. Only the connection fields apply: the plan has no "
        "TTL and is written as one value.",
    )
    device_resource: str = Field(
        default="GPU", description="Ray resource counting accelerators (custom ones in tests)."
    )
    device_kv_bytes: int = Field(
        gt=0, description="KV-cache bytes one device holds after weights and activations."
    )
    bundle_cpus: float = Field(
        default=1.0, ge=0, description="CPUs reserved beside each device (one per rank process)."
    )
    check_interval_s: float = Field(
        default=10.0,
        ge=0,
        description="Period of the node check that replans on node loss; 0 turns the loop off "
        "(check_nodes() still works).",
    )
    ready_timeout_s: float = Field(
        default=60.0, gt=0, description="How long apply waits for placement groups to be ready."
    )
    models: list[ModelSpec] = Field(
        default_factory=list, description="Models apply() places when given none."
    )

    @model_validator(mode="after")
    def _unique_models(self) -> PlacementConfig:
        names = [m.name for m in self.models]
        if len(set(names)) != len(names):
            raise ValueError(f"model names must be unique: {names}")
        return self
