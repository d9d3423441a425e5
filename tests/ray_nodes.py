"""Real Ray nodes for tests: `ray start --block` processes on loopback, each with ports of its own,
so that a test can run jobs on a cluster of its chosen shape, kill a node as a spot instance
dies, and stop the whole cluster without touching any other Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
AGENT_PORT_FLAGS = (
    "dashboard-agent-listen",
    "dashboard-agent-grpc",
    "runtime-env-agent",
    "metrics-export",
    "node-manager",
    "object-manager",
)
# A node that dies is noticed in seconds, not the default half minute.
FAST_HEALTH_CHECKS = {
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "1000",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ray_env() -> dict[str, str]:
    """The nodes' `python` is this environment's, as on a node built from the project's image."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    return env


@dataclass
class Node:
    proc: subprocess.Popen

    def kill(self) -> None:
        """SIGKILL of the node's whole process group: its raylet and every worker on it."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGKILL of the node's process group: a test cluster needs no graceful drain (which waits
        up to 30 s for the GCS), and every process it started dies with it."""
        self.kill()


@dataclass
class LocalCluster:
    """A head (``ray start --head``) and worker nodes, all on loopback."""

    gcs: str  # RAY_ADDRESS for drivers
    dashboard: str  # for `ray job submit`
    head: Node
    workers: list[Node] = field(default_factory=list)
    temp_dir: str = ""

    def add_worker(self, num_cpus: int) -> Node:
        cmd = [
            RAY,
            "start",
            "--block",
            f"--address={self.gcs}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
        ]
        cmd += [f"--{flag}-port={free_port()}" for flag in AGENT_PORT_FLAGS]
        node = Node(_spawn(cmd, f"{self.temp_dir}/worker-{len(self.workers)}.log"))
        self.workers.append(node)
        return node

    def alive_cpus(self) -> float:
        """The CPUs of the alive nodes, as a driver joining now would see them."""
        code = "import json, ray; ray.init(); print(json.dumps(ray.cluster_resources().get('CPU', 0)))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**ray_env(), "RAY_ADDRESS": self.gcs},
            capture_output=True,
            text=True,
            timeout=120,
        )
        return float(json.loads(out.stdout.strip().splitlines()[-1]))

    def wait_for_cpus(self, cpus: float, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while (seen := self.alive_cpus()) != cpus:
            if time.time() > deadline:
                logs = "".join(Path(self.temp_dir, f"worker-{i}.log").read_text(errors="replace")[-2000:]
                               for i in range(len(self.workers)))  # fmt: skip
                raise TimeoutError(f"the cluster has {seen} CPUs, not {cpus}, after {timeout} s:\n{logs}")
            time.sleep(1)

    def stop(self) -> None:
        for node in self.workers:
            node.stop()
        self.head.stop()
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_cluster(head_cpus: int | None = None) -> LocalCluster:
    """A head node with ports and a temp dir of its own; ``head_cpus`` None gives it the machine's
    CPUs. (The temp dir is short: Ray's socket paths must fit in 107 bytes.)"""
    temp_dir = tempfile.mkdtemp(prefix="vtp-ray-", dir="/tmp")
    port, dashboard = free_port(), free_port()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
    cmd += [f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
    cmd += [f"--{flag}-port={free_port()}" for flag in (*AGENT_PORT_FLAGS, "ray-client-server")]
    cmd += [f"--temp-dir={temp_dir}"] + ([f"--num-cpus={head_cpus}"] if head_cpus is not None else [])
    head = Node(_spawn(cmd, f"{temp_dir}/head.log"))
    url = f"http://127.0.0.1:{dashboard}"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except Exception:
            if head.proc.poll() is not None or time.time() > deadline:
                head.kill()
                log = Path(temp_dir, "head.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"the Ray head node did not start:\n{log}") from None
            time.sleep(1)
    return LocalCluster(f"127.0.0.1:{port}", url, head, temp_dir=temp_dir)


def _spawn(cmd: list[str], log: str) -> subprocess.Popen:
    with open(log, "ab") as out:  # `ray start`'s own messages, for a test that fails
        return subprocess.Popen(cmd, env=ray_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


# --- processes --------------------------------------------------------------------------------


def _parent(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (parent := _parent(int(entry))) is not None:
            children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, or at least not a zombie waiting to be reaped."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def survivors(pids: list[int], timeout: float = 15.0) -> list[int]:
    """Those of ``pids`` still alive after up to ``timeout`` seconds (SIGKILL lands asynchronously)."""
    deadline = time.time() + timeout
    while (left := [p for p in pids if alive(p)]) and time.time() < deadline:
        time.sleep(0.2)
    return left


def kill_tree(pid: int) -> None:
    """SIGKILL of ``pid`` and everything it started (a driver and the local Ray it runs)."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def pids_named(fragment: str, under: int | None = None) -> list[int]:
    """Live processes whose command line contains ``fragment`` (Ray titles its workers
    ``ray::ClassName...``), optionally only those below process ``under``."""
    scope = set(descendants(under)) if under is not None else None
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or (scope is not None and int(entry) not in scope):
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if fragment in cmdline:
            found.append(int(entry))
    return sorted(found)


def kill_later(ready, kill, *, delay: tuple[float, float] = (0.0, 1.0), timeout: float = 600, seed: int = 0):
    """A thread that waits until ``ready()``, then a random delay in ``delay`` (a moment the code
    under test did not choose), then calls ``kill()``; ``.fired`` lists what ``kill`` returned."""
    import random
    import threading

    rng = random.Random(seed)

    class Killer(threading.Thread):
        def run(self) -> None:
            deadline = time.time() + timeout
            while time.time() < deadline:
                if ready():
                    time.sleep(rng.uniform(*delay))
                    self.fired.append(kill())
                    return
                time.sleep(0.1)

    thread = Killer(daemon=True)
    thread.fired: list = []
    thread.start()
    return thread


def kill_job_midway(command: list[str], cwd: Path, marker: Path, *, seed: int, timeout: float = 900) -> list[int]:
    """Runs ``command`` (a job that starts its own Ray), SIGKILLs it and every process it started
    a random moment after ``marker`` appears, and returns the pids killed, having checked that the
    kill landed and that nothing it started survived."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: list[int] = []

    def kill_driver() -> int:
        family.extend(descendants(driver.pid))
        kill_tree(driver.pid)
        return driver.pid

    killer = kill_later(marker.exists, kill_driver, seed=seed)
    driver.wait(timeout=timeout)
    killer.join(timeout=5)
    assert killer.fired and driver.returncode == -signal.SIGKILL
    assert len(family) > 3 and not survivors(family)  # its Ray died with it
    return family
