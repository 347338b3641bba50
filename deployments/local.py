"""Run the application on this machine: a local Ray sized for it, one command, Ctrl-C stops all.

What ``kvhead serve`` does after the config is checked: build the plugin's native kernels (a
first request would otherwise wait about a minute for the compiler), start Ray with the
settings a small host needs, deploy, wait until ``/health`` says a request would be served, and
hand the caller the URL. Everything started here is stopped by :func:`stop`.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deployments.app import REPLICA_ENV, build_app
from deployments.config import ServeConfig, ServeConfigError
from kvhead.vllm.preflight import EnginePlan
from kvstore.metrics import MetricsServer, NodeCollector, serve_node_metrics

APP_NAME = "kvhead"
RAY_OVERHEAD_BYTES = int(2.5 * 2**30)  # Ray's own processes on a node (measured)
MIN_LOGICAL_CPUS = 3  # replica placement group + replica + controller on a 2-core host


@dataclass(frozen=True)
class Running:
    url: str
    model_id: str
    plan: EnginePlan
    metrics_url: str | None


_exporter: MetricsServer | None = None  # this host's kvhead_* exporter, closed by stop()


def ensure_free(port: int, field: str) -> None:
    """Refuse a busy port before anything starts (Ray would fail later, less clearly)."""
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError as err:
            raise ServeConfigError(f"{field} {port}: {err.strerror}") from None


def start_exporter(config: ServeConfig) -> str | None:
    """Serve the engines' ``kvhead_*`` metrics of this host (config ``metrics_port``) after
    dropping an earlier run's files; a busy port is refused before anything starts."""
    global _exporter
    if config.metrics_port is None:
        return None
    NodeCollector(config.metrics_dir).clear_finished()
    try:
        _exporter = serve_node_metrics(config.metrics_dir, config.host, config.metrics_port)
    except OSError as err:
        raise ServeConfigError(
            f"metrics_port {config.metrics_port} on {config.host}: {err.strerror}"
        ) from None
    return f"http://{config.host}:{config.metrics_port}/metrics"


def check_memory(config: ServeConfig, plan: EnginePlan) -> None:
    """Refuse replicas whose KV cache and host arena cannot fit this machine's free memory."""
    import psutil

    per_replica = config.kv_cache_bytes + plan.host_arena_bytes
    need = config.replicas.min_replicas * per_replica + RAY_OVERHEAD_BYTES
    free = psutil.virtual_memory().available
    if need > free:
        raise ServeConfigError(
            f"{config.replicas.min_replicas} replica(s) need {per_replica / 2**30:.1f} GiB each "
            f"(KV cache {config.kv_cache_gib} GiB + host arena "
            f"{plan.host_arena_bytes / 2**30:.1f} GiB) plus ~2.5 GiB for Ray, but "
            f"{free / 2**30:.1f} GiB are free: lower kv_cache_gib or min_replicas"
        )


def stop_on_signals() -> None:
    """Make SIGTERM (service managers, ``kill``) and SIGINT raise KeyboardInterrupt, so the
    caller's cleanup runs. Called again once Ray is up: ``ray.init`` installs its own SIGTERM
    handler, which aborts the process and leaves Ray's processes behind; SIGINT is set because a
    shell that starts us in the background leaves it ignored."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def ensure_profile(
    config: ServeConfig, model_dir: Path, status: Callable[[str], None] = lambda m: None
) -> Path | None:
    """Calibrate a head profile for a model that has none (FlexiCache without a named profile),
    so any Llama-family folder serves; the profile is cached in ``KVHEAD_HOME/profiles``.
    Returns the new profile's path, or None when one was there already (or is not needed)."""
    from kvhead.models.profiles import ProfileError, profile_for_model

    settings = config.kvhead_settings
    if settings is None or "profile" in settings:
        return None
    try:
        profile_for_model(model_dir)
        return None
    except ProfileError:
        pass
    from kvhead.eval.profiler import calibrate
    from kvhead.vllm.config import settings_from_additional_config

    options = settings_from_additional_config({"kvhead": settings})
    return calibrate(model_dir, options, page_size=config.block_size, status=status)


def start(
    config: ServeConfig,
    *,
    ready_timeout_s: float = 900.0,
    status: Callable[[str], None] = lambda message: None,
) -> Running:
    """Deploy ``config`` on a local (or the configured) Ray and wait until it serves;
    ``status`` hears each start-up stage."""
    import ray
    from ray import serve

    model_dir = config.model_dir()
    ensure_profile(config, model_dir, status)
    status("checking the settings against the model")
    plan = config.check(model_dir)
    if config.ray_address is None:
        check_memory(config, plan)
    if config.kvhead_settings is not None:
        from kvhead.kernels.cpu import native

        status("building the native decode kernels (once per machine)")
        native.kernels()
    if config.ray_address is None and config.ray_metrics_port is not None:
        ensure_free(config.ray_metrics_port, "ray_metrics_port")
    metrics_url = start_exporter(config)
    status("starting Ray and the replicas")
    os.environ.update(REPLICA_ENV)
    if not ray.is_initialized():
        if config.ray_address is None:
            ray.init(
                address="local",  # a new local cluster, never one another program started
                num_cpus=max(os.cpu_count() or 1, MIN_LOGICAL_CPUS),
                include_dashboard=False,
                log_to_driver=False,
                _metrics_export_port=config.ray_metrics_port,  # ray_vllm_*, ray_serve_*
            )
        else:
            ray.init(address=config.ray_address, log_to_driver=False)
        stop_on_signals()
    serve.start(http_options={"host": config.host, "port": config.port})
    serve.run(build_app(config, model_dir, plan), name=APP_NAME, route_prefix="/")
    status("waiting until a request would be served")
    url = f"http://{config.host}:{config.port}"
    wait_ready(url, ready_timeout_s)
    return Running(url, config.served_model_id(model_dir), plan, metrics_url)


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll ``/health`` until it answers 200 (the engine serves) or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=10) as reply:
                if reply.status == 200:
                    return
        except urllib.error.HTTPError as err:
            last = f"HTTP {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(1.0)
    raise TimeoutError(f"{url}/health did not report ready within {timeout_s:.0f} s ({last})")


def stop() -> None:
    """Remove the application and stop the Ray this process started."""
    import ray
    from ray import serve

    global _exporter
    if _exporter is not None:
        _exporter.close()
        _exporter = None
    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
