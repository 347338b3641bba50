"""Run the Helm chart's serving config the way a pod does, load it, and render the dashboards into
docs/dashboards/ (the PNGs docs/operators.md shows).

What a Ray pod of the chart runs, on 127.0.0.1: Ray started on its own (``ray start``, metrics on
a fixed port, as KubeRay does), the chart's rendered serve config (default values) deployed with
Ray's own ``serve run deployments.app:build config=FILE``, and the ``kvhead metrics`` sidecar
exporting the engines' folder. A local Prometheus (Debian's) scrapes the sidecar and Ray's
metrics port while two streams send long (2k-4k tokens) and short requests; then
``kvhead dashboards snapshot`` draws every panel. Everything is stopped at the end.

    python scripts/snapshot_dashboards.py [--minutes 6 --out docs/dashboards]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import helm_python as helm
import openai
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from prometheus_server import running_prometheus  # noqa: E402

from dashboards.snapshot import snapshot  # noqa: E402
from deployments.config import ServeConfig  # noqa: E402

BIN = Path(sys.executable).parent
RAY_METRICS_PORT, SIDECAR_PORT, HTTP_PORT, GCS_PORT = 8080, 9400, 8000, 6390  # the defaults
ADDRESS = f"127.0.0.1:{GCS_PORT}"


def chart_serve_config() -> dict:
    """The serve config the chart's ConfigMap holds with default values."""
    chart = helm.Chart.load(ROOT / "helm" / "kvhead")
    rendered = chart.render({}, name="kvhead", namespace="llm", is_install=True)
    for path, text in sorted(rendered.items()):
        if path.endswith("serve-configmap.yaml"):
            (data,) = yaml.safe_load(text)["data"].values()
            return yaml.safe_load(data)
    raise SystemExit("the chart rendered no serve ConfigMap")


def _load(url: str, model: str, minutes: float) -> int:
    """Two streams of long and short requests until time is up; returns how many completed."""
    words = (ROOT / "kvhead" / "data" / "python_docs" / "tutorial-classes.txt").read_text().split()
    prompts = [" ".join(words[: 1500 + 600 * i]) for i in range(3)] + ["Once upon a time"] * 3
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="-", max_retries=0, timeout=900)
    stop = time.monotonic() + 60 * minutes

    def stream(offset: int) -> int:
        done = 0
        while time.monotonic() < stop:
            prompt = prompts[(done + offset) % len(prompts)]
            client.completions.create(model=model, prompt=prompt, max_tokens=48)
            done += 1
        return done

    with ThreadPoolExecutor(2) as pool:
        return sum(pool.map(stream, range(2)))


def main(
    minutes: float = typer.Option(6.0, help="Minutes of load before the snapshot."),
    out: Path = typer.Option(ROOT / "docs" / "dashboards", help="Where the PNGs go."),
) -> None:
    raw = chart_serve_config()
    config = ServeConfig.parse(raw | {"host": "127.0.0.1", "port": HTTP_PORT})
    tmp = Path(tempfile.mkdtemp(prefix="kvhead-snapshot-"))
    config_file = tmp / "serve.yaml"
    config_file.write_text(yaml.safe_dump(config.model_dump()))
    # Ray 2.60 turns token authentication on for `ray start`; its clients must say so
    env = os.environ | {"RAY_worker_niceness": "0", "RAY_AUTH_MODE": "token"}
    ray = [str(BIN / "ray"), "start", "--head", "--num-cpus", "3", "--include-dashboard=false"]
    ray += [f"--metrics-export-port={RAY_METRICS_PORT}", f"--port={GCS_PORT}"]
    subprocess.run(ray, check=True, env=env)
    serve = [str(BIN / "serve"), "start", "--address", ADDRESS, "--http-host", "127.0.0.1"]
    subprocess.run([*serve, "--http-port", str(HTTP_PORT)], check=True, env=env)
    procs = [
        subprocess.Popen(
            [str(BIN / "kvhead"), "metrics", config.metrics_dir, "--host", "127.0.0.1"]
            + ["--port", str(SIDECAR_PORT)]
        ),
        subprocess.Popen(
            [str(BIN / "serve"), "run", "--address", ADDRESS, "deployments.app:build"]
            + [f"config={config_file}"],
            cwd=ROOT,
            env=env,
        ),
    ]
    url = f"http://127.0.0.1:{HTTP_PORT}"
    try:
        deadline = time.monotonic() + 1200
        while True:
            try:
                (card,) = openai.OpenAI(base_url=f"{url}/v1", api_key="-").models.list().data
                break
            except (openai.APIConnectionError, openai.NotFoundError, ValueError):
                if procs[1].poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("serve run did not start the chart's config") from None
                time.sleep(5)
        print(f"serve run is serving {card.id} from the chart's config")
        targets = [f"127.0.0.1:{SIDECAR_PORT}", f"127.0.0.1:{RAY_METRICS_PORT}"]
        with running_prometheus(targets, tmp) as prom:
            served = _load(url, card.id, minutes)
            time.sleep(15)
            rendered = snapshot(prom.url, out, minutes=minutes + 1)
        missing = [r.panel for r in rendered if r.status != "ok"]
        print(f"{served} requests; {len(rendered)} panels, without data: {missing}")
    finally:
        for proc in reversed(procs):
            proc.terminate()
            proc.wait(timeout=120)
        subprocess.run([str(BIN / "ray"), "stop", "--force"], check=False)


if __name__ == "__main__":
    typer.run(main)
