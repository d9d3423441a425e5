"""What the S3 retry layer (``storage.s3_filesystem``, issue 22) costs, side by side with pyarrow's
own S3 client in one run, against a moto server on loopback (started here, as the tests do):

    python benchmarks/s3_retries.py [--mb 128] [--rounds 3]

(a) one object of ``--mb`` MB written, then read back whole and as a video's local copy (8 MB
    ranged GETs), and (b) a feature table of 64 rows of [300, 2048] float16 (the extraction
    default, about 79 MB) written and read with Parquet: this process's CPU seconds (user+system)
    and wall seconds per round, pyarrow's client against ours, and the ratio. The rounds
    alternate so that the machine's noise falls on both. moto's own CPU is not counted (another
    process); on the same machine it is most of the wall time.
(c) the same with ``tests/faulty_s3.py`` in front of moto at 10% 503 SlowDown, 2% resets and no
    added latency: ours completes; pyarrow's (3 tries by default) is reported as it fares.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.faulty_s3 import FaultyS3  # noqa: E402
from vtplatform import storage as st  # noqa: E402
from vtplatform.config import StorageSection  # noqa: E402


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start_moto(workdir: Path) -> tuple[subprocess.Popen, str]:
    server = os.environ.get("VTP_MOTO_SERVER") or str(ROOT / ".venv-moto" / "bin" / "moto_server")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = open(workdir / "moto.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(150):
        try:
            urllib.request.urlopen(endpoint, timeout=1)
            return proc, endpoint
        except Exception:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"moto_server ({server}) did not start")


def pyarrow_s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")


def object_round(fs: pafs.FileSystem, storage: StorageSection, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)
    with fs.open_input_file(path) as f:
        assert f.read() == data
    if isinstance(fs, pafs.PyFileSystem):  # the local copy of a video, as decoding makes it
        with st.local_copy(f"s3://{path}", storage) as local:
            assert os.path.getsize(local) == len(data)
    else:
        with tempfile.NamedTemporaryFile() as tmp, fs.open_input_stream(path) as src:
            while chunk := src.read(8 << 20):
                tmp.write(chunk)
            assert tmp.tell() == len(data)


def table_round(fs: pafs.FileSystem, path: str, table: pa.Table) -> None:
    st.write_parquet(table, fs, path)
    assert pq.read_table(path, filesystem=fs).num_rows == table.num_rows


def measure(label: str, rounds: int, clients: dict, work) -> None:
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in clients}
    for _ in range(rounds):
        for name, client in clients.items():
            c0, w0 = cpu(), time.perf_counter()
            work(*client)
            times[name].append((cpu() - c0, time.perf_counter() - w0))
    med = {name: (statistics.median(c for c, _ in t), statistics.median(w for _, w in t)) for name, t in times.items()}
    (pa_cpu, pa_wall), (ours_cpu, ours_wall) = med["pyarrow"], med["retrying"]
    print(
        f"{label:<44} pyarrow {pa_cpu:6.2f} CPU s {pa_wall:6.2f} wall s | ours {ours_cpu:6.2f} CPU s "
        f"{ours_wall:6.2f} wall s | ours/pyarrow CPU {ours_cpu / pa_cpu:.2f}x, wall {ours_wall / pa_wall:.2f}x"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    with tempfile.TemporaryDirectory() as tmp:
        moto, endpoint = start_moto(Path(tmp))
        proxy = None
        try:
            bucket = "bench"
            pafs.S3FileSystem(
                endpoint_override=endpoint.split("://")[1], scheme="http", allow_bucket_creation=True
            ).create_dir(bucket)
            storage = StorageSection(endpoint_url=endpoint)
            data = np.random.default_rng(0).integers(0, 255, args.mb << 20, dtype=np.uint8).tobytes()
            features = np.random.default_rng(1).standard_normal((64, 300 * 2048)).astype(np.float16)
            table = pa.table({"video_id": [f"v{i}" for i in range(64)], "features": list(features)})
            clients = {"pyarrow": (pyarrow_s3(endpoint), storage), "retrying": (st.s3_filesystem(storage), storage)}
            print(f"moto at {endpoint}; {args.rounds} rounds, medians")
            measure(
                f"(a) {args.mb} MB object: write, read, local copy",
                args.rounds,
                clients,
                lambda fs, s: object_round(fs, s, f"{bucket}/obj.bin", data),
            )
            measure(
                "(b) 64 x [300, 2048] float16 Parquet",
                args.rounds,
                clients,
                lambda fs, s: table_round(fs, f"{bucket}/t/part-0.parquet", table),
            )
            proxy = FaultyS3.start(endpoint, Path(tmp) / "proxy.log", slowdown=0.1, reset=0.02, latency_ms=(0, 0))
            faulty = StorageSection(endpoint_url=proxy.endpoint)
            for name, fs in (("pyarrow", pyarrow_s3(proxy.endpoint)), ("retrying", st.s3_filesystem(faulty))):
                done = failed = 0
                for i in range(20):
                    try:
                        table_round(fs, f"{bucket}/f/part-{i}.parquet", table.slice(0, 8))
                        done += 1
                    except OSError as exc:
                        failed += 1
                        last = str(exc).splitlines()[0][:100]
                print(f"(c) 20 Parquet rounds at 10% SlowDown + 2% resets, {name:<8}: {done} done, {failed} failed")
                if failed:
                    print(f"    last error: {last}")
            print("    retried by ours:", st.format_retries(st.storage_retries()))
        finally:
            if proxy is not None:
                proxy.stop()
            moto.terminate()
            moto.wait(timeout=10)


if __name__ == "__main__":
    main()
