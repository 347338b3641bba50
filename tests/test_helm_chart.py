"""The Helm chart, offline: rendered and linted by Helm's own Go code (helm-python-sdk's bundled
libhelm, no helm binary), core kinds checked by kubernetes-validate, the RayService against
KubeRay's CRD schema (tests/data/kuberay), and the rendered objects asserted on."""

from __future__ import annotations

import base64
import copy
import json
from pathlib import Path

import helm_python as helm
import jsonschema
import kubernetes_validate
import pytest
import yaml

from deployments.config import ServeConfig
from kvhead.presets import PRESETS
from kvhead.vllm.config import ConnectorSettings

ROOT = Path(__file__).parents[1]
CHART = ROOT / "helm" / "kvhead"
VALUES = {
    "default": {},
    "cpu": yaml.safe_load((ROOT / "helm/values/cpu.yaml").read_text()),
    "helix-gpu": yaml.safe_load((ROOT / "helm/values/helix-gpu.yaml").read_text()),
}
KUBE_VERSION = "1.33.0"
# What a pod needs that `kvhead serve` on one machine does not: listen on the pod's address, and
# leave the kvhead_* exporter to the sidecar.
# what a cluster runs unlike `kvhead serve` on one machine: every pod address, a sidecar
# exporter, and prompt pages shared through the chart's Redis
CLUSTER_FIELDS = {"host": "0.0.0.0", "metrics_port": None, "kv_connector": ConnectorSettings()}


def render(values: dict) -> list[dict]:
    chart = helm.Chart.load(CHART)
    chart.validate_schema(values)
    out = chart.render(values, name="kvhead", namespace="llm", is_install=True)
    return [
        doc
        for path, text in sorted(out.items())
        if not path.endswith("NOTES.txt")
        for doc in yaml.safe_load_all(text)
        if doc
    ]


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(VALUES[request.param])


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, [o["kind"] for o in objects]
    return found[0]


def pod_templates(rayservice: dict) -> dict[str, dict]:
    cluster = rayservice["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods |= {g["groupName"]: g["template"] for g in cluster.get("workerGroupSpecs", [])}
    return pods


def crd_schema(path: Path, version: str = "v1") -> dict:
    """KubeRay's openAPIV3Schema as plain JSON Schema: int-or-string made explicit, and unknown
    fields refused where Kubernetes would prune them (a typo must fail here, not vanish)."""
    crd = yaml.safe_load(path.read_text())
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == version)["schema"]

    def convert(node):
        if isinstance(node, list):
            return [convert(n) for n in node]
        if not isinstance(node, dict):
            return node
        out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
        if (
            "properties" in node
            and "additionalProperties" not in node
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out

    return convert(schema["openAPIV3Schema"])


# Built once: jsonschema.validate would re-check the 1 MB schema on every call.
RAYSERVICE = jsonschema.Draft7Validator(
    crd_schema(ROOT / "tests/data/kuberay/ray.io_rayservices.yaml")
)


def test_renders_lint_clean(rendered) -> None:
    name, _ = rendered
    report = helm.lint(CHART, VALUES[name], strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_core_kinds_and_pod_templates_are_schema_valid(rendered) -> None:
    _, objects = rendered
    core = [o for o in objects if o["apiVersion"] in ("v1", "apps/v1")]
    assert {o["kind"] for o in core} >= {"ConfigMap"}
    for obj in core:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    for template in pod_templates(one(objects, "RayService")).values():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}}
        kubernetes_validate.validate(wrapped | {"template": template}, KUBE_VERSION, strict=True)


def test_rayservice_matches_kuberay_crd(rendered) -> None:
    _, objects = rendered
    RAYSERVICE.validate(one(objects, "RayService"))


def test_crd_check_refuses_a_misspelt_field() -> None:
    bad = copy.deepcopy(one(render({}), "RayService"))
    bad["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParam"] = {}
    with pytest.raises(jsonschema.ValidationError, match="rayStartParam"):
        RAYSERVICE.validate(bad)


def test_serve_config_is_the_local_one(rendered) -> None:
    """The ConfigMap the builder reads is a ServeConfig; with default values it is
    deployments/serve.yaml's (what `kvhead serve` runs) but for the pod's address and exporter."""
    name, objects = rendered
    rayservice = one(objects, "RayService")
    app = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["applications"][0]
    assert app["import_path"] == "deployments.app:build"
    config_path = Path(app["args"]["config"])
    configmap = next(o for o in objects if o["metadata"]["name"] == "kvhead-serve-config")
    config = ServeConfig.parse(yaml.safe_load(configmap["data"][config_path.name]))
    for template in pod_templates(rayservice).values():
        ray = template["spec"]["containers"][0]
        mount = next(m for m in ray["volumeMounts"] if m["mountPath"] == str(config_path.parent))
        volume = next(v for v in template["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["configMap"]["name"] == "kvhead-serve-config"
    local = ServeConfig.load(ROOT / "deployments/serve.yaml")
    if name == "default":
        assert config == local.model_copy(update=CLUSTER_FIELDS)
    else:
        expected = ServeConfig.parse(
            local.model_dump() | CLUSTER_FIELDS | _deep(VALUES[name].get("serve", {}))
        )
        assert config == expected
    http = yaml.safe_load(rayservice["spec"]["serveConfigV2"])["http_options"]
    assert http == {"host": "0.0.0.0", "port": config.port}


def _deep(serve: dict) -> dict:
    """Values override the defaults key by key (Helm merges maps), replicas included."""
    out = dict(serve)
    if "replicas" in serve:
        defaults = ServeConfig.load(ROOT / "deployments/serve.yaml").replicas.model_dump()
        out["replicas"] = defaults | serve["replicas"]
    return out


def test_ray_pods_ports_sidecar_and_probes(rendered) -> None:
    _, objects = rendered
    rayservice = one(objects, "RayService")
    config = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    cluster = rayservice["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
    for group in groups:
        assert group["rayStartParams"]["metrics-export-port"] == "8080"
    for name, template in pod_templates(rayservice).items():
        spec = template["spec"]
        assert spec["shareProcessNamespace"] is True  # the exporter checks engine pids
        ray, sidecar = spec["containers"]
        ports = {p["name"]: p["containerPort"] for p in ray["ports"]}
        assert ports["metrics"] == 8080 and ports["serve"] == config["http_options"]["port"]
        if name == "head":
            assert {"gcs", "dashboard", "client"} <= set(ports)
        assert sidecar["command"][:3] == ["kvhead", "metrics", "/tmp/kvhead/metrics"]
        assert sidecar["ports"] == [{"name": "kvhead-metrics", "containerPort": 9400}]
        for probe in ("readinessProbe", "livenessProbe"):
            assert sidecar[probe]["httpGet"] == {"path": "/metrics", "port": "kvhead-metrics"}
        shared = {m["name"] for m in ray["volumeMounts"]} & {
            m["name"] for m in sidecar["volumeMounts"]
        }
        assert shared == {"kvhead-metrics"}
        volume = next(v for v in spec["volumes"] if v["name"] == "kvhead-metrics")
        assert volume == {"name": "kvhead-metrics", "emptyDir": {}}
        labels = template["metadata"]["labels"]
        assert (
            labels["app.kubernetes.io/component"] == f"ray-{'head' if name == 'head' else 'worker'}"
        )


def test_gpu_groups_get_gpus_tolerations_and_node_selector() -> None:
    objects = render(VALUES["helix-gpu"])
    pods = pod_templates(one(objects, "RayService"))
    assert set(pods) == {"head", "gpu"}
    gpu = pods["gpu"]["spec"]
    assert gpu["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert gpu["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert gpu["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H200"}
    assert "nvidia.com/gpu" not in pods["head"]["spec"]["containers"][0]["resources"]["limits"]
    default = pod_templates(one(render({}), "RayService"))
    assert set(default) == {"head", "cpu"}


def test_redis_password_is_referenced_never_inlined() -> None:
    objects = render({"redis": {"auth": {"password": "s3cret-pass"}}})
    secret = one(objects, "Secret")
    assert base64.b64decode(secret["data"]["password"]).decode() == "s3cret-pass"
    others = [o for o in objects if o["kind"] != "Secret"]
    assert "s3cret-pass" not in json.dumps(others)
    redis = one(objects, "StatefulSet")["spec"]["template"]["spec"]["containers"][0]
    assert "$(REDIS_PASSWORD)" in redis["args"]
    ref = {"name": "kvhead-redis", "key": "password"}
    assert redis["env"][0]["valueFrom"]["secretKeyRef"] == ref
    assert "PONG" in " ".join(redis["readinessProbe"]["exec"]["command"])
    for template in pod_templates(one(objects, "RayService")).values():
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["KVHEAD_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == ref
        assert env["KVHEAD_REDIS_URL"]["value"] == "redis://kvhead-redis.llm.svc:6379/0"


def test_redis_persistence_and_generated_password() -> None:
    objects = render({})
    password = base64.b64decode(one(objects, "Secret")["data"]["password"]).decode()
    assert len(password) == 32
    statefulset = one(objects, "StatefulSet")
    claim = statefulset["spec"]["volumeClaimTemplates"][0]
    assert claim["spec"]["resources"]["requests"]["storage"] == "8Gi"
    assert "--appendonly" in statefulset["spec"]["template"]["spec"]["containers"][0]["args"]
    service = one(objects, "Service")
    assert service["spec"]["ports"][0]["port"] == 6379
    assert service["spec"]["selector"] == statefulset["spec"]["selector"]["matchLabels"]
    ephemeral = one(render({"redis": {"persistence": {"enabled": False}}}), "StatefulSet")
    assert "volumeClaimTemplates" not in ephemeral["spec"]


def test_external_redis_with_existing_secret_renders_no_redis() -> None:
    objects = render(VALUES["helix-gpu"])
    assert not [o for o in objects if o["kind"] in ("Secret", "StatefulSet", "Service")]


def test_podmonitors_scrape_ray_and_kvhead_ports() -> None:
    assert not [o for o in render({}) if o["kind"] == "PodMonitor"]
    objects = render({"podMonitor": {"enabled": True}})
    monitors = {o["metadata"]["name"]: o for o in objects if o["kind"] == "PodMonitor"}
    assert set(monitors) == {"kvhead-ray-head", "kvhead-ray-worker"}
    templates = pod_templates(one(objects, "RayService"))
    for name, monitor in monitors.items():
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        ports = [e["port"] for e in monitor["spec"]["podMetricsEndpoints"]]
        assert ports == ["metrics", "kvhead-metrics"]
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [
            n for n, t in templates.items() if selector.items() <= t["metadata"]["labels"].items()
        ]
        assert matched == (["head"] if name.endswith("head") else ["cpu"])
        for pod in matched:
            named = {p["name"] for c in templates[pod]["spec"]["containers"] for p in c["ports"]}
            assert set(ports) <= named


def test_dashboard_configmaps_hold_the_generated_json() -> None:
    objects = render({})
    maps = [o for o in objects if o["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    files = sorted(p.name for p in (ROOT / "dashboards").glob("*.json"))
    assert sorted(k for m in maps for k in m["data"]) == files and len(files) == 3
    for configmap in maps:
        ((name, text),) = configmap["data"].items()
        assert json.loads(text) == json.loads((ROOT / "dashboards" / name).read_text())
    assert not [
        o
        for o in render({"dashboards": {"enabled": False}})
        if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
    ]


def test_schema_mirrors_serve_config() -> None:
    """values.schema.json's `serve` has ServeConfig's fields, types, bounds and descriptions."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]["serve"]
    model = ServeConfig.model_json_schema()

    # the chart's own Redis reaches the connector through the pods' env, never its values
    chart_owned = {"redis"}

    def compare(ours: dict, theirs: dict) -> None:
        assert set(ours["properties"]) == set(theirs["properties"]) - chart_owned
        for field, prop in theirs["properties"].items():
            if field in chart_owned:
                continue
            mine = ours["properties"][field]
            if "$ref" in prop:
                compare(mine, model["$defs"][prop["$ref"].rsplit("/", 1)[1]])
                continue
            ref = next((a["$ref"] for a in prop.get("anyOf", []) if "$ref" in a), None)
            if ref is not None:  # an optional section: an object or null
                assert mine["type"] == ["object", "null"] and mine["additionalProperties"] is False
                assert mine["description"].startswith(prop["description"])
                compare(mine, model["$defs"][ref.rsplit("/", 1)[1]])
                continue
            assert mine["description"] == prop["description"], field
            alternatives = prop.get("anyOf", [prop])
            types = [a["type"] for a in alternatives]
            assert (mine["type"] if isinstance(mine["type"], list) else [mine["type"]]) == types
            for bound in ("minimum", "maximum", "exclusiveMinimum", "enum"):
                given = next((a[bound] for a in alternatives if bound in a), None)
                if bound == "enum" and field == "preset":
                    given = list(PRESETS)  # a validator in pydantic, an enum for Helm
                assert mine.get(bound) == given, (field, bound)

    compare(schema, model)
    assert schema["additionalProperties"] is False  # ServeConfig forbids extra fields too


def test_schema_refuses_what_serve_config_refuses() -> None:
    chart = helm.Chart.load(CHART)
    for bad in (
        {"serve": {"preset": "fastest"}},
        {"serve": {"kv_cache_gib": 0}},
        {"serve": {"replicas": {"min_replicas": 0}}},
        {"serve": {"typo_field": 1}},
        {"redis": {"externalUrl": "redis://user:pw@host:6379"}},
    ):
        with pytest.raises(helm.HelmValuesError):
            chart.validate_schema(bad)


def test_the_kv_connector_follows_the_charts_redis() -> None:
    """With a Redis (the chart's or an external one) replicas share prompt pages through it;
    without one the connector is off, so no engine waits on an address that answers nothing."""

    def connector(values: dict) -> dict | None:
        configmap = next(
            o for o in render(values) if o["metadata"]["name"] == "kvhead-serve-config"
        )
        return yaml.safe_load(configmap["data"]["serve.yaml"])["kv_connector"]

    assert connector({}) == {}
    assert connector({"serve": {"kv_connector": {"min_match_tokens": 512}}}) == {
        "min_match_tokens": 512
    }
    external = {"redis": {"enabled": False, "externalUrl": "redis://cache.example:6379/0"}}
    assert connector(external) == {}
    assert connector({"redis": {"enabled": False}}) is None
    assert connector({"serve": {"kv_connector": None}}) is None
