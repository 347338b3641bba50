"""FlexiCache settings for vLLM, and the start-up checks that turn bad settings into clear errors.

Settings travel in vLLM's own ``--additional-config '{"kvhead": {...}}'`` (``LLM(...,
additional_config={"kvhead": {...}})``), so every vLLM process (API server, engine core,
workers) sees the same values without extra environment plumbing. The checks run in the worker
when the first FlexiCache layer is built, i.e. during start-up, before any request is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kvhead.core.options import SelectionOptions, is_spec, page_budgets
from kvhead.core.stability import HeadProfile, model_fingerprint
from kvhead.models.profiles import ProfileError, profile_for_model
from kvhead.presets import DEFAULT_PRESET, get_preset
from kvstore.config import RedisTierConfig

CONFIG_KEY = "kvhead"


class FlexiCacheConfigError(ValueError):
    """A FlexiCache setting that cannot work with this model or vLLM configuration."""


class FlexiCacheSettings(SelectionOptions):
    """What a user sets to run FlexiCache inside vLLM: the flexicache settings plus the
    selection options ``kvhead eval --modes flexicache+`` measures (same names, same meaning).

    The plugin applies a stable head's rerank at once (no ``rerank_lag``) and takes its dense
    heads from the profile (``dense_heads`` "profile"); options that change what stable heads
    attend to need ``unstable_dense``, because resident heads otherwise rank their pages every
    step in the native decode with the spec's score and no summary tokens.
    """

    profile: Path | None = Field(
        default=None,
        description="Head profile JSON (kvhead profile) of this exact model. None: "
        "the shipped or user profile whose fingerprint matches the model.",
    )
    page_size: int | None = Field(
        default=None,
        gt=0,
        description="Tokens per page; must equal vLLM's --block-size (None: take vLLM's).",
    )
    host_arena_gib: float | None = Field(
        default=None,
        gt=0,
        description="Host arena for stable-head pages, GiB (all layers). "
        "None: exactly what vLLM's cache needs (its blocks x layers x stable heads).",
    )
    max_resident_heads_per_layer: int | None = Field(
        default=None,
        ge=0,
        description="Cap on the KV heads a layer keeps in vLLM's cache. None: exactly the "
        "profile's unstable heads (layers may differ; a layer with none keeps no cache). A "
        "smaller value treats a crowded layer's least unstable extra heads as stable, trading "
        "accuracy for memory.",
    )
    decode_kernel_threads: int | None = Field(
        default=None,
        gt=0,
        description="Threads for the native decode step of a layer (None: vLLM's, the cores "
        "its CPU worker pins). The step runs (sequence, kv head) pairs in parallel.",
    )
    hot_pool_pages: int | None = Field(
        default=None,
        gt=0,
        description="Device hot-pool pages per layer (None: max_num_seqs * stable heads * "
        "(K + tail pages per rerank window)).",
    )

    @model_validator(mode="after")
    def _plugin_can_serve(self) -> FlexiCacheSettings:
        if self.rerank_lag:
            raise ValueError(
                "rerank_lag is an evaluation option; the plugin applies reranks at once"
            )
        if self.dense_heads != "profile":
            raise ValueError(
                "dense_heads must be 'profile': the plugin keeps the profile's "
                "unstable heads (and leading_layers) in vLLM's cache"
            )
        if (not is_spec(self) or self.compensate) and not self.unstable_dense:
            raise ValueError(
                "sink_pages, recent_pages, group_score, bound_weight, "
                "head_budgets and compensate shape what stable heads attend to "
                "and need unstable_dense"
            )
        if self.sink_pages + self.recent_pages > self.top_k:
            raise ValueError(
                f"sink_pages + recent_pages ({self.sink_pages} + "
                f"{self.recent_pages}) must fit in top_k ({self.top_k})"
            )
        return self


def settings_from_additional_config(additional: dict | object) -> FlexiCacheSettings:
    """Parse ``additional_config["kvhead"]``; a bad value is a clear error.

    ``{"preset": NAME, ...}`` starts from a preset (:mod:`kvhead.presets`) and overrides it with
    the other keys; settings without a preset or a profile (``{}``, or no ``kvhead`` block at
    all) are the default preset; settings that name a profile but no preset are taken as given.
    """
    raw = additional.get(CONFIG_KEY) if isinstance(additional, dict) else None
    raw = dict(raw or {})
    name = raw.pop("preset", None if "profile" in raw else DEFAULT_PRESET)
    try:
        base = get_preset(name).options if name is not None else {}
        return FlexiCacheSettings.model_validate(base | raw)
    except ValidationError as err:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors()
        )
        raise FlexiCacheConfigError(f"invalid kvhead settings: {problems}") from None
    except ValueError as err:
        raise FlexiCacheConfigError(f"invalid kvhead settings: {err}") from None


@dataclass(frozen=True)
class HeadSplit:
    """Which KV heads of each layer stay in vLLM's cache (resident) and which are stable.

    Layers may keep different numbers of heads: vLLM 0.32 puts full-attention layers whose specs
    differ only in head count into one KV-cache group (one block table, per-layer page sizes), and
    a layer with no resident head allocates nothing (it is declared as reading another layer's
    cache, see :mod:`kvhead.vllm.kv_spec`), so no layer pays for padding heads.
    """

    resident_mask: torch.Tensor  # [L, Hkv] bool: kept in vLLM's cache

    def resident(self, layer: int) -> torch.Tensor:
        """Ascending kv head indices of ``layer`` kept in vLLM's cache."""
        return self.resident_mask[layer].nonzero().flatten()

    def stable(self, layer: int) -> torch.Tensor:
        """Ascending kv head indices of ``layer`` served by the arena and hot pool."""
        return (~self.resident_mask[layer]).nonzero().flatten()

    @property
    def resident_per_layer(self) -> list[int]:
        return self.resident_mask.sum(dim=1).tolist()

    @property
    def num_resident(self) -> int:
        """Resident kv heads over all layers."""
        return int(self.resident_mask.sum())

    @property
    def num_stable(self) -> int:
        """Stable kv heads over all layers."""
        return int((~self.resident_mask).sum())

    @classmethod
    def from_profile(
        cls,
        profile: HeadProfile,
        cap: int | None = None,
        leading_layers: int = 0,
        count: int | None = None,
    ) -> HeadSplit:
        """The profile's unstable heads (``count`` of them, default all), every head of the first
        ``leading_layers`` taking the places of its least unstable picks
        (:meth:`HeadProfile.unstable_mask`), at most ``cap`` per layer (the most unstable kept)."""
        if not 0 <= leading_layers <= profile.num_layers:
            raise FlexiCacheConfigError(
                f"leading_layers must be in [0, {profile.num_layers}], got {leading_layers}"
            )
        if leading_layers and cap is not None and cap < profile.num_kv_heads:
            raise FlexiCacheConfigError(
                f"max_resident_heads_per_layer {cap} cannot keep the {profile.num_kv_heads} kv "
                "heads of each leading layer in vLLM's cache; lower leading_layers or the cap"
            )
        try:
            mask = profile.unstable_mask(leading_layers, count).bool()
        except ValueError as err:
            raise FlexiCacheConfigError(f"unstable_heads: {err}") from err
        scores = torch.nan_to_num(torch.tensor(profile.instability, dtype=torch.float64), nan=1e9)
        if cap is not None:
            ranked = scores.masked_fill(~mask, float("-inf")).argsort(dim=1, descending=True)
            keep = torch.zeros_like(mask)
            keep.scatter_(1, ranked[:, :cap], True)
            mask = mask & keep
        if bool(mask.all()):
            raise FlexiCacheConfigError(
                "the head profile leaves no stable head: FlexiCache would save nothing; use a "
                "profile with a smaller unstable fraction or set kvhead "
                "max_resident_heads_per_layer"
            )
        if not bool(mask.any()):
            raise FlexiCacheConfigError(
                "the head profile marks no unstable head, so vLLM's cache would hold nothing and "
                "vLLM would treat the model as attention-free; profile with a larger unstable "
                "fraction"
            )
        return cls(mask)


def stable_budgets(
    settings: FlexiCacheSettings, profile: HeadProfile, split: HeadSplit
) -> torch.Tensor | None:
    """Page budgets ``[L, Hkv]`` of the stable heads with ``head_budgets`` (else None): they
    share ``top_k`` pages each by the profile's coverage curves, as in ``kvhead eval``."""
    try:
        return page_budgets(profile, settings, ~split.resident_mask, settings.top_k)
    except ValueError as err:
        raise FlexiCacheConfigError(f"kvhead head_budgets: {err}") from None


def check_model(
    settings: FlexiCacheSettings,
    model_dir: str | Path,
    *,
    num_layers: int,
    num_kv_heads: int,
    block_size: int,
    prefix_caching: bool,
) -> HeadProfile:
    """Load the profile and refuse settings that cannot work with this model and vLLM config."""
    config_json = Path(model_dir) / "config.json"
    if settings.profile is None:
        try:
            return _checked(
                settings,
                profile_for_model(model_dir),
                num_layers=num_layers,
                num_kv_heads=num_kv_heads,
                block_size=block_size,
                prefix_caching=prefix_caching,
            )
        except ProfileError as err:
            raise FlexiCacheConfigError(f"kvhead: {err}") from None
    if not settings.profile.is_file():
        raise FlexiCacheConfigError(f"kvhead head profile not found: {settings.profile}")
    try:
        profile = HeadProfile.load(settings.profile)
    except (ValueError, OSError) as err:
        raise FlexiCacheConfigError(
            f"kvhead head profile {settings.profile} is unreadable: {err}"
        ) from None
    if config_json.is_file() and profile.model_fingerprint != model_fingerprint(model_dir):
        raise FlexiCacheConfigError(
            f"head profile {settings.profile} was taken on another model (fingerprint "
            f"{profile.model_fingerprint}, this model {model_fingerprint(model_dir)}); "
            f"profile this model with `kvhead profile`"
        )
    return _checked(
        settings,
        profile,
        num_layers=num_layers,
        num_kv_heads=num_kv_heads,
        block_size=block_size,
        prefix_caching=prefix_caching,
    )


def _checked(
    settings: FlexiCacheSettings,
    profile: HeadProfile,
    *,
    num_layers: int,
    num_kv_heads: int,
    block_size: int,
    prefix_caching: bool,
) -> HeadProfile:
    """``profile`` once the geometry and vLLM's cache settings agree with it."""
    if (profile.num_layers, profile.num_kv_heads) != (num_layers, num_kv_heads):
        raise FlexiCacheConfigError(
            f"head profile has {profile.num_layers} layers x {profile.num_kv_heads} kv heads, "
            f"the model has {num_layers} x {num_kv_heads}"
        )
    if settings.page_size is not None and settings.page_size != block_size:
        raise FlexiCacheConfigError(
            f"kvhead page_size {settings.page_size} differs from vLLM's block size {block_size}: "
            f"a page is a vLLM block, start vLLM with --block-size {settings.page_size}"
        )
    if prefix_caching:
        raise FlexiCacheConfigError(
            "kvhead FlexiCache keeps stable heads' pages per vLLM block outside vLLM's cache, and "
            "prefix caching would share blocks between requests: start vLLM with "
            "--no-enable-prefix-caching"
        )
    return profile


def check_arena(settings: FlexiCacheSettings, pages_needed: int, page_bytes: int) -> int:
    """Arena capacity in pages; refuses an arena that cannot hold every stable page of the cache.

    Stable pages live only in the arena (no lower tier is wired here), so an arena smaller than
    vLLM's block count times the stable heads would silently drop context.
    """
    if settings.host_arena_gib is None:  # derived: exactly the stable pages of vLLM's cache
        return pages_needed
    capacity = int(settings.host_arena_gib * 2**30) // page_bytes
    if capacity < pages_needed:
        need_gib = pages_needed * page_bytes / 2**30
        raise FlexiCacheConfigError(
            f"kvhead host arena of {settings.host_arena_gib} GiB holds {capacity} stable-head "
            f"pages, vLLM's KV cache needs {pages_needed} ({need_gib:.2f} GiB): raise "
            f"host_arena_gib or lower the KV cache size"
        )
    return pages_needed


CONNECTOR_NAME = "KVHeadConnector"  # the KV connector's name in vLLM's registry


class ConnectorSettings(BaseModel):
    """The kvhead KV connector (:mod:`kvhead.vllm.connector`): vLLM's
    ``kv_connector_extra_config``."""

    model_config = ConfigDict(extra="forbid")

    redis: RedisTierConfig = Field(
        default_factory=RedisTierConfig, description="The Redis every replica shares."
    )
    min_match_tokens: int = Field(
        default=256,
        ge=1,
        description="Shortest stored prefix worth a load (a load costs the request one engine "
        "step of waiting; prefill of a few pages is cheaper).",
    )
    save_queue_mib: int = Field(
        default=1024,
        gt=0,
        description="Host memory for prompt pages waiting to be written to Redis; a save that "
        "does not fit is dropped and counted, never waited for.",
    )

    @classmethod
    def on(cls, redis_url: str, **options) -> ConnectorSettings:
        """Settings for the Redis at ``redis_url`` (the scripts' and tools' one option)."""
        return cls(redis=RedisTierConfig(url=redis_url), **options)

    def transfer_config(self) -> dict:
        """vLLM's ``kv_transfer_config`` selecting the connector with these settings."""
        return {
            "kv_connector": CONNECTOR_NAME,
            "kv_role": "kv_both",
            "kv_load_failure_policy": "recompute",
            "kv_connector_extra_config": self.model_dump(mode="json", exclude_defaults=True),
        }
