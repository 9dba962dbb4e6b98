"""``python -m fxcache serve`` for real: a local Ray instance and Serve app in a subprocess, on a free loopback
port; concurrent requests, bad requests, same request same bytes, loopback-only listeners, a clean stop."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from email.message import Message
from pathlib import Path

import pytest

from fxcache.serve import BadRequest, parse_job

pytest.importorskip("ray.serve", reason="needs the serve extra: pip install -e '.[serve]'")

pytestmark = pytest.mark.slow

SETTINGS = {"steps": 4, "interval": 2}  # a few steps keep the test short; 2 full + 2 shallow per generation


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: object) -> tuple[int, Message, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.headers, r.read()  # headers by any case: uvicorn sends them in lower case
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def _own_processes(session: int, marker: str) -> set[int]:
    """Processes of the server's session, or whose command line names its Ray temp dir."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if os.getsid(int(entry.name)) == session or marker in cmd:
                pids.add(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def _alive(pid: int) -> bool:
    try:  # a zombie (state Z) has exited; whoever adopted it has not reaped it yet
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _listeners(pids: set[int]) -> list[tuple[int, str, str]]:
    """(pid, process name, local address) of every listening TCP socket the processes ``pids`` hold."""
    inodes: dict[str, str] = {}  # socket inode -> local address (hex, as /proc/net/tcp writes it)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                inodes[f[9]] = f[1]
    found = []
    for pid in pids:
        try:
            name = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                link = os.readlink(fd)
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    found.append((pid, name, inodes[link[8:-1]]))
        except OSError:
            continue
    return found


def _is_loopback(hex_addr: str) -> bool:
    ip = hex_addr.split(":")[0]
    return ip == "0100007F" or ip == "0" * 24 + "01000000" or ip.endswith("FFFF00000100007F")


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, subprocess.Popen, str]]:
    port = _free_port()
    temp = tempfile.mkdtemp(prefix="fxr", dir="/tmp")  # short: Ray puts unix sockets under it
    log = open(Path(temp) / "server.log", "w+")  # noqa: SIM115
    cmd = [sys.executable, "-m", "fxcache", "serve", "--port", str(port), "--replicas", "1", "--max-batch", "16"]
    proc = subprocess.Popen([*cmd, "--temp-dir", temp], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited early:\n{Path(log.name).read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no healthy server after 180 s:\n{Path(log.name).read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(1)
        yield url, proc, temp
    finally:
        if proc.poll() is None:  # the test did not get to stop it: ask, then force
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def test_parse_job_refuses_bools_and_bad_schedules() -> None:
    with pytest.raises(BadRequest, match="'n' must be an integer, got true"):
        parse_job('{"seed": 1, "n": true}', branches=8)
    with pytest.raises(BadRequest, match="either"):
        parse_job('{"seed": 1, "interval": 2, "schedule": [0]}', branches=8)
    assert parse_job('{"seed": 1, "interval": 1}', branches=8).settings == (25, 0, 1, None)


def test_serve_end_to_end(server: tuple[str, subprocess.Popen, str]) -> None:
    from PIL import Image

    url, proc, temp = server
    gen = f"{url}/generate"

    # One request alone; its bytes are the reference for the same request inside a batch.
    solo = {"seed": 11, "n": 2, **SETTINGS}
    status, headers, png = _post(gen, solo)
    assert status == 200, png[:300]
    assert Image.open(io.BytesIO(png)).size == (64, 32), "n=2: a 2x1 grid of 32x32 images"
    assert (headers["X-Fxcache-Full-Steps"], headers["X-Fxcache-Shallow-Steps"]) == ("2", "2"), headers
    replica = headers["X-Fxcache-Replica"]

    # 16 at once: mostly the same settings (batched together), some on another branch, some uncached.
    burst = [{"seed": 100 + i, **SETTINGS} for i in range(10)] + [solo]
    burst += [{"seed": 200 + i, "branch": 1, **SETTINGS} for i in range(3)]
    burst += [{"seed": 300 + i, "steps": 4, "interval": 1} for i in range(2)]
    with ThreadPoolExecutor(len(burst)) as pool:
        answers = list(pool.map(lambda b: _post(gen, b), burst))
    assert [a[0] for a in answers] == [200] * len(burst), [a[2][:200] for a in answers if a[0] != 200]
    assert answers[10][2] == png, "the same request gave other bytes inside a concurrent burst"
    batches = [int(a[1]["X-Fxcache-Batch"]) for a in answers]
    assert max(batches[:11]) > 1, f"no batching happened: {batches}"
    assert [a[1]["X-Fxcache-Full-Steps"] for a in answers[-2:]] == ["4", "4"], "interval 1 runs every step full"
    assert answers[-1][1]["X-Fxcache-Shallow-Steps"] == "0"

    # Requests that were generated with others give the same bytes again alone.
    batched = [i for i, b in enumerate(batches) if b > 1][:3]
    for i in batched:
        again = _post(gen, burst[i])
        assert again[0] == 200 and again[2] == answers[i][2], f"{burst[i]}: other bytes alone than in a batch"

    # A schedule as a list of full steps.
    status, headers, _ = _post(gen, {"seed": 5, "steps": 4, "schedule": [0]})
    assert status == 200 and (headers["X-Fxcache-Full-Steps"], headers["X-Fxcache-Shallow-Steps"]) == ("1", "3")

    bad: list[tuple[object, str]] = [
        (b"{not json", "not valid JSON"),
        ([1, 2], "JSON object"),
        ({"steps": 4}, '"seed" is missing'),
        ({"seed": True}, "'seed' must be an integer"),
        ({"seed": "7"}, "'seed' must be an integer"),
        ({"seed": 1.5}, "'seed' must be an integer"),
        ({"seed": -1}, "seed=-1 is out of range"),
        ({"seed": 1, "steps": 0}, "steps=0 is out of range"),
        ({"seed": 1, "steps": 10**6}, "limit is 200"),
        ({"seed": 1, "steps": False}, "'steps' must be an integer"),
        ({"seed": 1, "branch": 8}, "branches 0..7"),
        ({"seed": 1, "branch": -1}, "branches 0..7"),
        ({"seed": 1, "interval": 0}, "interval=0 is out of range"),
        ({"seed": 1, "n": 0}, "n=0 is out of range"),
        ({"seed": 1, "n": 17}, "at most 16 images"),
        ({"seed": 1, "schedule": [0, 30]}, "0..24"),
        ({"seed": 1, "schedule": "0,5"}, "list of step numbers"),
        ({"seed": 1, "interval": 3, "schedule": [0]}, "not both"),
        ({"seed": 1, "stpes": 4}, "unknown field"),
    ]
    for body, message in bad:
        status, headers, text = _post(gen, body)
        assert status == 400, f"{body!r}: {status} {text[:200]!r}"
        assert message in json.loads(text)["error"], f"{body!r}: {text!r}"
    with urllib.request.urlopen(f"{url}/healthz", timeout=10) as r:
        assert r.status == 200
    assert _post(f"{url}/nowhere", {"seed": 1})[0] == 404

    # Still serving, on the same replica: no bad request killed it.
    status, headers, again = _post(gen, solo)
    assert status == 200 and again == png and headers["X-Fxcache-Replica"] == replica

    # Every Ray process of this server listens on 127.0.0.1 only, but for the replica's inter-deployment gRPC
    # server, which Ray Serve 2.60 binds to [::]:0 with no setting to change it (docs/design.md, "Serving").
    own = _own_processes(proc.pid, temp)
    assert len(own) > 3, f"found too few of the server's processes to check: {own}"
    open_wide = [(p, n, a) for p, n, a in _listeners(own) if not _is_loopback(a)]
    assert all(n.startswith("ray::ServeReplica") for _, n, _ in open_wide) and len(open_wide) <= 1, open_wide

    # SIGTERM: the server shuts Serve and Ray down, exits 0 and leaves none of its processes behind.
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=90) == 0, "the server did not exit cleanly on SIGTERM"
    deadline = time.monotonic() + 20
    while (left := {p for p in own | _own_processes(proc.pid, temp) if _alive(p)}) and (time.monotonic() < deadline):
        time.sleep(0.5)
    assert not left, f"processes left behind: {left}"
