"""Training killed mid-run, and the proof that it recovered from a checkpoint: a worker is picked
below the test's own raylets (or a job is killed with its own Ray), and afterwards the workers'
own log lines must say which checkpoint they resumed from: one that Ray Train had registered by
the kill, after which every later step was redone."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tests.ray_nodes import OwnRay, pids_named, survivors

TRAIN_WORKER = "ray::RayTrainWorker"
# train.checkpoint.restore's line, in each restarted worker's log
RESUMED = re.compile(r"resumed from (\S+) \(epoch (\d+), step (\d+)\)")
# Ray Train's record of the checkpoints it has registered, in the run folder: a restarted worker
# group, or a rerun, resumes from the latest of them. A checkpoint whose files are written but
# that the controller has not registered yet is not resumed from.
SNAPSHOT = "checkpoint_manager_snapshot.json"


def resumed_in(log: str) -> set[str]:
    """The checkpoints a job's log (its stderr: Ray forwards the workers' lines) says it resumed from."""
    return {Path(m.group(1)).name for m in RESUMED.finditer(log)}


def on_disk(run: Path) -> list[str]:
    """The run's checkpoints whose files are complete (meta.json is written last), oldest first."""
    return sorted(p.parent.name for p in run.glob("epoch_*/meta.json"))


def registered(run: Path, patience: float = 2.0) -> list[str]:
    """The run's checkpoints that Ray Train has registered, oldest first (their names sort by
    epoch, then step); none while the snapshot is missing. Ray Train rewrites the snapshot in
    place, so a read can catch it mid-write (empty or cut short): it is read again for up to
    ``patience`` seconds before it counts as none (a job killed mid-write leaves it so)."""
    deadline = time.monotonic() + patience
    while True:
        try:
            state = json.loads((run / SNAPSHOT).read_text())
        except OSError:
            return []
        except ValueError:
            if time.monotonic() > deadline:
                return []
            time.sleep(0.01)
            continue
        return sorted(result["checkpoint_dir_name"] for result in state["checkpoint_results"])


def registered_after(run: Path, name: str):
    """A ``ready()`` for ``kill_later``: Ray Train has registered checkpoint ``name`` of the run."""
    return lambda: name in registered(run)


@dataclass
class WorkerKill:
    """What the test saw at the kill."""

    pid: int  # the worker killed
    workers: list[int]  # the run's training workers alive just before it
    on_disk: list[str]  # the run's complete checkpoints at that moment
    registered: list[str]  # those Ray Train had registered
    at: float  # time.time() of the kill


def kill_a_training_worker(ray: OwnRay, run: Path, workers: int) -> WorkerKill:
    """SIGKILL of one of the run's ``workers`` training worker processes, found below the test's
    own raylets; fails when they are not exactly that many or the one chosen is already gone."""
    found = pids_named(TRAIN_WORKER, under=ray.raylets)
    assert len(found) == workers, f"{len(found)} {TRAIN_WORKER} processes below raylets {ray.raylets}: {found}"
    done, known = on_disk(run), registered(run)
    victim = found[-1]
    os.kill(victim, signal.SIGKILL)  # ProcessLookupError if it had died: the kill would have hit nothing
    return WorkerKill(victim, found, done, known, time.time())


def assert_recovered(ray: OwnRay, run: Path, kill: WorkerKill, final: str, replay: str) -> str:
    """That the kill hit a live worker of this run while training remained, and that new worker
    processes went on from the latest checkpoint (``assert_resumed``). Returns its name."""
    why = f"(killed pid {kill.pid} with checkpoints {kill.on_disk}, {kill.registered} registered; {replay})"
    assert not survivors([kill.pid]), f"the killed worker lives on {why}"
    assert ray.worker_logs(kill.pid), f"pid {kill.pid} was no worker of this test's Ray {why}"
    restarted: dict[int, set[str]] = {}
    for pid, matches in ray.logged(RESUMED).items():
        names = {Path(m.group(1)).name for m in matches if Path(m.group(1)).parent == run}
        if names and pid not in kill.workers:
            restarted[pid] = names
    assert restarted, f"no new worker resumed {run} from a checkpoint: it finished untouched or started over {why}"
    resumed = set().union(*restarted.values())
    name = assert_resumed(run, resumed, kill.on_disk, kill.registered, kill.at, final, why)
    print(f"workers {sorted(restarted)} took over from {kill.workers}", flush=True)
    return name


def assert_resumed(
    run: Path, resumed: set[str], at_kill: list[str], known: list[str], at: float, final: str, why: str
) -> str:
    """That a run killed at ``at`` while training remained (complete checkpoints ``at_kill``,
    ``known`` of them registered, ``final`` not among them) went on from one checkpoint,
    ``resumed`` (the names its workers logged): the latest registered one or a later one it
    had then; and that it redid every later step: each later checkpoint, ``final`` included,
    was written after the kill."""
    assert known and final not in at_kill, f"the kill did not land mid-run {why}"
    assert len(resumed) == 1, f"resumed from {sorted(resumed)}, not from one checkpoint {why}"
    (name,) = resumed
    assert name in at_kill and name >= known[-1], f"resumed from {name}, not from the latest checkpoint {why}"
    after = [c for c in on_disk(run) if c > name]
    assert final in after, f"the run did not end at {final}: {on_disk(run)} {why}"
    written = {c: round((run / c / "meta.json").stat().st_mtime - at, 3) for c in after}
    assert all(t >= 0 for t in written.values()), f"steps after {name} not redone after the kill: {written} {why}"
    print(f"killed with {at_kill[-1]} the last checkpoint ({known[-1]} registered); resumed from {name}, "
          f"then wrote {after}", flush=True)  # fmt: skip
    return name
