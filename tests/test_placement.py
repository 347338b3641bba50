"""The placement actor (cluster/): the pure planner and router, the plan in a real Redis, and the
actor on a local multi-node Ray cluster (a head and three raylets on 127.0.0.1, each worker with
two devices of a custom resource): plan, place, route by length, lose a node, replan, restart
the actor, state intact; lose another node with the periodic check on; a node joins."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
from redis_server import RedisServer, free_port, running_redis

from cluster.config import ModelSpec, PlacementConfig
from cluster.metrics import PlacementCollector
from cluster.plan import (
    GroupPlacement,
    NodeInfo,
    PlacementError,
    PlacementPlan,
    RoutingError,
    diff,
    group_layout,
    place,
    plan_cluster,
    rank_kv_bytes,
    route,
)
from cluster.store import PlanStore, StalePlanError, StoreError
from kvhead.core.helix import HelixLayout
from kvstore.config import RedisTierConfig
from kvstore.metrics import METRICS_DIR_ENV, NodeCollector

GiB, MiB = 2**30, 2**20
# 32 layers, 32 query / 2 KV heads of 128, bf16: 32 KiB of KV per token, 32 GiB at 1M tokens.
GQA2 = ModelSpec(
    name="gqa2",
    num_layers=32,
    num_q_heads=32,
    num_kv_heads=2,
    head_dim=128,
    context_tokens=2**20,
    plain_max_tokens=2**15,
)


def node(node_id: str, devices: int, budget: int = 6 * GiB, cpus: float = 64) -> NodeInfo:
    return NodeInfo(
        node_id=node_id, address="127.0.0.1", devices=devices, cpus=cpus, device_kv_bytes=budget
    )


def at(groups: list[GroupPlacement]) -> list[tuple[str, str | None, int, int]]:
    return [(g.key, g.node_id, g.world, g.epoch) for g in groups]


# -- sizing ----------------------------------------------------------------------------------
def test_helix_group_is_the_smallest_allowed_world_whose_rank_share_fits() -> None:
    # N=1: 32 GiB, N=2 (TP 2): 16, N=3 breaks "N divides the query heads", N=4 (TP 2 × KVP 2):
    # 8, N=5..7 forbidden, N=8 (TP 2 × KVP 4): 4 GiB <= 6 GiB.
    layout = group_layout(GQA2, "helix", node("n", 8, budget=6 * GiB))
    assert (layout.world, layout.tp, layout.kvp) == (8, 2, 4)
    assert rank_kv_bytes(GQA2, layout, GQA2.context_tokens) == 4 * GiB
    layout = group_layout(GQA2, "helix", node("n", 8, budget=8 * GiB))
    assert (layout.world, layout.tp, layout.kvp) == (4, 2, 2)
    assert group_layout(GQA2, "plain", node("n", 1)).world == 1


def test_rank_share_counts_the_fullest_kvp_shard_of_an_uneven_sequence() -> None:
    # 1000 tokens in blocks of 16 over KVP 4: 15 whole rounds (240 each) + 40 tokens, of which
    # shard 0 takes a full block: 256 tokens of one KV head (TP 2 of 2 heads).
    layout = HelixLayout(kvp=4, tp=2)
    assert rank_kv_bytes(GQA2, layout, 1000) == 2 * 32 * 1 * 128 * 2 * 256


def test_forbidden_world_sizes_are_skipped() -> None:
    # 12 query / 4 KV heads: N=5 does not divide 12, so a share between 1/4 and 1/5 needs N=6
    # (TP 2 × KVP 3).
    spec = ModelSpec(
        name="odd",
        num_layers=1,
        num_q_heads=12,
        num_kv_heads=4,
        head_dim=128,
        context_tokens=6144,
        plain_max_tokens=1024,
    )
    total = spec.kv_bytes(6144)
    layout = group_layout(spec, "helix", node("n", 8, budget=total // 4 - 1))
    assert (layout.world, layout.tp, layout.kvp) == (6, 2, 3)
    assert rank_kv_bytes(spec, layout, 6144) == total // 6


def test_refusals_name_the_numbers() -> None:
    with pytest.raises(
        PlacementError,
        match=r"32\.0 GiB of KV.*N=8 of 8 devices.*4\.0 GiB per "
        r"rank, a device holds 3\.0 GiB",
    ):
        plan_cluster([GQA2], [node("n", 8, budget=3 * GiB)])
    with pytest.raises(PlacementError, match=r"N=4 of 4 devices\) leaves 8\.0 GiB per rank"):
        plan_cluster([GQA2], [node("n", 4)])
    plain = GQA2.model_copy(update={"helix_groups": 0, "plain_replicas": 1})
    with pytest.raises(PlacementError, match=r"32768-token sequence needs 1\.0 GiB.*0\.5 GiB"):
        plan_cluster([plain], [node("n", 8, budget=GiB // 2)])
    with pytest.raises(
        PlacementError,
        match=r"needs 8 devices and 8 CPUs on one node, node "
        r"n1 has 8 and 4 free",
    ):
        plan_cluster([GQA2], [node("n1", 8, cpus=4)])
    with pytest.raises(PlacementError, match="unique"):
        plan_cluster([GQA2, GQA2], [node("n", 8)])
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        ModelSpec(**(GQA2.model_dump() | {"num_kv_heads": 3}))


# -- assignment ------------------------------------------------------------------------------
SMALL = ModelSpec(  # 1 KiB per token, 64 MiB at 64k tokens: two devices of 40 MiB (KVP 2)
    name="small",
    num_layers=4,
    num_q_heads=8,
    num_kv_heads=1,
    head_dim=64,
    context_tokens=2**16,
    plain_max_tokens=2**12,
    helix_groups=2,
    plain_replicas=2,
)
BUDGET = 40 * MiB


def test_assignment_is_most_free_first_ties_by_id_and_order_free() -> None:
    nodes = [node("a", 4, BUDGET), node("b", 2, BUDGET), node("c", 2, BUDGET)]
    groups = plan_cluster([SMALL], nodes)
    assert at(groups) == [
        ("small:helix:0", "a", 2, 0),  # a has 4 free
        ("small:helix:1", "a", 2, 0),  # 2 free everywhere: a by id
        ("small:plain:0", "b", 1, 0),
        ("small:plain:1", "c", 1, 0),  # c has 2 free, b 1
    ]
    assert (groups[0].kvp, groups[0].tp) == (2, 1)
    for _ in range(5):
        random.shuffle(nodes)
        assert plan_cluster([SMALL], nodes) == groups


def test_replan_keeps_survivors_moves_the_lost_and_counts_changes() -> None:
    spec = SMALL.model_copy(update={"helix_groups": 1, "plain_replicas": 1})
    nodes = [node(i, 2, BUDGET) for i in "abc"]
    first = plan_cluster([spec], nodes)
    assert at(first) == [("small:helix:0", "a", 2, 0), ("small:plain:0", "b", 1, 0)]
    assert diff([], first) == {"placed": 2}
    second, problems = place([spec], nodes[1:], first)
    assert problems == []
    assert at(second) == [("small:helix:0", "c", 2, 1), ("small:plain:0", "b", 1, 0)]
    assert diff(first, second) == {"moved": 1}
    assert diff(second, []) == {"removed": 2}


def test_no_room_leaves_groups_unplaced_until_a_node_joins() -> None:
    nodes = [node("a", 4, BUDGET), node("b", 2, BUDGET), node("c", 2, BUDGET)]
    first = plan_cluster([SMALL], nodes)
    lost, problems = place([SMALL], nodes[1:], first)
    assert at(lost) == [
        ("small:helix:0", None, 0, 0),
        ("small:helix:1", None, 0, 0),
        ("small:plain:0", "b", 1, 0),
        ("small:plain:1", "c", 1, 0),
    ]
    assert len(problems) == 2
    assert problems[0].startswith("small:helix:0 unplaced: needs 2 devices and 2 CPUs")
    assert "node b has 1" in problems[0] and "node c has 1" in problems[0]
    assert diff(first, lost) == {"unplaced": 2}
    back, problems = place([SMALL], [*nodes[1:], node("d", 4, BUDGET)], lost)
    assert problems == []
    assert at(back)[:2] == [("small:helix:0", "d", 2, 1), ("small:helix:1", "d", 2, 1)]
    assert diff(lost, back) == {"placed": 2}


# -- routing ---------------------------------------------------------------------------------
def small_plan(groups: list[GroupPlacement]) -> PlacementPlan:
    return PlacementPlan(cluster="t", models=[SMALL], groups=groups)


def test_route_by_length_round_robin_per_pool() -> None:
    plan = small_plan(plan_cluster([SMALL], [node("a", 4, BUDGET), node("b", 2, BUDGET)]))
    turns: Counter[tuple[str, str]] = Counter()
    pick = lambda n, new=0: route(plan, "small", n, new, turns)  # noqa: E731
    assert [(r.pool, r.group) for r in (pick(10), pick(4096), pick(4097), pick(10))] == [
        ("plain", "small:plain:0"),
        ("plain", "small:plain:1"),
        ("helix", "small:helix:0"),  # a long request does not move the plain rotation
        ("plain", "small:plain:0"),
    ]
    long = pick(4000, new=100)  # prompt + output decide: 4100 > 4096
    assert (long.pool, long.group, long.node_id) == ("helix", "small:helix:1", "a")
    assert long.placement_group == "kvhead:t:small:helix:1:e0"
    with pytest.raises(RoutingError, match="65537 tokens exceed the context target of 65536"):
        pick(2**16 + 1)
    with pytest.raises(RoutingError, match="unknown model 'other'"):
        route(plan, "other", 10)


def test_route_falls_back_to_the_pool_that_can_hold_the_request() -> None:
    groups = plan_cluster([SMALL], [node("a", 4, BUDGET), node("b", 2, BUDGET)])
    no_plain = small_plan([g for g in groups if g.kind == "helix"])
    assert route(no_plain, "small", 10).pool == "helix"
    no_helix = small_plan([g for g in groups if g.kind == "plain"])
    no_helix.problems.append("small:helix:0 unplaced: no room")
    assert route(no_helix, "small", 10).pool == "plain"
    with pytest.raises(RoutingError, match="no helix group is placed .*no room"):
        route(no_helix, "small", 5000)


# -- the plan in Redis -----------------------------------------------------------------------
def test_store_round_trip_compare_and_set_and_refusals(redis_srv: RedisServer) -> None:
    store = PlanStore(RedisTierConfig(url=redis_srv.url), "t")
    assert store.load() is None
    plan = small_plan(plan_cluster([SMALL], [node("a", 4, BUDGET), node("b", 2, BUDGET)]))
    saved = store.save(plan, 0)
    assert saved.generation == 1 and store.load() == saved
    assert store.save(saved, 1).generation == 2
    with pytest.raises(StalePlanError, match="generation 2, this writer expected 1"):
        store.save(saved, 1)  # an older incarnation cannot overwrite the newer plan
    raw = redis.Redis.from_url(redis_srv.url)
    assert raw.keys("kvhead:placement:*") == [b"kvhead:placement:t"]
    raw.set("kvhead:placement:t", saved.model_dump_json().replace('"version":1', '"version":9'))
    with pytest.raises(StoreError, match="schema version 9; this code reads version 1"):
        store.load()
    down = PlanStore(RedisTierConfig(url=f"redis://u:secret@127.0.0.1:{free_port()}/0"), "t")
    with pytest.raises(StoreError, match=r"kvhead:placement:t at redis://127\.0\.0\.1") as err:
        down.load()
    assert "secret" not in str(err.value)


# -- metrics ---------------------------------------------------------------------------------
def samples(collect: Callable[[], Iterator]) -> dict[tuple, float]:
    """Sample values by (name, labels without pid), summed over processes."""
    out: dict[tuple, float] = {}
    for family in collect():
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "pid"))
            out[s.name, labels] = out.get((s.name, labels), 0.0) + s.value
    return out


def test_collector_zeroes_a_group_that_left_a_node() -> None:
    nodes = [node(i, 2, BUDGET) for i in "abc"]
    spec = SMALL.model_copy(update={"helix_groups": 1, "plain_replicas": 1})
    state = {"plan": small_plan(plan_cluster([spec], nodes)), "changes": {"placed": 2}}
    collector = PlacementCollector(lambda: (state["plan"], state["changes"]))
    helix = lambda n: ("kvhead_helix_groups", (("model", "small"), ("node", n)))  # noqa: E731
    assert samples(collector.collect)[helix("a")] == 1
    groups, _ = place([spec], nodes[1:], state["plan"].groups)
    state = {"plan": small_plan(groups), "changes": {"placed": 2, "moved": 1}}
    got = samples(collector.collect)
    assert (got[helix("a")], got[helix("c")]) == (0, 1)
    assert got["kvhead_placement_changes_total", (("reason", "moved"),)] == 1


# -- the actor on a local multi-node Ray cluster ------------------------------------------------
DEVICE = "kvhead_device"
LONG = SMALL.model_copy(update={"name": "tiny-long", "helix_groups": 1, "plain_replicas": 1})
WAIT_S = 30


def wait_for(what: str, ok: Callable[[], bool], timeout: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout}s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[dict]:
    """Head (1 CPU, no devices) + three workers with 2 devices and 1 CPU each, all on 127.0.0.1
    in a private Ray temp dir (so no other Ray user's ``ray.init()`` finds this cluster), plus a
    redis-server for the plan."""
    ray = pytest.importorskip("ray")
    import ray._private.ray_constants as ray_constants
    from ray.cluster_utils import Cluster

    patch = pytest.MonkeyPatch()
    # Ray rewrites 127.0.0.1 to the host's interface address unless it runs in its single-host
    # mode (macOS, Windows); in that mode every address stays on the loopback interface.
    patch.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    temp = tempfile.mkdtemp(prefix="kvr")  # short: Ray's socket paths must stay < 108 bytes
    patch.setenv("RAY_TMPDIR", temp)
    gcs_port = free_port()
    node_args = {"object_store_memory": 80 * MiB, "node_ip_address": "127.0.0.1"}
    head_args = {"num_cpus": 1, "include_dashboard": False, "gcs_server_port": gcs_port}
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args=head_args | node_args)
        workers = [
            cluster.add_node(num_cpus=1, resources={DEVICE: 2}, **node_args) for _ in range(3)
        ]
        cluster.wait_for_nodes(timeout=WAIT_S)
        ray.init(
            address=f"127.0.0.1:{gcs_port}",
            namespace="kvhead",
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
        )
        with running_redis() as server:
            yield {"ray": ray, "cluster": cluster, "workers": workers, "redis": server}
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        patch.undo()
        shutil.rmtree(temp, ignore_errors=True)


def config_for(redis_url: str, **overrides: object) -> PlacementConfig:
    settings = {
        "cluster_name": "test",
        "redis": RedisTierConfig(url=redis_url),
        "device_resource": DEVICE,
        "device_kv_bytes": 40 * MiB,
        "bundle_cpus": 0.5,
        "check_interval_s": 0,
        "ready_timeout_s": WAIT_S,
        "models": [LONG],
    }
    return PlacementConfig(**(settings | overrides))


@pytest.fixture(scope="module")
def placed(ray_cluster: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    from cluster.actor import start_placement_actor

    metrics = tmp_path_factory.mktemp("metrics")
    config = config_for(ray_cluster["redis"].url)
    env = {"runtime_env": {"env_vars": {METRICS_DIR_ENV: str(metrics)}}}
    actor = start_placement_actor(config, **env)
    status = ray_cluster["ray"].get(actor.apply.remote(), timeout=120)
    ids = sorted(w.node_id for w in ray_cluster["workers"])
    return {
        "actor": actor,
        "status": status,
        "config": config,
        "metrics": metrics,
        "ids": ids,
        "env": env,
    }


def metric(directory: str, name: str, **labels: str) -> float:
    return samples(NodeCollector(directory).collect)[name, tuple(sorted(labels.items()))]


def our_pgs(ray) -> dict[str, str]:
    """Live placement groups of the test cluster: name -> id."""
    table = ray.util.placement_group_table()
    return {
        info["name"]: pg_id
        for pg_id, info in table.items()
        if info["name"].startswith("kvhead:test:") and info["state"] != "REMOVED"
    }


@pytest.mark.slow
def test_apply_places_strict_pack_groups_on_the_planned_nodes(ray_cluster: dict, placed: dict):
    ray, status, ids = ray_cluster["ray"], placed["status"], placed["ids"]
    helix, plain = status.groups
    # every worker has 2 free devices: the Helix group takes the first by id, the plain replica
    # the next (2 free against 0)
    assert (helix.group.key, helix.group.world, helix.group.kvp, helix.group.tp) == (
        "tiny-long:helix:0",
        2,
        2,
        1,
    )
    assert (helix.state, helix.bundle_nodes) == ("CREATED", [ids[0], ids[0]])
    assert (plain.group.key, plain.state, plain.bundle_nodes) == (
        "tiny-long:plain:0",
        "CREATED",
        [ids[1]],
    )
    assert (status.pgs_created, status.changes, status.plan.generation) == (2, {"placed": 2}, 1)
    table = ray.util.placement_group_table()
    entry = table[our_pgs(ray)["kvhead:test:tiny-long:helix:0:e0"]]
    assert entry["strategy"] == "STRICT_PACK"
    assert entry["bundles"][1] == {DEVICE: 1.0, "CPU": 0.5}
    # the plan in Redis is the actor's
    assert PlanStore(placed["config"].redis, "test").load() == status.plan
    # a replica's rank scheduled into the group's bundle lands on the planned node
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    pg = ray.util.get_placement_group("kvhead:test:tiny-long:helix:0:e0")
    where = ray.remote(lambda: ray.get_runtime_context().get_node_id()).options(
        num_cpus=0.5,
        resources={DEVICE: 1},
        scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=1),
    )
    assert ray.get(where.remote(), timeout=60) == ids[0]
    directory = str(placed["metrics"])
    assert metric(directory, "kvhead_helix_groups", model="tiny-long", node=ids[0]) == 1
    assert metric(directory, "kvhead_placement_changes_total", reason="placed") == 2


@pytest.mark.slow
def test_plan_is_a_dry_run_and_apply_refuses_what_cannot_fit(ray_cluster: dict, placed: dict):
    ray, actor = ray_cluster["ray"], placed["actor"]
    proposal = ray.get(actor.plan.remote(), timeout=WAIT_S)
    assert proposal.groups == placed["status"].plan.groups
    huge = LONG.model_copy(update={"context_tokens": 2**20})
    with pytest.raises(
        PlacementError,
        match=r"1\.0 GiB of KV.*N=2 of 2 devices\) leaves 0\.5 "
        r"GiB per rank, a device holds 40\.0 MiB",
    ):
        ray.get(actor.apply.remote([huge]), timeout=WAIT_S)
    after = ray.get(actor.status.remote(), timeout=WAIT_S)
    assert (after.plan, after.pgs_created) == (placed["status"].plan, 2)


@pytest.mark.slow
def test_route_by_length(ray_cluster: dict, placed: dict) -> None:
    ray, actor, ids = ray_cluster["ray"], placed["actor"], placed["ids"]
    go = lambda *a: ray.get(actor.route.remote("tiny-long", *a), timeout=WAIT_S)  # noqa: E731
    assert (go(100).pool, go(100).node_id) == ("plain", ids[1])
    assert go(4096).pool == "plain"
    assert (go(4097).pool, go(4097).node_id) == ("helix", ids[0])
    assert go(4000, 200).placement_group == "kvhead:test:tiny-long:helix:0:e0"
    with pytest.raises(RoutingError, match="exceed the context target of 65536"):
        go(70000)


@pytest.mark.slow
def test_redis_unreachable_at_start_is_a_clear_error(ray_cluster: dict) -> None:
    from ray.exceptions import RayActorError

    from cluster.actor import NAMESPACE, start_placement_actor

    ray, name = ray_cluster["ray"], "kvhead-placement-no-redis"
    url = f"redis://127.0.0.1:{free_port()}/0"
    actor = start_placement_actor(config_for(url), name=name)
    with pytest.raises(
        RayActorError, match=f"cannot read the placement plan kvhead:placement:test at {url}"
    ):
        ray.get(actor.status.remote(), timeout=60)
    wait_for("no restart loop: the actor stays dead", lambda: _gone(ray, name, NAMESPACE))


@pytest.mark.slow
def test_node_loss_replan_restart_and_join(ray_cluster: dict, placed: dict) -> None:
    from cluster.actor import ACTOR_NAME, NAMESPACE, start_placement_actor

    ray, cluster, ids = ray_cluster["ray"], ray_cluster["cluster"], placed["ids"]
    actor, directory = placed["actor"], str(placed["metrics"])
    workers = {w.node_id: w for w in ray_cluster["workers"]}

    def remove(node_id: str) -> None:
        cluster.remove_node(workers[node_id])
        wait_for(
            f"{node_id} dead",
            lambda: not any(n["Alive"] for n in ray.nodes() if n["NodeID"] == node_id),
        )

    # 1. the Helix group's node leaves: the group moves to the one node with 2 free devices
    remove(ids[0])
    check = ray.get(actor.check_nodes.remote(), timeout=60)
    assert (check.lost, check.joined, check.changes) == ([ids[0]], [], {"moved": 1})
    status = ray.get(actor.status.remote(), timeout=WAIT_S)
    helix, plain = status.groups
    assert (helix.group.node_id, helix.group.epoch, helix.state) == (ids[2], 1, "CREATED")
    assert helix.bundle_nodes == [ids[2], ids[2]]
    assert (plain.group.node_id, plain.group.epoch) == (ids[1], 0)  # untouched
    assert (status.pgs_created, status.pgs_removed) == (3, 1)
    assert status.plan.changes == {"placed": 2, "moved": 1}
    assert sorted(our_pgs(ray)) == [
        "kvhead:test:tiny-long:helix:0:e1",
        "kvhead:test:tiny-long:plain:0:e0",
    ]
    assert ray.get(actor.route.remote("tiny-long", 5000), timeout=WAIT_S).node_id == ids[2]
    assert metric(directory, "kvhead_helix_groups", model="tiny-long", node=ids[0]) == 0
    assert metric(directory, "kvhead_helix_groups", model="tiny-long", node=ids[2]) == 1
    assert metric(directory, "kvhead_placement_changes_total", reason="moved") == 1

    # 2. the actor dies; a new one with the same name resumes the plan from Redis and attaches
    # to the same placement groups (now with the periodic node check on)
    before, pgs = status, our_pgs(ray)
    ray.kill(actor)
    wait_for("the name is free", lambda: _gone(ray, ACTOR_NAME, NAMESPACE))
    wait_for("the old process exited", lambda: not _alive(before.pid))
    config = config_for(ray_cluster["redis"].url, check_interval_s=0.5)
    actor = start_placement_actor(config, **placed["env"])
    resumed = ray.get(actor.status.remote(), timeout=60)
    assert resumed.pid != before.pid
    assert (resumed.pgs_created, resumed.pgs_removed, resumed.changes) == (0, 0, {})
    assert resumed.plan == before.plan
    assert [g.state for g in resumed.groups] == ["CREATED", "CREATED"]
    assert our_pgs(ray) == pgs
    assert ray.get(actor.route.remote("tiny-long", 5000), timeout=WAIT_S).node_id == ids[2]
    assert metric(directory, "kvhead_placement_changes_total", reason="moved") == 1  # not twice
    assert metric(directory, "kvhead_helix_groups", model="tiny-long", node=ids[2]) == 1
    # a crash (Ray restarts the actor itself, same arguments) resumes the same way
    ray.kill(actor, no_restart=False)
    wait_for("Ray restarted it", lambda: _restarted(ray, actor, resumed.pid))
    again = ray.get(actor.status.remote(), timeout=WAIT_S)
    assert (again.pgs_created, again.pgs_removed, again.plan) == (0, 0, before.plan)
    assert our_pgs(ray) == pgs

    # 3. the plain replica's node leaves; the periodic check finds no room (the Helix group holds
    # the last node's devices), so short requests go to the Helix group meanwhile
    remove(ids[1])
    unplaced = lambda: (
        ray.get(actor.status.remote(), timeout=WAIT_S).groups[1].group.node_id is None
    )  # noqa: E731
    wait_for("the loop noticed", unplaced)
    status = ray.get(actor.status.remote(), timeout=WAIT_S)
    assert "tiny-long:plain:0 unplaced" in status.plan.problems[0]
    assert ray.get(actor.route.remote("tiny-long", 10), timeout=WAIT_S).pool == "helix"
    assert (
        metric(directory, "kvhead_placement_unplaced_groups", model="tiny-long", kind="plain") == 1
    )

    # 4. a node joins: the loop places the plain replica there
    fresh = cluster.add_node(
        num_cpus=1, resources={DEVICE: 2}, object_store_memory=80 * MiB, node_ip_address="127.0.0.1"
    )
    placed_again = lambda: (
        ray.get(actor.status.remote(), timeout=WAIT_S).groups[1].state == "CREATED"
    )  # noqa: E731
    wait_for("the loop placed the plain replica", placed_again)
    status = ray.get(actor.status.remote(), timeout=WAIT_S)
    assert status.groups[1].bundle_nodes == [fresh.node_id]
    assert status.plan.changes == {"placed": 3, "moved": 1, "unplaced": 1}
    assert status.plan.problems == []
    route_short = ray.get(actor.route.remote("tiny-long", 10), timeout=WAIT_S)
    assert (route_short.pool, route_short.node_id) == ("plain", fresh.node_id)
    assert PlanStore(config.redis, "test").load() == status.plan


def _gone(ray, name: str, namespace: str) -> bool:
    try:
        ray.get_actor(name, namespace=namespace)
    except ValueError:
        return True
    return False


def _restarted(ray, actor, old_pid: int) -> bool:
    try:
        return ray.get(actor.status.remote(), timeout=5).pid != old_pid
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):  # not back yet
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
