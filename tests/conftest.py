"""Shared fixtures: one local Ray for the session, a moto S3 server on loopback, real clips."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "videos"
DATA = Path(__file__).resolve().parent / "data"
GOLDEN = DATA / "golden"
SEED = DATA / "videotag"

# Fake credentials for moto: distinctive, so tests can prove they never leak into logs or outputs.
FAKE_KEY_ID = "AKIAVTPTESTKEYID0001"
FAKE_SECRET = "vtp-test-secret-Zq8xW2nB5mK7pL4r"


def pytest_configure(config) -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["AWS_ACCESS_KEY_ID"] = FAKE_KEY_ID
    os.environ["AWS_SECRET_ACCESS_KEY"] = FAKE_SECRET
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    config.pluginmanager.register(_GroupsTookEffect(), "vtp-groups-took-effect")


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own, which reads the groups into the test ids
def pytest_collection_modifyitems(config, items) -> None:
    """``gpu`` tests run only where Paddle sees a CUDA GPU; elsewhere they are deselected (and
    counted as such), never silently passed. Then the order and grouping for ``pytest -n`` (below)."""
    import paddle

    if not (paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0):
        gpu = [item for item in items if item.get_closest_marker("gpu")]
        if gpu:
            config.hook.pytest_deselected(items=gpu)
            items[:] = [item for item in items if not item.get_closest_marker("gpu")]
    _distribute(items)


class _GroupsTookEffect:
    """Fails a ``--dist loadgroup`` run whose tests would not be grouped: pytest-xdist (3.8) marks
    a test's group in its id, which pytest 9 no longer reads, so modules were silently split across
    the processes and their fixtures built in each (pyproject pins pytest below 9 for this)."""

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, config, items) -> None:
        if not config.getoption("loadgroup", False):  # set in pytest-xdist's worker processes
            return
        ungrouped = [item.nodeid for item in items if "@" not in item.nodeid]
        if ungrouped:
            raise pytest.UsageError(f"pytest-xdist did not group {len(ungrouped)} tests, e.g. {ungrouped[0]}")


# `make test` runs the suite in two pytest processes (pytest-xdist, `--dist loadgroup`); each has its
# own session Ray, with the machine's CPUs as a user's has, and its own moto server. A module's tests
# stay together in one process, so its module fixtures (trained models, extracted tables) are built
# once. The modules that start a cluster with `ray start --head` (which records itself in
# /tmp/ray/ray_current_cluster) or rewrite that file to test a stale one share one process, so that
# neither sees the other's cluster there. The longest modules go first, so that the two processes
# end together (a plain `pytest tests` runs them in that order too, in one process).
RAY_HEAD_MODULES = ("test_user_world.py", "test_node_loss.py", "test_cluster.py")
LONGEST_FIRST = (
    "train/test_tsn.py",
    "test_s3_faults.py",
    "test_user_world.py",
    "test_node_loss.py",
    "test_cluster.py",
    "test_nightly.py",
    "train/test_lstm.py",
    "test_lstm_jobs.py",
    "test_extract.py",
    "test_segments_job.py",
    "test_tag.py",
    "test_s3.py",
)


def _distribute(items) -> None:
    def module(item) -> str:
        return item.nodeid.split("::", 1)[0].removeprefix("tests/")

    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module(item), len(rank)))  # stable: a module's own order is kept
    for item in items:
        name = module(item)
        item.add_marker(pytest.mark.xdist_group("ray-head" if name.rsplit("/", 1)[-1] in RAY_HEAD_MODULES else name))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """With ``VTP_TEST_SPANS=FILE``, each test's pytest process, start and end go to FILE, a line each
    (``benchmarks/suite_cpu.py`` charges the CPU time of the processes below it to the test)."""
    start = time.time()
    yield
    if os.environ.get("VTP_TEST_SPANS"):
        with open(os.environ["VTP_TEST_SPANS"], "a") as out:
            out.write(f"{os.getpid()} {start:.3f} {time.time():.3f} {item.nodeid}\n")


@pytest.fixture(autouse=True)
def _scheduling_unchanged():
    """A test that leaves this process under real-time scheduling fails, and the process is put back:
    every process started from it afterwards (the session's Ray, job subprocesses) would inherit it,
    and busy real-time workers starve the rest of the machine into hangs (SVT-AV1 does it, run as root:
    ``tests/clips.scheduling_kept``)."""
    yield
    policy = os.sched_getscheduler(0)
    if policy != os.SCHED_OTHER:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
        pytest.fail(f"the test left the test process under scheduling policy {policy}, not SCHED_OTHER")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray for the whole session; its GCS address lets job subprocesses join it."""
    import ray

    from vtplatform import cli

    # The machine's own CPUs, as a user's laptop has them: jobs must size their stages to fit. Started
    # as a job starts its own Ray: with a dashboard that its workers know (cli.start_local_ray), so
    # that Ray Train's placement group cleaner asks this Ray, not the other pytest process's.
    ctx = cli.start_local_ray(object_store_memory=2 * 1024**3)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory):
    """A real S3 protocol server (moto) on loopback, started for this session."""
    local = ROOT / ".venv-moto" / "bin" / "moto_server"  # what `make test` installs
    server = os.environ.get("VTP_MOTO_SERVER") or (
        str(local) if local.exists() else shutil.which("moto_server") or str(local)
    )
    if not Path(server).exists():
        pytest.fail(f"moto_server not found at {server}; run the tests with `make test`, which installs it")
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 30
    while True:
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            break
        except Exception:
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail(f"moto_server did not start on {endpoint}")
            time.sleep(0.2)
    try:
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# S3 as it is at scale (issue 22): what every job must survive with the default retry policy.
FAULT_RATES = {"slowdown": 0.10, "reset": 0.02, "latency_ms": (20, 200)}


@pytest.fixture(scope="session")
def faulty_s3(moto_endpoint, tmp_path_factory):
    """A fault-injecting proxy (``tests/faulty_s3.py``) in front of the session's moto server:
    10% of requests answered ``503 SlowDown``, 2% cut short by a connection reset, 20-200 ms of
    latency on each, seeded; ``.endpoint``, ``.entries(since=.mark())`` (what it did),
    ``.control({...})`` (change the rates live)."""
    from tests.faulty_s3 import FaultyS3

    proxy = FaultyS3.start(moto_endpoint, tmp_path_factory.mktemp("faulty_s3") / "proxy.log", seed=22, **FAULT_RATES)
    try:
        yield proxy
    finally:
        proxy.stop()


@pytest.fixture
def s3_bucket(moto_endpoint, request):
    """A fresh bucket per test; returns its name."""
    import pyarrow.fs as pafs

    name = "vtp-" + request.node.name.lower().replace("_", "-")[:40].strip("-") + f"-{time.time_ns() % 10**6}"
    fs = pafs.S3FileSystem(
        endpoint_override=moto_endpoint.split("://")[1], scheme="http", region="us-east-1", allow_bucket_creation=True
    )
    fs.create_dir(name)
    return name


def run_job(
    script: str, *args: str, env: dict | None = None, timeout: int = 600, cwd: Path = ROOT
) -> subprocess.CompletedProcess:
    """Runs ``python jobs/<script>`` as a user would, returning the completed process."""
    full_env = {**os.environ, **(env or {})}
    start = time.perf_counter()
    res = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / script), *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if res.returncode == 0:  # every job the suite runs, on any Ray: Paddle's known noise stays out of its output
        from vtplatform.inference import PADDLE_NOISE

        noise = [n for n in (*PADDLE_NOISE, "No ccache found") if n in res.stdout + res.stderr]
        assert not noise, f"{script} printed Paddle's noise {noise}"
    if os.environ.get("VTP_TEST_JOB_TIMES"):  # where the suite's time goes: one line per job run
        with open(os.environ["VTP_TEST_JOB_TIMES"], "a") as out:
            test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
            out.write(f"{time.perf_counter() - start:7.1f}s {script} rc={res.returncode} {test}\n")
    return res
