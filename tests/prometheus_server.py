"""A real Prometheus server (Debian's ``prometheus``) for tests: own port, own storage, stopped
after. It scrapes the given 127.0.0.1 targets every second."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from vllm_tiny import free_port


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict]:
        """Instant query: ``[{"metric": {labels}, "value": [t, "v"]}, ...]``."""
        q = urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]["result"]

    def values(self, promql: str) -> list[float]:
        return [float(r["value"][1]) for r in self.query(promql)]

    def wait_for(self, promql: str, timeout_s: float = 60) -> list[dict]:
        """Poll until ``promql`` returns a series (the first scrapes take a few seconds)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if result := self.query(promql):
                return result
            time.sleep(1)
        raise TimeoutError(f"Prometheus never had {promql}")


@contextlib.contextmanager
def running_prometheus(targets: list[str], tmp: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("prometheus is not on PATH (apt-get install prometheus)")
    config = tmp / "prometheus.yml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "scrape_configs": [
                    {"job_name": "kvhead", "static_configs": [{"targets": targets}]}
                ],
            }
        )
    )
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2)
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError((tmp / "prometheus.log").read_text()[-2000:]) from None
                time.sleep(0.5)
        yield Prometheus(url)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
