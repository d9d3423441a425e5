"""Real Ray nodes for tests: `ray start --block` processes on loopback, each with ports of its own,
so that a test can run jobs on a cluster of its chosen shape, kill a node as a spot instance
dies, and stop the whole cluster without touching any other Ray on the machine.

And the tests' kills: a process is picked only below the test's own driver, node or raylets
(``pids_named(..., under=...)``, ``own_ray``), at a moment drawn fresh on every run and printed
(``kill_later``; ``VTP_TEST_KILL_DELAY_S`` replays one), and a kill that finds no target fails."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are drawn, since a port closed
    at once can come back from the next draw (Ray refuses a node given one port for two components)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def ray_env(dashboard: str | None = None) -> dict[str, str]:
    """The nodes' `python` is this environment's, as on a node built from the project's image. Given
    its cluster's ``dashboard``, a node's processes ask that one for the cluster's state (Ray Train's
    placement group cleaner does, each second) rather than whichever Ray on this machine started
    last, as on a cluster's own machines, which run one Ray each."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", **FAST_HEALTH_CHECKS}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_API_SERVER_ADDRESS", None)
    if dashboard:
        env["RAY_API_SERVER_ADDRESS"] = dashboard
    return env


@dataclass
class Node:
    proc: subprocess.Popen

    def freeze(self) -> list[int]:
        """SIGSTOP of every process of the node (``freeze_tree``): from here on nothing on it runs."""
        return freeze_tree(self.proc.pid) if self.proc.poll() is None else []

    def kill(self) -> None:
        """SIGKILL of every process of the node: its raylet, agents and workers. Ray gives each
        worker a process group of its own, so the node's group alone would leave the workers
        running (a training worker wrote and reported a checkpoint after its raylet was dead)."""
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
            with contextlib.suppress(ProcessLookupError):
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
        cmd += [
            f"--{flag}-port={p}" for flag, p in zip(AGENT_PORT_FLAGS, free_ports(len(AGENT_PORT_FLAGS)), strict=True)
        ]
        node = Node(_spawn(cmd, f"{self.temp_dir}/worker-{len(self.workers)}.log", self.dashboard))
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
        if out.returncode != 0 or not out.stdout.strip():
            head = Path(self.temp_dir, "head.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"no driver could join {self.gcs} (exit {out.returncode}; head node "
                f"{'alive' if self.head.proc.poll() is None else f'exited {self.head.proc.returncode}'}):\n"
                f"{out.stderr[-2000:]}\nhead.log ends:\n{head}"
            )
        return float(json.loads(out.stdout.strip().splitlines()[-1]))

    def wait_for_cpus(self, cpus: float, timeout: float = 120, relaunch: int = 0) -> None:
        """Waits until the alive nodes have ``cpus`` CPUs. With ``relaunch`` > 0, a 1-CPU worker node
        whose `ray start` exited (a raylet that timed out starting on a loaded machine) is launched
        again, at most that many times, as an autoscaler launches another for a node that failed."""
        deadline = time.time() + timeout
        while (seen := self.alive_cpus()) != cpus:
            if relaunch > 0 and seen < cpus and self.workers and self.workers[-1].proc.poll() is not None:
                relaunch -= 1
                self.add_worker(num_cpus=1)
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
    for attempt in range(3):  # a port drawn free can be taken by another process before Ray binds it
        flags = (*AGENT_PORT_FLAGS, "ray-client-server")
        port, dashboard, *ports = free_ports(2 + len(flags))
        cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}"]
        cmd += [f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        cmd += [f"--{flag}-port={p}" for flag, p in zip(flags, ports, strict=True)]
        cmd += [f"--temp-dir={temp_dir}"] + ([f"--num-cpus={head_cpus}"] if head_cpus is not None else [])
        url = f"http://127.0.0.1:{dashboard}"
        head = Node(_spawn(cmd, f"{temp_dir}/head.log", url))
        if _wait_for_dashboard(head, url, deadline=time.time() + 120):
            break
        head.kill()
        log = Path(temp_dir, "head.log").read_text(errors="replace")[-3000:]
        exited = head.proc.poll() is not None
        if attempt == 2 or not (exited and "port" in log.lower()):
            raise RuntimeError(f"the Ray head node did not start:\n{log}")
    return LocalCluster(f"127.0.0.1:{port}", url, head, temp_dir=temp_dir)


def _wait_for_dashboard(head: Node, url: str, deadline: float) -> bool:
    """True once the head's dashboard answers; False if its `ray start` exits or the deadline passes."""
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            return True
        except Exception:
            if head.proc.poll() is not None or time.time() > deadline:
                return False
            time.sleep(1)


def _spawn(cmd: list[str], log: str, dashboard: str) -> subprocess.Popen:
    with open(log, "ab") as out:  # `ray start`'s own messages, for a test that fails
        return subprocess.Popen(
            cmd, env=ray_env(dashboard), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


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


def freeze_tree(pid: int) -> list[int]:
    """SIGSTOP of ``pid`` and everything below it, again for any process started meanwhile,
    until none is new: the whole tree stops at one moment, as a machine that dies does, and
    stays as it was for a test to look at. Returns the pids stopped."""
    frozen: list[int] = []
    while new := [p for p in [pid, *descendants(pid)] if p not in frozen]:
        for p in new:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGSTOP)
        frozen += new
    return frozen


def kill_tree(pid: int) -> None:
    """SIGKILL of ``pid`` and everything it started (a driver and the local Ray it runs), all
    stopped first so that none of them goes on working while the others die."""
    for p in freeze_tree(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def pids_named(fragment: str, *, under: int | Iterable[int]) -> list[int]:
    """Live processes below ``under`` (a pid, or several: the test's own driver, node or raylets)
    whose command line contains ``fragment`` (Ray titles its workers ``ray::ClassName...``).
    There is no machine-wide form: other tests and other jobs run their own Rays on this machine."""
    roots = [under] if isinstance(under, int) else list(under)
    scope = {pid for root in roots for pid in descendants(root)}
    return sorted(pid for pid in scope if fragment in _cmdline(pid))


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class OwnRay:
    """The Ray cluster this process's driver is connected to, as processes and files on this
    machine: its raylets (every worker process of the cluster here runs below one of them) and
    their session log folders (``worker-<id>-<job>-<pid>.err``: what each worker wrote)."""

    raylets: tuple[int, ...]
    log_dirs: tuple[Path, ...]

    def worker_logs(self, pid: int) -> list[Path]:
        """The log files of worker process ``pid`` of this Ray: its core-worker log, which every worker
        writes from its start, and its stdout and stderr files where they are still there (Ray does
        not keep them for every worker that has died)."""
        found = [p for d in self.log_dirs for p in d.glob(f"worker-*-{pid}.*") if p.suffix in (".err", ".out")]
        return sorted([*found, *(p for d in self.log_dirs for p in d.glob(f"python-core-worker-*_{pid}.log"))])

    def logged(self, pattern: re.Pattern) -> dict[int, list[re.Match]]:
        """{worker pid: the matches of ``pattern`` in its log lines}, for the workers that logged a match."""
        found: dict[int, list[re.Match]] = {}
        for d in self.log_dirs:
            for path in sorted(d.glob("worker-*")):
                if path.suffix not in (".err", ".out"):
                    continue
                pid = int(path.stem.rsplit("-", 1)[1])
                for line in path.read_text(errors="replace").splitlines():
                    if match := pattern.search(line):
                        found.setdefault(pid, []).append(match)
        return found


def own_ray() -> OwnRay:
    """The raylets and log folders of the Ray that ``ray.init`` connected this process to, found
    by the raylet socket each of its alive nodes reports (a socket path is unique to a session)."""
    import ray

    sockets = {node["RayletSocketName"] for node in ray.nodes() if node["Alive"]}
    flags = [f"--raylet_socket_name={socket}" for socket in sockets]
    raylets = tuple(
        sorted(
            int(e)
            for e in os.listdir("/proc")
            if e.isdigit() and any(flag in _cmdline(int(e)).split() for flag in flags)
        )
    )
    assert raylets, f"no raylet process on this machine serves the sockets {sorted(sockets)}"
    return OwnRay(raylets, tuple(sorted({Path(socket).parent.parent / "logs" for socket in sockets})))


# --- kills at moments the code under test does not choose --------------------------------------

DELAY_ENV = "VTP_TEST_KILL_DELAY_S"  # forces every kill delay, to replay a failure


def kill_delay(low: float, high: float, what: str) -> float:
    """A delay drawn fresh from ``[low, high]`` seconds (seeded by the OS, so every run tries
    another moment), or the one ``VTP_TEST_KILL_DELAY_S`` forces; printed to the test's log."""
    forced = os.environ.get(DELAY_ENV, "").strip()
    delay = float(forced) if forced else random.SystemRandom().uniform(low, high)
    how = "forced by" if forced else "drawn fresh; replay with"
    print(f"kill delay for {what}: {delay:.3f} s ({how} {DELAY_ENV}={delay:.3f})", flush=True)
    return delay


class Killer(threading.Thread):
    """Waits until ``ready()``, then ``delay_s``, then calls ``kill()``. ``fired`` holds what
    ``kill`` returned, ``error`` the traceback of a ``ready``/``kill`` that raised (a kill that
    cannot find its target is a failure, never a silent skip)."""

    def __init__(self, ready: Callable[[], bool], kill: Callable[[], Any], delay_s: float, timeout: float):
        super().__init__(daemon=True)
        self.ready, self.kill, self.delay_s, self.timeout = ready, kill, delay_s, timeout
        self.fired: list = []
        self.error: str | None = None
        self.at: float | None = None  # time.time() when kill() was called

    @property
    def replay(self) -> str:
        """For assertion messages: how to rerun the test with this very delay."""
        return f"{DELAY_ENV}={self.delay_s:.3f}"

    def run(self) -> None:
        deadline = time.time() + self.timeout
        try:
            while time.time() < deadline:
                if self.ready():
                    time.sleep(self.delay_s)
                    self.at = time.time()
                    self.fired.append(self.kill())
                    return
                time.sleep(0.1)
        except BaseException:
            self.error = traceback.format_exc()

    def landed(self, join_timeout: float = 30.0):
        """Joins the thread and returns what ``kill`` returned; fails when the kill never ran or raised."""
        self.join(timeout=join_timeout)
        assert self.error is None, f"the kill failed ({self.replay}):\n{self.error}"
        assert self.fired, f"nothing was killed: not ready within {self.timeout} s ({self.replay})"
        return self.fired[0]


def kill_later(
    ready: Callable[[], bool],
    kill: Callable[[], Any],
    *,
    delay: tuple[float, float] = (0.0, 1.0),
    timeout: float = 600,
    what: str = "the kill",
) -> Killer:
    """Starts a ``Killer``: once ``ready()``, a fresh random delay in ``delay`` (a moment the
    code under test did not choose), then ``kill()``."""
    killer = Killer(ready, kill, kill_delay(*delay, what), timeout)
    killer.start()
    return killer


@dataclass
class KilledJob:
    pids: list[int]  # the driver and every process it had started, all dead now
    delay_s: float
    at: float  # time.time() of the kill
    replay: str  # for assertion messages


def kill_job_midway(command: list[str], cwd: Path, ready: Callable[[], bool], *, timeout: float = 900) -> KilledJob:
    """Runs ``command`` (a job that starts its own Ray), SIGKILLs it and every process it started
    a random moment after ``ready()`` holds, and checks that the kill landed on the running job
    and that nothing it started survived. What the job had stored stays as it was at the kill
    (its whole Ray died with it), for the test to check."""
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    family: list[int] = []

    def kill_driver() -> int:
        assert driver.poll() is None, f"the job ended (exit {driver.returncode}) before the kill"
        family.extend(descendants(driver.pid))
        kill_tree(driver.pid)
        return driver.pid

    killer = kill_later(ready, kill_driver, what=f"the driver of {Path(command[1]).name}")
    try:
        driver.wait(timeout=timeout)
    finally:
        if driver.poll() is None:
            kill_tree(driver.pid)
    killer.landed()
    assert driver.returncode == -signal.SIGKILL, f"exit {driver.returncode} ({killer.replay})"
    assert len(family) > 3 and not survivors(family), f"its Ray outlived it ({killer.replay})"
    return KilledJob(family, killer.delay_s, killer.at, killer.replay)
