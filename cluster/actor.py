"""The placement actor: one named, detached Ray actor per cluster that owns where groups run.

Methods, called through the handle by drivers (``kvhead`` CLI, the Serve ingress, tests):

- ``plan(models=None)``: dry run against the live nodes; PlacementError if a group cannot fit.
- ``apply(models=None)``: plan, save the plan, create and remove placement groups, wait ready.
- ``check_nodes()``: diff the live nodes with the plan's last snapshot; re-place the groups of
  lost nodes (keeping every other group where it is), place unplaced groups on joined nodes.
  A periodic task calls it every ``check_interval_s``.
- ``route(model, prompt_tokens, max_new_tokens=0)``: the pool and group for a request.
- ``status()``: the plan, each placement group's Ray state and bundle nodes, this process's
  counters.

Invariant: Redis first. Every change is saved before a placement group is touched, and the
placement groups are then reconciled with the saved plan by name, so whenever the actor dies a
restarted one loads the plan, creates only the groups still missing and removes only strays.
Placement groups are detached (they outlive the actor) and pinned to their planned node by its
``ray.io/node-id`` label, so Ray never moves one behind the plan's back.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import Counter
from collections.abc import Sequence

import ray
from pydantic import BaseModel
from ray.actor import ActorHandle
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    placement_group_table,
    remove_placement_group,
)

from cluster.config import ModelSpec, PlacementConfig
from cluster.metrics import PlacementCollector
from cluster.plan import (
    GroupPlacement,
    NodeInfo,
    PlacementError,
    PlacementPlan,
    Route,
    diff,
    pg_prefix,
    place,
    route,
)
from cluster.store import PlanStore, StalePlanError
from kvstore.metrics import METRICS_DIR_ENV, MultiprocessPublisher

log = logging.getLogger(__name__)

ACTOR_NAME = "kvhead-placement"
NAMESPACE = "kvhead"
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives the head node this resource
NODE_LABEL = "ray.io/node-id"  # every node carries its id as this label


class GroupStatus(BaseModel):
    """One planned group as Ray sees it now."""

    group: GroupPlacement
    placement_group: str
    state: str  # Ray's PG state (CREATED, PENDING, RESCHEDULING), NONE while unplaced
    bundle_nodes: list[str]  # node of each bundle (rank), empty until created


class PlacementStatus(BaseModel):
    plan: PlacementPlan
    groups: list[GroupStatus]
    pgs_created: int  # by this process: 0 after a resume that found every group
    pgs_removed: int
    changes: dict[str, int]  # placement changes by this process, by reason
    pid: int


class NodeCheck(BaseModel):
    lost: list[str]
    joined: list[str]
    changes: dict[str, int]


@ray.remote
class PlacementActor:
    """Async actor: methods interleave only at awaits, and a lock keeps replans whole."""

    def __init__(self, config: PlacementConfig) -> None:
        self.config = config
        self.store = PlanStore(config.redis, config.cluster_name)
        self._plan = self.store.load() or PlacementPlan(cluster=config.cluster_name)
        self.pgs_created = self.pgs_removed = 0
        self.changes: Counter[str] = Counter()
        self._turns: Counter[tuple[str, str]] = Counter()
        self._pgs: dict[str, PlacementGroup] = {}
        self._lock = asyncio.Lock()
        self._reconcile()
        directory = os.environ.get(METRICS_DIR_ENV)
        collector = PlacementCollector(lambda: (self._plan, self.changes))
        self._publisher = MultiprocessPublisher(directory, [collector]) if directory else None
        self._publish()
        self._watch = None
        if config.check_interval_s > 0:
            self._watch = asyncio.get_running_loop().create_task(self._watch_nodes())

    async def plan(self, models: Sequence[ModelSpec] | None = None) -> PlacementPlan:
        models = self._wanted(models)
        groups, problems = place(models, self._nodes(), self._plan.groups, self.config.bundle_cpus)
        if problems:
            raise PlacementError("; ".join(problems))
        return self._plan.model_copy(update={"models": models, "groups": groups, "problems": []})

    async def apply(self, models: Sequence[ModelSpec] | None = None) -> PlacementStatus:
        async with self._lock:
            models = self._wanted(models)
            nodes = self._nodes()
            groups, problems = place(models, nodes, self._plan.groups, self.config.bundle_cpus)
            if problems:
                raise PlacementError("; ".join(problems))
            self._commit(models, nodes, groups, problems)
            await self._wait_ready()
            return self._status()

    async def check_nodes(self) -> NodeCheck:
        async with self._lock:
            nodes = self._nodes()
            live = {n.node_id for n in nodes}
            lost = sorted(set(self._plan.nodes) - live)
            joined = sorted(live - set(self._plan.nodes))
            stranded = [g for g in self._plan.groups if g.node_id and g.node_id not in live]
            if not self._plan.models or not (lost or joined or stranded):
                return NodeCheck(lost=lost, joined=joined, changes={})
            groups, problems = place(
                self._plan.models, nodes, self._plan.groups, self.config.bundle_cpus
            )
            for problem in problems:
                log.warning("kvhead placement: %s", problem)
            changes = self._commit(self._plan.models, nodes, groups, problems)
            await self._wait_ready()
            return NodeCheck(lost=lost, joined=joined, changes=dict(changes))

    async def route(self, model: str, prompt_tokens: int, max_new_tokens: int = 0) -> Route:
        return route(self._plan, model, prompt_tokens, max_new_tokens, self._turns)

    async def status(self) -> PlacementStatus:
        return self._status()

    # -- internals ---------------------------------------------------------------------------
    def _wanted(self, models: Sequence[ModelSpec] | None) -> list[ModelSpec]:
        return list(self.config.models if models is None else models)

    def _nodes(self) -> list[NodeInfo]:
        """Live nodes that have devices, as the planner sees them."""
        out = []
        for node in ray.nodes():
            devices = int(node["Resources"].get(self.config.device_resource, 0))
            if node["Alive"] and devices > 0:
                out.append(
                    NodeInfo(
                        node_id=node["NodeID"],
                        address=node["NodeManagerAddress"],
                        devices=devices,
                        cpus=node["Resources"].get("CPU", 0.0),
                        device_kv_bytes=self.config.device_kv_bytes,
                    )
                )
        return out

    def _commit(
        self,
        models: list[ModelSpec],
        nodes: list[NodeInfo],
        groups: list[GroupPlacement],
        problems: list[str],
    ) -> Counter[str]:
        """Save the new plan, then bring the placement groups in line with it."""
        changes = diff(self._plan.groups, groups)
        proposal = self._plan.model_copy(
            update={
                "models": models,
                "nodes": sorted(n.node_id for n in nodes),
                "groups": groups,
                "problems": problems,
                "changes": dict(Counter(self._plan.changes) + changes),
            }
        )
        try:
            self._plan = self.store.save(proposal, self._plan.generation)
        except StalePlanError:
            self._plan = self.store.load() or self._plan  # a newer owner's plan; it reconciles
            raise
        self.changes += changes
        self._reconcile()
        self._publish()
        return changes

    def _reconcile(self) -> None:
        """Make this cluster's placement groups exactly the plan's: attach to those that exist
        (found by name), remove strays, create the missing."""
        prefix = pg_prefix(self.config.cluster_name)
        existing: dict[str, PlacementGroup] = {}
        for pg_id, info in sorted(placement_group_table().items()):
            if info["name"].startswith(prefix) and info["state"] != "REMOVED":
                existing.setdefault(
                    info["name"], PlacementGroup(ray.PlacementGroupID.from_hex(pg_id))
                )
        wanted = {g.pg_name(self.config.cluster_name): g for g in self._plan.groups if g.node_id}
        for name in sorted(existing.keys() - wanted.keys()):
            remove_placement_group(existing.pop(name))
            self.pgs_removed += 1
        for name in sorted(wanted.keys() - existing.keys()):
            existing[name] = self._create(wanted[name], name)
            self.pgs_created += 1
        self._pgs = existing

    def _create(self, group: GroupPlacement, name: str) -> PlacementGroup:
        bundle = {self.config.device_resource: 1.0}
        if self.config.bundle_cpus:
            bundle["CPU"] = self.config.bundle_cpus
        return placement_group(
            [dict(bundle) for _ in range(group.world)],
            strategy="STRICT_PACK",
            name=name,
            lifetime="detached",
            bundle_label_selector=[{NODE_LABEL: group.node_id}] * group.world,
        )

    def _pg_info(self) -> dict[str, dict]:
        """Ray's table entry of each of our placement groups, by name."""
        table = placement_group_table()
        return {name: table.get(pg.id.hex(), {}) for name, pg in self._pgs.items()}

    async def _wait_ready(self) -> None:
        """Poll Ray's table (no task per group) until every group is CREATED, within the bound."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.ready_timeout_s
        while True:
            pending = [n for n, info in self._pg_info().items() if info.get("state") != "CREATED"]
            if not pending:
                return
            if loop.time() > deadline:
                raise PlacementError(
                    f"placement groups not ready within {self.config.ready_timeout_s:g}s: "
                    f"{pending} (another workload may hold the planned devices)"
                )
            await asyncio.sleep(0.1)

    def _status(self) -> PlacementStatus:
        info = self._pg_info()
        groups = []
        for group in self._plan.groups:
            name = group.pg_name(self.config.cluster_name)
            entry = info.get(name, {}) if group.node_id else {}
            nodes = entry.get("bundles_to_node_id", {})
            groups.append(
                GroupStatus(
                    group=group,
                    placement_group=name,
                    state=entry.get("state", "NONE"),
                    bundle_nodes=[nodes[i] for i in sorted(nodes)],
                )
            )
        return PlacementStatus(
            plan=self._plan,
            groups=groups,
            pgs_created=self.pgs_created,
            pgs_removed=self.pgs_removed,
            changes=dict(self.changes),
            pid=os.getpid(),
        )

    def _publish(self) -> None:
        if self._publisher is not None:
            self._publisher.publish()

    async def _watch_nodes(self) -> None:
        """The periodic node check; each round has a deadline, and a failed round (Redis down,
        a group not ready) is logged and retried next round rather than ending the loop."""
        interval = self.config.check_interval_s
        while True:
            await asyncio.sleep(interval)
            try:
                await asyncio.wait_for(self.check_nodes(), interval + self.config.ready_timeout_s)
            except Exception:
                log.exception("kvhead placement: node check failed; retrying in %gs", interval)


def start_placement_actor(config: PlacementConfig, **options: object) -> ActorHandle:
    """The cluster's placement actor, started on the head node if it does not run yet.

    With ``get_if_exists`` a running actor is returned as is (its config unchanged). The actor
    needs no CPU, and Ray restarts it after a crash; the restart resumes from Redis.
    """
    defaults = {
        "name": ACTOR_NAME,
        "namespace": NAMESPACE,
        "lifetime": "detached",
        "get_if_exists": True,
        "max_restarts": -1,
        "num_cpus": 0,
        "resources": {HEAD_RESOURCE: 0.001},
    }
    return PlacementActor.options(**(defaults | options)).remote(config)
