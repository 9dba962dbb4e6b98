"""``python -m benchmarks.serve``: requests/s and latency of ``python -m fxcache serve`` under concurrent load.

For each replica count, starts the server (a local Ray instance, loopback only) as a subprocess, waits for
``/healthz``, warms it up, then for each concurrency level and setting (fxcache N=3 and uncached, interval 1)
sends ``--requests`` requests from that many client threads, each thread sending its next request when the
last one is answered. Every request is ``POST /generate`` with its own seed and ``n=1`` (32x32 images, 25
DDIM steps, branch 0). Latency is the client's, from sending to the last byte; requests/s is the requests
over the wall time of the run. The clients run on the same machine as the server.

Writes a table and ``serve_*.csv`` / ``.json`` under ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import fmt, log, machine, percentile, table, version, write_csv, write_json


@dataclass(frozen=True)
class Scenario:
    replicas: tuple[int, ...] = (1, 2)
    concurrency: tuple[int, ...] = (1, 4, 16)
    intervals: tuple[int, ...] = (3, 1)  # 1 = uncached
    requests: int = 48
    steps: int = 25
    branch: int = 0
    max_batch: int = 8
    chunk: int = 4

    @property
    def name(self) -> str:
        reps = "-".join(map(str, self.replicas))
        return f"serve_r{reps}_{self.steps}steps_b{self.branch}_batch{self.max_batch}_chunk{self.chunk}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, str]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    with urllib.request.urlopen(req, timeout=300) as r:
        r.read()
        return r.status, {k.lower(): v for k, v in r.headers.items()}


class Server:
    """``python -m fxcache serve`` in a subprocess; a context manager that stops it with SIGTERM."""

    def __init__(self, sc: Scenario, replicas: int, out: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.temp = tempfile.mkdtemp(prefix="fxb", dir="/tmp")
        self.cmd = [sys.executable, "-m", "fxcache", "serve", "--port", str(self.port), "--replicas", str(replicas)]
        self.cmd += ["--max-batch", str(sc.max_batch), "--chunk", str(sc.chunk), "--temp-dir", self.temp]
        self.log_path = out / f"server_r{replicas}.log"

    def __enter__(self) -> Server:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log = self.log_path.open("w")
        start = time.perf_counter()
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        while True:
            if self.proc.poll() is not None or time.perf_counter() - start > 300:
                raise RuntimeError(f"the server did not become healthy; see {self.log_path}")
            try:
                with urllib.request.urlopen(f"{self.url}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - start
        return self

    def __exit__(self, *exc: object) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.temp, ignore_errors=True)


def load(url: str, bodies: list[dict[str, Any]], concurrency: int) -> dict[str, Any]:
    """Send ``bodies`` from ``concurrency`` threads, each one request at a time; latencies and throughput."""
    latencies: list[float] = []
    batches: list[int] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = iter(bodies)

    def client() -> None:
        while True:
            with lock:
                body = next(queue, None)
            if body is None:
                return
            t0 = time.perf_counter()
            try:
                _, headers = _post(f"{url}/generate", body)
            except Exception as e:  # counted, not raised: a benchmark reports failures
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                latencies.append(time.perf_counter() - t0)
                batches.append(int(headers["x-fxcache-batch"]))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "wall_s": wall,
        "requests_per_s": len(latencies) / wall,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p95_ms": 1000 * percentile(latencies, 95),
        "mean_batch": statistics.fmean(batches) if batches else 0.0,
        "first_error": errors[0] if errors else "",
    }


def run(sc: Scenario, out: Path) -> list[dict[str, Any]]:
    env = machine()
    env["ray"] = version("ray")
    rows = []
    seed = 0
    for replicas in sc.replicas:
        with Server(sc, replicas, out) as server:
            log(f"{replicas} replica(s): healthy after {server.startup_s:.1f} s")
            for interval in sc.intervals:  # warm-up: every replica sees both settings
                warm = [{"seed": 10**6 + i, "steps": sc.steps, "interval": interval} for i in range(16)]
                load(server.url, warm, 16)
            for conc in sc.concurrency:
                for interval in sc.intervals:
                    bodies = [{"seed": seed + i, "steps": sc.steps, "branch": sc.branch, "interval": interval}
                              for i in range(sc.requests)]  # fmt: skip
                    seed += sc.requests
                    r = load(server.url, bodies, conc)
                    row = {"replicas": replicas, "concurrency": conc, "interval": interval, **r}
                    row |= {"startup_s": server.startup_s, "steps": sc.steps, "branch": sc.branch}
                    rows.append(row | {"max_batch": sc.max_batch, "chunk": sc.chunk, **env})
                    log(
                        f"  c={conc:<2} {'N=3' if interval == 3 else f'interval {interval}':<10} "
                        f"{r['requests_per_s']:.2f} req/s  p50 {r['p50_ms']:.0f} ms  p95 {r['p95_ms']:.0f} ms  "
                        f"mean batch {r['mean_batch']:.1f}  errors {r['errors']}"
                    )
    head = ["replicas", "concurrency", "setting", "req/s", "p50 ms", "p95 ms", "mean batch", "errors"]
    body = [
        [str(r["replicas"]), str(r["concurrency"]), "fxcache N=3" if r["interval"] == 3 else "uncached",
         fmt(r["requests_per_s"], ".2f"), fmt(r["p50_ms"], ".0f"), fmt(r["p95_ms"], ".0f"),
         fmt(r["mean_batch"], ".1f"), str(r["errors"])]
        for r in rows
    ]  # fmt: skip
    log("\n" + table(head, body))
    write_json(out / f"{sc.name}.json", {"scenario": asdict(sc), "machine": env, "rows": rows})
    write_csv(out / f"{sc.name}.csv", list(rows[0]), rows)
    log(f"wrote {out / sc.name}.json and .csv")
    return rows


def main(argv: list[str] | None = None) -> int:
    d = Scenario()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--replicas", type=int, nargs="+", default=list(d.replicas))
    p.add_argument("--concurrency", type=int, nargs="+", default=list(d.concurrency))
    p.add_argument("--requests", type=int, default=d.requests, help="requests per (concurrency, setting)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--max-batch", type=int, default=d.max_batch)
    p.add_argument("--chunk", type=int, default=d.chunk)
    p.add_argument("--out", type=Path, default=Path("benchmarks/out/serve"))
    p.add_argument("--quick", action="store_true", help="1 replica, concurrency 1 and 4, 8 requests, 5 steps")
    a = p.parse_args(argv)
    sc = Scenario(
        tuple(a.replicas), tuple(a.concurrency), d.intervals, a.requests, a.steps, d.branch, a.max_batch, a.chunk
    )
    if a.quick:
        sc = Scenario((1,), (1, 4), d.intervals, 8, 5, d.branch, a.max_batch, a.chunk)
    run(sc, a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
