"""One serving configuration: a YAML file, one pydantic model, every mistake caught before start.

``kvhead serve config.yaml`` and ``serve run deployments.app:build config=config.yaml`` read the
same file. :meth:`ServeConfig.check` runs the replica's own start-up checks in the caller
(:func:`kvhead.vllm.preflight.preflight`), so a setting the plugin would refuse inside a replica
(an arena smaller than the KV cache needs, a profile of another model, a context beyond the
model's length) is one message before Ray starts, never a replica-restart loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvhead.models.errors import ModelError
from kvhead.models.resolve import resolve_model
from kvhead.presets import DEFAULT_PRESET, PRESETS
from kvhead.vllm.config import ConnectorSettings, FlexiCacheConfigError, FlexiCacheSettings
from kvhead.vllm.preflight import EnginePlan, preflight
from kvstore.metrics import METRICS_DIR, METRICS_PORT


class ServeConfigError(ValueError):
    """A serving configuration that cannot start; the message names the field and the fix."""


class Replicas(BaseModel):
    """How many LLM replicas Ray Serve runs and when it adds one (its autoscaling config)."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=1, description="Replicas kept running (each one engine).")
    max_replicas: int = Field(1, ge=1, description="Most replicas autoscaling may start.")
    target_ongoing_requests: int = Field(
        8, ge=1, description="Requests per replica autoscaling aims for before adding one."
    )
    max_ongoing_requests: int = Field(
        32,
        ge=1,
        description="Requests one replica takes at once (Serve queues the rest at the ingress).",
    )
    max_queued_requests: int = Field(
        64,
        ge=1,
        description="Requests waiting for a replica; beyond it the server answers 429.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas ({self.min_replicas})"
            )
        return self


class ServeConfig(BaseModel):
    """Everything ``kvhead serve`` runs: the model, FlexiCache, replicas and the HTTP endpoint."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "smollm2-135m-instruct",
        description="A registry name (pulled when missing) or a Hugging Face model folder.",
    )
    model_id: str | None = Field(
        None, description="The name clients send as `model` (None: the model's own name)."
    )
    flexicache: bool = Field(
        True, description="Serve with the kvhead plugin; false serves stock vLLM (comparisons)."
    )
    preset: str = Field(DEFAULT_PRESET, description="FlexiCache preset: paper, balanced, accurate.")
    overrides: dict[str, Any] = Field(
        default_factory=dict,
        description="kvhead plugin settings that override the preset's (e.g. top_k, "
        "host_arena_gib, profile).",
    )
    max_model_len: int | None = Field(
        None, gt=0, description="Longest prompt + completion in tokens (None: the model's)."
    )
    max_num_seqs: int = Field(16, gt=0, description="Requests one engine runs in a batch.")
    block_size: int = Field(
        16,
        gt=0,
        description="Tokens per vLLM block, which is a FlexiCache page (stock vLLM's CPU "
        "attention needs a multiple of 32).",
    )
    kv_cache_gib: float = Field(
        1.0, gt=0, description="Device KV budget per replica, GiB (vLLM's and FlexiCache's)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Model dtype (auto: the checkpoint's)."
    )
    accelerator: Literal["cpu", "gpu"] = Field("cpu", description="What a replica runs on.")
    kv_connector: ConnectorSettings | None = Field(
        None,
        description="Share prompt pages between replicas through Redis (the kvhead KV "
        "connector: a prompt one replica served skips prefill on the others); None: off.",
    )
    replicas: Replicas = Field(default_factory=Replicas)
    host: str = Field("127.0.0.1", description="Address the HTTP server binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI API.")
    ray_address: str | None = Field(
        None, description="A running Ray cluster to join (None: start a local one)."
    )
    ray_metrics_port: int | None = Field(
        8080,
        ge=1,
        le=65535,
        description="Port of Ray's metrics export (ray_vllm_*, ray_serve_*) when `kvhead serve` "
        "starts a local Ray (None: a random port).",
    )
    metrics_dir: str = Field(
        METRICS_DIR,
        description="Node-local folder the engines publish kvhead_* metrics into.",
    )
    metrics_port: int | None = Field(
        METRICS_PORT,
        ge=1,
        le=65535,
        description="Port of the kvhead_* exporter `kvhead serve` starts (None: none; a "
        "`kvhead metrics` sidecar serves the folder instead).",
    )

    @model_validator(mode="after")
    def _known_settings(self) -> ServeConfig:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}: choose one of {', '.join(PRESETS)}")
        unknown = set(self.overrides) - set(FlexiCacheSettings.model_fields) - {"preset"}
        if unknown:
            raise ValueError(f"unknown kvhead settings in overrides: {', '.join(sorted(unknown))}")
        if self.kv_connector is not None and not self.flexicache:
            raise ValueError(
                "kv_connector stores FlexiCache pages: it needs flexicache: true (stock vLLM "
                "replicas would load pages they cannot place)"
            )
        return self

    @classmethod
    def load(cls, path: str | Path) -> ServeConfig:
        """Read a YAML file; any problem is one :class:`ServeConfigError` naming the fields."""
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as err:
            raise ServeConfigError(f"cannot read {path}: {err.strerror}") from None
        except yaml.YAMLError as err:
            raise ServeConfigError(f"{path} is not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ServeConfigError(f"{path} must hold a mapping of settings, not {type(raw)}")
        return cls.parse(raw, source=str(path))

    @classmethod
    def parse(cls, raw: dict, *, source: str = "config") -> ServeConfig:
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}"
                for e in err.errors()
            )
            raise ServeConfigError(f"{source}: {problems}") from None

    @property
    def kvhead_settings(self) -> dict | None:
        """The plugin's ``additional_config["kvhead"]`` block (None: stock vLLM)."""
        return {"preset": self.preset} | self.overrides if self.flexicache else None

    @property
    def kv_cache_bytes(self) -> int:
        return int(self.kv_cache_gib * 2**30)

    def model_dir(self) -> Path:
        """The local model folder (pulling a registry model when it is missing)."""
        try:
            return resolve_model(self.model)
        except ModelError as err:
            raise ServeConfigError(f"model: {err}") from None

    def served_model_id(self, model_dir: Path) -> str:
        return self.model_id or (self.model if "/" not in self.model else model_dir.name)

    def check(self, model_dir: Path) -> EnginePlan:
        """What one replica will hold, or :class:`ServeConfigError` for what it would refuse."""
        if not self.flexicache and self.accelerator == "cpu" and self.block_size % 32:
            raise ServeConfigError(
                f"block_size {self.block_size}: stock vLLM's CPU attention needs a multiple of 32"
            )
        try:
            return preflight(
                model_dir,
                self.kvhead_settings,
                max_model_len=self.max_model_len,
                max_num_seqs=self.max_num_seqs,
                block_size=self.block_size,
                kv_cache_bytes=self.kv_cache_bytes,
                dtype=self.dtype,
            )
        except FlexiCacheConfigError as err:
            raise ServeConfigError(str(err)) from None
