"""Placement planning and routing, pure (no Ray): the actor feeds node snapshots in and keeps
what comes out, so every rule here is tested without a cluster.

Sizing: one sequence of T tokens holds ``2 · layers · kv_heads · head_dim · dtype_bytes · T``
bytes of KV. A Helix group is the smallest world N that the Helix rules accept
(:func:`kvhead.core.helix.plan_layout`) whose largest rank shard of a context-target sequence fits
one device's KV budget; its N ranks share one node (STRICT_PACK), so the per-layer all-to-all
stays on the node's fast links. A plain replica holds one ``plain_max_tokens`` sequence on one
device.

Assignment is deterministic: Helix groups first (they need N devices on one node), then plain
replicas, each on the node with the most free devices, ties broken by node id. A group already
on a live node stays there, so a replan moves only what was lost.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from cluster.config import ModelSpec
from kvhead.core.helix import HelixLayout, local_len, plan_layout

PLAN_VERSION = 1
Kind = Literal["helix", "plain"]


class PlacementError(RuntimeError):
    """No placement satisfies the request; the message names the sizes that did not fit."""


class RoutingError(RuntimeError):
    """A request no placed group can take (unknown model, too long, nothing placed)."""


class NodeInfo(BaseModel):
    """One live node as the planner sees it."""

    model_config = ConfigDict(frozen=True)

    node_id: str
    address: str
    devices: int = Field(ge=0, description="Devices (the configured Ray resource) on the node.")
    cpus: float = Field(ge=0)
    device_kv_bytes: int = Field(gt=0, description="KV-cache bytes one device holds.")


class GroupPlacement(BaseModel):
    """Where one Helix group or plain replica lives; ``node_id`` None while it cannot be placed."""

    model_config = ConfigDict(frozen=True)

    model: str
    kind: Kind
    index: int
    node_id: str | None
    world: int = Field(description="Devices held (placement-group bundles), one per rank.")
    kvp: int = 1
    tp: int = 1
    epoch: int = Field(default=0, description="Bumped on every move: a new placement group name.")

    @property
    def key(self) -> str:
        return f"{self.model}:{self.kind}:{self.index}"

    def pg_name(self, cluster: str) -> str:
        return f"{pg_prefix(cluster)}{self.key}:e{self.epoch}"


class PlacementPlan(BaseModel):
    """The whole plan, as persisted: enough for a restarted actor to resume with nothing lost."""

    version: Literal[1] = PLAN_VERSION
    cluster: str
    generation: int = Field(default=0, description="Bumped by every save (compare-and-set).")
    models: list[ModelSpec] = Field(default_factory=list)
    nodes: list[str] = Field(
        default_factory=list,
        description="Live device nodes at the last check (diffed to learn "
        "membership, also across restarts).",
    )
    groups: list[GroupPlacement] = Field(default_factory=list)
    problems: list[str] = Field(default_factory=list, description="Why groups are unplaced.")
    changes: dict[str, int] = Field(
        default_factory=dict, description="Placement changes over the plan's life, by reason."
    )


class Route(BaseModel):
    """Where one request goes."""

    model: str
    pool: Kind
    group: str
    node_id: str
    placement_group: str


def pg_prefix(cluster: str) -> str:
    """Every placement group of ``cluster`` starts with this (how the actor finds its own)."""
    return f"kvhead:{cluster}:"


def rank_kv_bytes(spec: ModelSpec, layout: HelixLayout, tokens: int) -> int:
    """KV bytes of the fullest rank: KVP shard 0 (it fills first) times its TP slice's heads."""
    held = local_len(layout, 0, tokens)
    return spec.kv_bytes(held, kv_heads=spec.num_kv_heads // layout.tp)


def group_layout(spec: ModelSpec, kind: Kind, node: NodeInfo) -> HelixLayout:
    """The smallest layout of ``kind`` whose ranks fit ``node``'s devices, or PlacementError."""
    budget = node.device_kv_bytes
    if kind == "plain":
        need = spec.kv_bytes(spec.plain_max_tokens)
        if need > budget:
            raise PlacementError(
                f"{spec.name}: a plain replica's {spec.plain_max_tokens}-token sequence needs "
                f"{gib(need)} of KV, a device holds {gib(budget)}"
            )
        return HelixLayout(kvp=1, tp=1, block=spec.block)
    best: tuple[int, int] | None = None  # (per-rank bytes, N) of the largest allowed N
    for world in range(1, node.devices + 1):
        try:
            layout = plan_layout(spec.num_kv_heads, spec.num_q_heads, world, block=spec.block)
        except ValueError:
            continue  # a Helix rule forbids this N (e.g. it does not divide the query heads)
        per_rank = rank_kv_bytes(spec, layout, spec.context_tokens)
        if per_rank <= budget:
            return layout
        best = (per_rank, world)
    total = gib(spec.kv_bytes(spec.context_tokens))
    if best is None:
        raise PlacementError(f"{spec.name}: node {node.node_id[:8]} has no devices")
    raise PlacementError(
        f"{spec.name}: one {spec.context_tokens}-token sequence holds {total} of KV; the "
        f"largest Helix group on one node (N={best[1]} of {node.devices} devices) leaves "
        f"{gib(best[0])} per rank, a device holds {gib(budget)}"
    )


def place(
    models: Sequence[ModelSpec],
    nodes: Iterable[NodeInfo],
    previous: Iterable[GroupPlacement] = (),
    bundle_cpus: float = 1.0,
) -> tuple[list[GroupPlacement], list[str]]:
    """Every wanted group with its node (None where nothing fits) and the reasons for the Nones.

    Groups in ``previous`` that sit on a live node with an unchanged layout keep their node and
    epoch; every other group is placed afresh, with the next epoch if it existed before.
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise PlacementError(f"model names must be unique: {names}")
    alive = {n.node_id: n for n in nodes}
    free = {i: [n.devices, n.cpus] for i, n in alive.items()}  # devices, CPUs
    old = {g.key: g for g in previous}
    wanted = _wanted(models)
    placed: dict[str, GroupPlacement] = {}
    for spec, kind, key in wanted:  # first pass: keep what still stands
        kept = old.get(key)
        if kept is None or kept.node_id not in alive:
            continue
        try:
            layout = group_layout(spec, kind, alive[kept.node_id])
        except PlacementError:
            continue
        if (layout.world, layout.kvp, layout.tp) == (kept.world, kept.kvp, kept.tp):
            placed[key] = kept
            _take(free[kept.node_id], kept.world, bundle_cpus)
    problems: list[str] = []
    for spec, kind, key in wanted:  # second pass: place the rest
        if key in placed:
            continue
        index = int(key.rsplit(":", 1)[1])
        prev = old.get(key)
        node_id, layout, reasons = _first_fit(spec, kind, alive, free, bundle_cpus)
        if layout is None:
            problems.append(f"{key} unplaced: " + ("; ".join(reasons) or "no nodes"))
            epoch = 0 if prev is None else prev.epoch  # no placement group, no new name
            placed[key] = GroupPlacement(
                model=spec.name, kind=kind, index=index, node_id=None, world=0, epoch=epoch
            )
            continue
        placed[key] = GroupPlacement(
            model=spec.name,
            kind=kind,
            index=index,
            node_id=node_id,
            world=layout.world,
            kvp=layout.kvp,
            tp=layout.tp,
            epoch=0 if prev is None else prev.epoch + 1,
        )
        _take(free[node_id], layout.world, bundle_cpus)
    return [placed[key] for _, _, key in wanted], problems


def _wanted(models: Sequence[ModelSpec]) -> list[tuple[ModelSpec, Kind, str]]:
    """(spec, kind, key) of every group: Helix groups of every model first, then plain ones."""
    ordered = sorted(models, key=lambda m: m.name)
    helix = [(m, "helix", f"{m.name}:helix:{i}") for m in ordered for i in range(m.helix_groups)]
    plain = [(m, "plain", f"{m.name}:plain:{i}") for m in ordered for i in range(m.plain_replicas)]
    return helix + plain


def _first_fit(
    spec: ModelSpec,
    kind: Kind,
    alive: dict[str, NodeInfo],
    free: dict[str, list[float]],
    bundle_cpus: float,
) -> tuple[str | None, HelixLayout | None, list[str]]:
    """The first node, most free devices first and ties by id, with room for the group."""
    reasons: list[str] = []
    for node in sorted(alive.values(), key=lambda n: (-free[n.node_id][0], n.node_id)):
        try:
            fit = group_layout(spec, kind, node)
        except PlacementError as exc:
            reasons.append(str(exc))
            continue
        devices, cpus = free[node.node_id]
        if fit.world <= devices and fit.world * bundle_cpus <= cpus:
            return node.node_id, fit, []
        reasons.append(
            f"needs {fit.world} devices and {fit.world * bundle_cpus:g} CPUs on one node, "
            f"node {node.node_id[:8]} has {devices:g} and {cpus:g} free"
        )
    return None, None, list(dict.fromkeys(reasons))


def _take(free: list[float], world: int, bundle_cpus: float) -> None:
    free[0] -= world
    free[1] -= world * bundle_cpus


def plan_cluster(
    models: Sequence[ModelSpec], nodes: Iterable[NodeInfo], bundle_cpus: float = 1.0
) -> list[GroupPlacement]:
    """Strict :func:`place` from scratch: every group placed, or PlacementError with the numbers."""
    groups, problems = place(models, nodes, bundle_cpus=bundle_cpus)
    if problems:
        raise PlacementError("; ".join(problems))
    return groups


def diff(before: Iterable[GroupPlacement], after: Iterable[GroupPlacement]) -> Counter[str]:
    """Placement changes by reason: placed (had no node), moved, unplaced (lost its node),
    removed (no longer wanted). A group on the same node and epoch is no change."""
    old = {g.key: g for g in before}
    new = {g.key: g for g in after}
    changes: Counter[str] = Counter()
    for key, group in new.items():
        prev = old.get(key)
        was = None if prev is None else prev.node_id
        if group.node_id is None:
            changes["unplaced"] += was is not None
        elif was is None:
            changes["placed"] += 1
        elif (was, prev.epoch) != (group.node_id, group.epoch):
            changes["moved"] += 1
    changes["removed"] += sum(1 for key in old if key not in new and old[key].node_id)
    return +changes


def route(
    plan: PlacementPlan,
    model: str,
    prompt_tokens: int,
    max_new_tokens: int = 0,
    turns: Counter[tuple[str, str]] | None = None,
) -> Route:
    """Send a request by length: a sequence that fits a plain replica goes to the plain pool,
    a longer one to a Helix group; with one pool empty the other takes what it can hold.

    ``turns`` holds a round-robin position per (model, pool); the call advances the one it uses,
    so interleaved short and long requests still rotate through each pool.
    """
    spec = next((m for m in plan.models if m.name == model), None)
    if spec is None:
        raise RoutingError(f"unknown model {model!r}; placed: {[m.name for m in plan.models]}")
    tokens = prompt_tokens + max_new_tokens
    if tokens > spec.context_tokens:
        raise RoutingError(
            f"{model}: {tokens} tokens exceed the context target of {spec.context_tokens}"
        )
    pools = {
        kind: [g for g in plan.groups if g.model == model and g.kind == kind and g.node_id]
        for kind in ("plain", "helix")
    }
    pool = "plain" if tokens <= spec.plain_max_tokens and pools["plain"] else "helix"
    if not pools[pool]:
        raise RoutingError(
            f"{model}: no {pool} group is placed for a {tokens}-token sequence "
            f"({'; '.join(plan.problems) or 'none planned'})"
        )
    turns = Counter() if turns is None else turns
    group = pools[pool][turns[model, pool] % len(pools[pool])]
    turns[model, pool] += 1
    return Route(
        model=model,
        pool=pool,
        group=group.key,
        node_id=group.node_id,
        placement_group=group.pg_name(plan.cluster),
    )


def gib(n: int) -> str:
    """Bytes for messages, in GiB down to a tenth, in MiB below that."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:.1f} MiB"
