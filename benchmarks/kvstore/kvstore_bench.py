"""kvstore benchmark: Redis tier vs redis-benchmark, host arena vs a tensor copy.

Redis tier: batched put and get of one-head pages through :class:`kvstore.RedisTier` (encode,
checksum, pipelined SET ... PX / MGET, decode and verify) against ``redis-benchmark`` doing the
same work on the same freshly started redis-server: the same value size (header + payload), the
same pipeline depth, one connection each, the same number of *distinct* keys of the same length,
``SET key value PX ttl`` into an empty database and ``GET`` over a prefilled key space (see
:func:`redis_benchmark`). Each round runs both back to back, who goes first alternating, so
load from other processes on the machine hits both alike; medians of the rounds and the median
per-round ratio (with its min–max) are reported, with the 1-minute load average around each
round. One untimed round of each comes first (numba compiling or loading its cache; the
server's first touch of memory). Set-up traffic (FLUSHALL, redis-benchmark's GET key space)
goes through a connection of its own, never through the tier's pool.
Geometries: SmolLM2 (16 tokens x 64 dims x K and V, bf16: 4 KiB) and Llama-8B (x 128 dims:
8 KiB).

Host arena: batched ``put`` / ``get`` of random (layer, block, head) pages against the plain
tensor copy that moves the same bytes (``index_copy_`` / ``index_select`` on a same-sized
buffer), so the number shows the arena's bookkeeping overhead.

Run: ``python benchmarks/kvstore/kvstore_bench.py`` (``--quick`` for a smoke run). Needs
redis-server and redis-benchmark on PATH. Prints a table; writes
``benchmarks/results/kvstore/kvstore_bench.json`` and ``kvstore_bench.md``.
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import resource
import statistics
import string
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root

import redis
import torch
import typer
from rich.console import Console
from rich.table import Table

from benchmarks.common import KVSTORE_RESULTS, ROOT
from kvhead.core.spec import HeadPageSpec
from kvstore import HostArena, HostArenaConfig, PageKeys, RedisTier, RedisTierConfig, prefix_hashes

sys.path.insert(0, str(ROOT / "tests"))  # the suite's real redis-server helper
from redis_server import RedisServer

GEOMETRIES = {"smollm2": 64, "llama-8b": 128}  # head_dim; 16-token pages, bf16, K and V
PAGE = 16
FINGERPRINT = "bench00000000000"
console = Console()
app = typer.Typer(add_completion=False)


def make_batch(
    spec: HeadPageSpec, n: int, seed: int
) -> tuple[PageKeys, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(n, PAGE, spec.head_dim, generator=g).to(spec.dtype)
    v = torch.randn(n, PAGE, spec.head_dim, generator=g).to(spec.dtype)
    pages = torch.arange(n)
    tokens = torch.randint(0, 50_000, (n * PAGE,), generator=g)
    keys = PageKeys(
        seed % 32, pages, torch.arange(n) % spec.num_kv_heads, prefix_hashes(tokens, PAGE), pages
    )
    return keys, k, v


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc, 10 ms ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def rb_rps(port: int, depth: int, requests: int, *args: str) -> dict[str, float]:
    """requests/s per test of one redis-benchmark run (one connection, ``depth`` pipelined)."""
    out = subprocess.run(
        [
            "redis-benchmark",
            "-h",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            "1",
            "-P",
            str(depth),
            "-n",
            str(requests),
            "--csv",
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = [r for r in csv.reader(io.StringIO(out)) if r and r[0] != "test"]
    return {r[0].split()[0].lower(): float(r[1]) for r in rows}


def redis_benchmark(
    client: redis.Redis,
    server_pid: int,
    port: int,
    value_bytes: int,
    key_len: int,
    depth: int,
    pages: int,
    ttl_ms: int,
) -> dict[str, float]:
    """requests/s (and CPU microseconds per request) of redis-benchmark doing what the tier
    does, on the same server.

    ``set``: ``SET key value PX ttl`` into an empty database, every key distinct (``-r`` far
    larger than ``-n``), keys as long as the tier's. ``get``: ``GET key`` over a prefilled key
    space of ``pages`` distinct keys holding ``value_bytes`` each (every read hits, as every
    tier read does). ``*_client_cpu_us`` includes redis-benchmark's own start-up (a few ms),
    ``*_server_cpu_us`` is redis-server's CPU during the run. References only: ``get_mget`` --
    pages/s of ``MGET`` with ``depth`` random keys, one command per round trip (the tier's own
    command, from a C client); ``set_hot`` / ``get_hot`` -- redis-benchmark's default
    ``-t set,get`` (one key, overwritten in place; what the first version of this benchmark
    compared against).
    """
    value = "".join(random.Random(value_bytes).choices(string.ascii_letters, k=value_bytes))
    key = f"{FINGERPRINT}:" + "0" * (key_len - len(FINGERPRINT) - 1 - 12) + "__rand_int__"
    result: dict[str, float] = {}

    def timed(op: str, *args: str) -> None:
        client_0, server_0 = children_cpu_s(), server_cpu_s(server_pid)
        result[op] = rb_rps(port, depth, pages, *args)[op]
        result[f"{op}_client_cpu_us"] = (children_cpu_s() - client_0) / pages * 1e6
        result[f"{op}_server_cpu_us"] = (server_cpu_s(server_pid) - server_0) / pages * 1e6

    client.flushall()
    timed("set", "-r", str(10**9), "SET", key, value, "PX", str(ttl_ms))
    client.flushall()
    pipe = client.pipeline(transaction=False)
    for i in range(pages):
        pipe.set(key.replace("__rand_int__", f"{i:012d}"), value, px=ttl_ms)
        if i % 256 == 255:
            pipe.execute()
    pipe.execute()
    if client.dbsize() != pages:
        raise RuntimeError("prefilling the redis-benchmark GET key space failed")
    timed("get", "-r", str(pages), "GET", key)
    mget = rb_rps(port, 1, pages // depth, "-r", str(pages), "MGET", *[key] * depth)["mget"]
    result["get_mget"] = mget * depth  # pages/s
    client.flushall()
    hot = rb_rps(port, depth, pages, "-t", "set,get", "-d", str(value_bytes))
    result["set_hot"], result["get_hot"] = hot["set"], hot["get"]
    return result


def kvstore_round(tier: RedisTier, server_pid: int, batches: list, check: bool) -> dict[str, float]:
    """pages/s (and CPU microseconds per page) of RedisTier.put and .get over ``batches``."""
    n = sum(len(b[0]) for b in batches)
    out: dict[str, float] = {}
    for op in ("set", "get"):
        start, cpu, server = time.perf_counter(), time.process_time(), server_cpu_s(server_pid)
        for keys, k, v in batches:
            if op == "set" and not bool(tier.put(keys, k, v).all()):
                raise RuntimeError("redis refused pages during the benchmark")
            if op == "get":
                got = tier.get(keys)
                if check and not (bool(got.found.all()) and torch.equal(got.k, k)):
                    raise RuntimeError("redis tier returned wrong or missing pages")
        out[op] = n / (time.perf_counter() - start)
        out[f"{op}_client_cpu_us"] = (time.process_time() - cpu) / n * 1e6
        out[f"{op}_server_cpu_us"] = (server_cpu_s(server_pid) - server) / n * 1e6
    return out


def bench_redis(head_dim: int, pages: int, batch: int, depth: int, rounds: int) -> dict:
    spec = HeadPageSpec(num_q_heads=32, num_kv_heads=8, head_dim=head_dim, page_size=PAGE)
    server = RedisServer().start()
    try:
        tier = RedisTier(spec, RedisTierConfig(url=server.url, pipeline_depth=depth), FINGERPRINT)
        # set-up traffic (FLUSHALL, redis-benchmark's GET key space) on a connection of its own,
        # never the tier's: through the tier's pool it slowed the tier's next writes (Llama-8B
        # set 0.73-0.77x of redis-benchmark with it, 0.84-1.00x without, same window)
        admin = redis.Redis.from_url(server.url)
        batches = [make_batch(spec, batch, seed) for seed in range(pages // batch)]
        value_bytes = tier.codec.value_bytes
        names = [name for keys, _, _ in batches for name in tier.key_names(keys)]
        if len(set(names)) != pages:
            raise RuntimeError("benchmark keys must be distinct")
        key_len = round(statistics.mean(map(len, names)))
        ttl_ms = int(tier.config.ttl_seconds or 0) * 1000
        ours, theirs = [], []
        if server.proc is None:
            raise RuntimeError("redis-server did not start")
        pid = server.proc.pid

        def ours_round(check: bool) -> dict[str, float]:
            admin.flushall()
            return kvstore_round(tier, pid, batches, check)

        def theirs_round() -> dict[str, float]:
            return redis_benchmark(
                admin, pid, server.port, value_bytes, key_len, depth, pages, ttl_ms
            )

        # Untimed warm-up of both: numba code (compiled or loaded from its cache), and the
        # server's first touch of memory for a round's values (on this VM the first one or two
        # rounds on a fresh redis-server ran up to 10x slower for the client that went first,
        # which was always the tier before rounds alternated and began with a warm-up).
        start = time.perf_counter()
        ours_round(check=True)
        theirs_round()
        warmup_s = time.perf_counter() - start
        load = [os.getloadavg()[0]]
        for r in range(rounds):  # alternate who goes first
            if r % 2:
                theirs.append(theirs_round())
            ours.append(ours_round(check=False))
            if not r % 2:
                theirs.append(theirs_round())
            load.append(os.getloadavg()[0])
        result = {
            "head_dim": head_dim,
            "value_bytes": value_bytes,
            "key_bytes": key_len,
            "pipeline_depth": depth,
            "connections": 1,
            "ttl_ms": ttl_ms,
            "pages": pages,
            "batch": batch,
            "rounds": rounds,
            "warmup_s": warmup_s,
            "load_1min_per_round": load,
        }
        for op in ("set", "get"):
            a = statistics.median(x[op] for x in ours)
            b = statistics.median(x[op] for x in theirs)
            hot = statistics.median(x[f"{op}_hot"] for x in theirs)
            per_round = [x[op] / y[op] for x, y in zip(ours, theirs)]
            result[op] = {
                "kvstore_pages_s": a,
                "redis_benchmark_rps": b,
                "ratio": a / b,
                "paired_ratio": statistics.median(per_round),
                "paired_ratio_min": min(per_round),
                "paired_ratio_max": max(per_round),
                **{
                    f"{side}_{part}_cpu_us": statistics.median(
                        x[f"{op}_{part}_cpu_us"] for x in runs
                    )
                    for side, runs in (("kvstore", ours), ("redis_benchmark", theirs))
                    for part in ("client", "server")
                },
                "kvstore_mb_s": a * value_bytes / 1e6,
                "redis_benchmark_hot_key_rps": hot,
                **(
                    {
                        "redis_benchmark_mget_pages_s": statistics.median(
                            x["get_mget"] for x in theirs
                        )
                    }
                    if op == "get"
                    else {}
                ),
                "kvstore_rounds": [x[op] for x in ours],
                "redis_benchmark_rounds": [x[op] for x in theirs],
            }
        tier.close()
        admin.close()
        return result
    finally:
        server.cleanup()


def best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def bench_arena(head_dim: int, capacity: int, batch: int, repeats: int) -> dict:
    spec = HeadPageSpec(num_q_heads=32, num_kv_heads=8, head_dim=head_dim, page_size=PAGE)
    cfg = HostArenaConfig(capacity_pages=capacity, num_layers=32, num_blocks=capacity // 8)
    arena = HostArena(spec, cfg)
    g = torch.Generator().manual_seed(head_dim)
    k = torch.randn(batch, PAGE, head_dim, generator=g).to(spec.dtype)
    v = torch.randn(batch, PAGE, head_dim, generator=g).to(spec.dtype)
    flat = torch.randperm(cfg.num_blocks * spec.num_kv_heads, generator=g)[:batch]
    keys = PageKeys(3, flat // spec.num_kv_heads, flat % spec.num_kv_heads)
    arena.put(keys, k, v)  # first touch allocates slots; timed calls overwrite in place
    nbytes = batch * spec.head_page_bytes
    put_s = best_seconds(lambda: arena.put(keys, k, v), repeats)
    get_s = best_seconds(lambda: arena.get(keys), repeats)
    plain = torch.zeros_like(arena.buffer)
    slots = torch.randperm(capacity, generator=g)[:batch]
    kv = torch.stack((k, v), dim=1)
    copy_in_s = best_seconds(lambda: plain.index_copy_(0, slots, kv), repeats)
    copy_out_s = best_seconds(lambda: torch.index_select(plain, 0, slots), repeats)
    return {
        "head_dim": head_dim,
        "capacity_pages": capacity,
        "batch": batch,
        "put_gb_s": nbytes / put_s / 1e9,
        "get_gb_s": nbytes / get_s / 1e9,
        "copy_in_gb_s": nbytes / copy_in_s / 1e9,
        "copy_out_gb_s": nbytes / copy_out_s / 1e9,
        "put_vs_copy": copy_in_s / put_s,
        "get_vs_copy": copy_out_s / get_s,
    }


def markdown(results: dict) -> str:
    first = next(iter(results["redis"].values()))
    lines = [
        "# kvstore benchmark",
        "",
        (
            f"Machine: {results['machine']}; code {results['commit']}, started "
            f"{results['started_utc']} UTC; {first['rounds']} rounds of kvstore and "
            "redis-benchmark back to back (who goes first alternates) on one fresh redis-server "
            "per geometry, after one untimed round of each; FLUSHALL and redis-benchmark's GET "
            "key space go through a connection of their own; medians. 1-minute load "
            "average before/after each round: "
            + "; ".join(
                f"{name} " + ", ".join(f"{x:.2f}" for x in r["load_1min_per_round"])
                for name, r in results["redis"].items()
            )
            + "."
        ),
        "",
        "## Redis tier vs redis-benchmark",
        "",
        (
            "Both sides, per geometry: the same value size (80-byte header + K|V payload), "
            f"{first['pipeline_depth']} pages per round trip with one round trip outstanding "
            f"(kvstore `pipeline_depth`, redis-benchmark `-P`), {first['connections']} connection, "
            f"{first['pages']:,} distinct keys of the same length ({first['key_bytes']} bytes) per "
            f"round, TTL on every write (`SET … PX {first['ttl_ms']}`). set: writes into an empty "
            "database (redis-benchmark `-r 1000000000 SET key:__rand_int__ <value> PX ttl`); get: "
            "reads of present keys (redis-benchmark `-r <pages> GET key:__rand_int__` over a "
            "prefilled key space; kvstore: one `MGET` of `depth` keys per round trip plus header, "
            "checksum and copy into a tensor). `ratio` = median kvstore / median redis-benchmark; "
            "`paired` = median of the per-round ratios (each round runs both back to back, so "
            "machine load mostly cancels), with their min–max."
        ),
        "",
        (
            "| geometry | value bytes | op | kvstore pages/s | redis-benchmark req/s | ratio | "
            "paired | paired min–max | rb MGET pages/s | rb one hot key req/s |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["redis"].items():
        for op in ("set", "get"):
            x = r[op]
            mget = x.get("redis_benchmark_mget_pages_s")
            lines.append(
                f"| {name} | {r['value_bytes']} | {op} | {x['kvstore_pages_s']:,.0f} | "
                f"{x['redis_benchmark_rps']:,.0f} | {x['ratio']:.2f} | "
                f"{x['paired_ratio']:.2f} | "
                f"{x['paired_ratio_min']:.2f}–{x['paired_ratio_max']:.2f} | "
                f"{'' if mget is None else f'{mget:,.0f}'} | "
                f"{x['redis_benchmark_hot_key_rps']:,.0f} |"
            )
    lines += [
        "",
        (
            "CPU microseconds per page (medians; client = the Python process running the "
            "tier, or redis-benchmark including its start-up; server = redis-server, 10 ms "
            "ticks):"
        ),
        "",
        (
            "| geometry | op | kvstore client | redis-benchmark client | server (kvstore) | "
            "server (redis-benchmark) |"
        ),
        "|---|---|---|---|---|---|",
    ]
    for name, r in results["redis"].items():
        for op in ("set", "get"):
            x = r[op]
            lines.append(
                f"| {name} | {op} | {x['kvstore_client_cpu_us']:.2f} | "
                f"{x['redis_benchmark_client_cpu_us']:.2f} | "
                f"{x['kvstore_server_cpu_us']:.2f} | "
                f"{x['redis_benchmark_server_cpu_us']:.2f} |"
            )
    lines += [
        "",
        "## Host arena vs a plain tensor copy (same bytes)",
        "",
        "| geometry | batch | put GB/s | index_copy_ GB/s | get GB/s | index_select GB/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, a in results["arena"].items():
        lines.append(
            f"| {name} | {a['batch']} | {a['put_gb_s']:.2f} | {a['copy_in_gb_s']:.2f} | "
            f"{a['get_gb_s']:.2f} | {a['copy_out_gb_s']:.2f} |"
        )
    return "\n".join(lines) + "\n"


@app.command()
def main(
    pages: int = typer.Option(16384, help="Pages per Redis round (and redis-benchmark -n)."),
    batch: int = typer.Option(1024, help="Pages per RedisTier call."),
    depth: int = typer.Option(64, help="Pipeline depth for both clients."),
    rounds: int = typer.Option(7, help="Alternating rounds; the median is reported."),
    arena_batch: int = typer.Option(4096, help="Pages per host-arena call."),
    quick: bool = typer.Option(False, help="Tiny smoke run."),
    out: Path = typer.Option(KVSTORE_RESULTS, help="Output folder."),
) -> None:
    torch.set_num_threads(1)  # the hot paths are single-threaded; avoids OpenMP spin on 2 cores
    if quick:
        pages, batch, rounds, arena_batch = 2048, 512, 1, 512
    if pages % batch:
        raise typer.BadParameter("pages must be a multiple of batch")
    machine = (
        f"{platform.machine()}, {os.cpu_count()} cores (shared), "
        f"{torch.get_num_threads()} torch thread"
    )
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True
    ).stdout.strip()
    results: dict = {
        "machine": machine,
        "commit": commit,
        "started_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "redis": {},
        "arena": {},
    }
    for name, dim in GEOMETRIES.items():
        console.print(f"[bold]{name}[/]: Redis tier vs redis-benchmark ...")
        results["redis"][name] = bench_redis(dim, pages, batch, depth, rounds)
        results["arena"][name] = bench_arena(dim, 8 * arena_batch, arena_batch, 5)
    table = Table(title="kvstore: Redis tier vs redis-benchmark")
    for col in ("geometry", "op", "kvstore pages/s", "redis-benchmark req/s", "ratio", "paired"):
        table.add_column(col)
    for name, r in results["redis"].items():
        for op in ("set", "get"):
            x = r[op]
            table.add_row(
                name,
                op,
                f"{x['kvstore_pages_s']:,.0f}",
                f"{x['redis_benchmark_rps']:,.0f}",
                f"{x['ratio']:.2f}",
                f"{x['paired_ratio']:.2f}",
            )
    console.print(table)
    table = Table(title="host arena vs plain tensor copy (GB/s)")
    for col in ("geometry", "put", "index_copy_", "get", "index_select"):
        table.add_column(col)
    for name, a in results["arena"].items():
        table.add_row(
            name,
            f"{a['put_gb_s']:.2f}",
            f"{a['copy_in_gb_s']:.2f}",
            f"{a['get_gb_s']:.2f}",
            f"{a['copy_out_gb_s']:.2f}",
        )
    console.print(table)
    out.mkdir(parents=True, exist_ok=True)
    stem = "kvstore_bench_quick" if quick else "kvstore_bench"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(markdown(results))
    console.print(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    app()
