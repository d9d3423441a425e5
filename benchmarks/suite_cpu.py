"""Where the test suite's CPU time goes (issue 19: the suite is bound by its CPU work, not by waiting).

    python benchmarks/suite_cpu.py [PYTEST ARGS...]     # default: tests -n 2 --dist loadgroup (make test's)

Runs pytest while sampling every process's CPU time (user + system, from /proc) twice a second, and
prints the run's wall time, how busy it kept the cores, and the CPU seconds per test module, per test
and per kind of process: job drivers (`jobs/*.py`), Ray workers by the actor or task they ran
(`ray::RayTrainWorker`, `ray::MapWorker`, ...), a Ray worker starting up (before it takes a name),
Ray's own daemons, moto, the pytest processes themselves. Each test's start and end come from
`tests/conftest.py` (`VTP_TEST_SPANS=FILE`); a sample's CPU goes to the test that its pytest process
(found by walking parent pids) was running then. A process started during the run counts from its
start (its start-up is much of what the suite spends); one that lives less than half a second is never
sampled, so the totals are a lower bound. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from bisect import bisect_right
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HZ = os.sysconf("SC_CLK_TCK")
INTERVAL_S = 0.5
DAEMONS = ("gcs_server", "raylet", "log_monitor", "monitor.py", "dashboard", "runtime_env", "moto_server")


def kind(cmdline: str) -> str:
    """A process's kind, from its command line (Ray workers rename themselves to their task)."""
    if cmdline.startswith("ray::"):
        return re.sub(r"[.(].*", "", cmdline.split()[0])
    if "default_worker.py" in cmdline or "setup_worker.py" in cmdline:
        return "ray worker, starting"
    job = re.search(r"jobs/(\w+\.py)", cmdline)
    if job:
        return f"driver {job.group(1)}"
    for name in DAEMONS:
        if name in cmdline:
            return name
    if "pytest" in cmdline or "exec(eval(sys.stdin.readline()))" in cmdline:  # pytest-xdist's workers
        return "pytest"
    return os.path.basename(cmdline.split(" ", 1)[0]) or "?"


class Sampler(threading.Thread):
    """Every process's CPU time, twice a second: the increase since the last sample, by process."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop = threading.Event()
        self.parent: dict[str, int] = {}  # process key (pid:start time) -> parent pid
        self.latest: dict[int, str] = {}  # pid -> the newest process key with that pid
        self.last: dict[str, float] = {}
        self.deltas: list[tuple[float, str, float, str]] = []  # (time, process key, CPU seconds, its kind)

    def run(self) -> None:
        first_pass = True
        while not self.stop.is_set():
            now = time.time()
            for pid in filter(str.isdigit, os.listdir("/proc")):
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        stat = f.read()
                    fields = stat[stat.rfind(")") + 2 :].split()
                    cpu = (int(fields[11]) + int(fields[12])) / HZ
                    key = f"{pid}:{fields[19]}"
                    if key not in self.last:
                        self.parent[key], self.latest[int(pid)] = int(fields[1]), key
                        # what a process running before the run used is not the run's; a new one's all is
                        self.last[key] = cpu if first_pass else 0.0
                    if cpu > self.last[key]:
                        with open(f"/proc/{pid}/cmdline", "rb") as f:
                            cmdline = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
                        self.deltas.append((now, key, cpu - self.last[key], kind(cmdline)))
                        self.last[key] = cpu
                except (OSError, ValueError, IndexError):  # gone meanwhile
                    continue
            first_pass = False
            self.stop.wait(INTERVAL_S)


def main() -> int:
    args = sys.argv[1:] or ["tests", "-n", "2", "--dist", "loadgroup"]
    spans_file = Path(tempfile.mkdtemp()) / "spans.txt"
    sampler = Sampler()
    sampler.start()
    start = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "pytest", *args], cwd=ROOT, env={**os.environ, "VTP_TEST_SPANS": str(spans_file)}
    )
    wall = time.time() - start
    sampler.stop.set()
    sampler.join()

    spans: dict[int, list[tuple[float, float, str]]] = collections.defaultdict(list)
    for line in spans_file.read_text().splitlines() if spans_file.exists() else []:
        pid, begin, end, node = line.split(" ", 3)
        spans[int(pid)].append((float(begin), float(end), node.split("@")[0]))
    for runs in spans.values():
        runs.sort()
    starts = {pid: [begin for begin, _, _ in runs] for pid, runs in spans.items()}
    owner: dict[str, int | None] = {}

    def pytest_process(key: str) -> int | None:  # the pytest process a process descends from
        seen, k = 0, key
        while k is not None and seen < 32:
            pid = int(k.split(":")[0])
            if pid in spans:
                return pid
            k, seen = sampler.latest.get(sampler.parent.get(k, 0)), seen + 1
        return None

    by_module, by_test, by_kind = collections.Counter(), collections.Counter(), collections.Counter()
    total = 0.0
    for at, key, cpu, what in sampler.deltas:
        total += cpu
        by_kind[what] += cpu
        if key not in owner:
            owner[key] = pytest_process(key)
        runs = spans.get(owner[key]) if owner[key] else None
        if not runs:
            continue
        i = bisect_right(starts[owner[key]], at) - 1
        if i >= 0 and at <= runs[i][1] + INTERVAL_S:
            by_test[runs[i][2]] += cpu
            by_module[runs[i][2].split("::")[0]] += cpu
        else:
            by_module["(between tests)"] += cpu

    cores = os.cpu_count() or 1
    print(f"\npytest exited {res.returncode}; wall {wall:.1f} s; CPU {total:.1f} s sampled on {cores} cores")
    print(f"busy: {total / (wall * cores):.2f} of the cores (a lower bound: short-lived processes are missed)")
    for title, counter in (("module", by_module), ("test", by_test), ("kind of process", by_kind)):
        print(f"\nCPU seconds by {title} (share of the sampled total)")
        for name, cpu in counter.most_common(25):
            print(f"{cpu:8.1f}  {cpu / total:5.1%}  {name}")
    return res.returncode


if __name__ == "__main__":
    sys.exit(main())
