"""What re-tagging a library from the stores costs, against tagging it from its videos, side by side
in one run on this machine's CPUs (issue: "A better model reaches the whole library").

    python benchmarks/retag.py [--videos 400] [--clips 2] [--cache_mb 16]

Each figure comes from ``python jobs/tag.py`` as a user runs it (a Ray of its own) and its run
summary (``SAVE_DIR/runs/*.json``): rates over the pipeline's wall time, memory as the job measured
it. The weights and tables are written first by a process of their own.

(a) from a feature table: ``jobs/tag.py --features`` with the full-size AttentionLSTM (1024/512, fc 8192/4096,
    3396 classes) over ``--videos`` rows of 300x2048 float16 features, two AttentionLSTM actors of
    half a CPU each (``-o resources.lstm_actors=2 -o resources.lstm_cpus=0.5``): videos/s;
(b) from the videos: ``jobs/tag.py --filelist`` with the full-size TSN (ResNet-101, 300 segments, configs/tag.yaml)
    and the same AttentionLSTM over ``--clips`` bundled clips: videos/s, and the ratio (a)/(b);
(c) memory while re-tagging tables of 1x and 10x ``data.cache_mb`` (``--cache_mb``): the driver's
    peak and the AttentionLSTM actor's own memory over its loaded model, which must not follow the
    table's size;
(d) the full-size AttentionLSTM in this process alone, one thread: ms a video, one video a call (as
    the tagging actors run it) and in batches, Paddle's dygraph against the numpy engine the CPU
    stages run (``--skip a,b,c`` runs it alone).

The features are random (what is measured does not depend on their values); their provenance is
the extraction's, so the tagging checks pass as for a real table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CLIPS = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_flipping_a_pancake.mkv", "mmaction2_test.mp4"]
PER_VIDEO_MB = 300 * 2048 * 2 / 2**20
ACTORS = ["resources.lstm_actors=2", "resources.lstm_cpus=0.5", "tag.label_file=null"]


def write_table(folder: Path, videos: int, config, rows_per_part: int = 64) -> None:
    """A feature table of ``videos`` rows with the extraction's schema and provenance (no weights:
    random init, as the model here)."""
    from vtplatform import schema as S
    from vtplatform import storage as st
    from vtplatform.stages import tsn

    fingerprint, dim = "random-init", 2048
    prov = tsn.provenance(config, fingerprint, dim, "float32")
    schema = S.feature_schema(300, dim, "float16", prov)
    rng = np.random.default_rng(0)
    (folder / S.FEATURES_DIR).mkdir(parents=True)
    for start in range(0, videos, rows_per_part):
        n = min(rows_per_part, videos - start)
        ids = [f"v{i:07d}" for i in range(start, start + n)]
        table = pa.table(
            {
                S.VIDEO_ID: ids,
                S.URI: [f"/library/{i}.mp4" for i in ids],
                S.FEATURES: S.features_array(rng.standard_normal((n, 300, dim)).astype(np.float16) * 0.3, "float16"),
                S.NUM_FRAMES: pa.array([3000] * n, pa.int32()),
                S.FRAME_INDICES: pa.FixedSizeListArray.from_arrays(
                    pa.array(list(range(4, 3000, 10)) * n, pa.int32()), 300
                ),
                S.FPS: pa.array([25.0] * n, pa.float32()),
                S.WIDTH: pa.array([1280] * n, pa.int32()),
                S.HEIGHT: pa.array([720] * n, pa.int32()),
                S.DECODER: ["decord"] * n,
            },
            schema=schema,
        )
        fs, root = st.filesystem(str(folder / S.FEATURES_DIR), config.storage)
        st.write_parquet(table, fs, f"{root}/part-{start:07d}.parquet")


def full_size_lstm(path: Path) -> Path:
    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    model = build_model(AttentionLSTMConfig(2048, 1024, 512, 8192, 4096, 3396), seed=1)
    W.save_state(model, fluid_name_map(model), path)
    return path


def prepare(work: Path, videos: int, cache_mb: int) -> None:
    """The weights and the tables, written by a process of their own, so that nothing the
    benchmark itself allocates counts in a job's memory figures."""
    from vtplatform.config import load_config

    config = load_config(ROOT / "configs" / "tag.yaml", ACTORS)
    full_size_lstm(work / "attention_lstm.pdparams")
    write_table(work / "big", videos, config)
    for times in (1, 10):
        write_table(work / f"mem{times}", max(1, int(times * cache_mb / PER_VIDEO_MB)), config)


def tag(work: Path, name: str, *args: str, overrides: tuple[str, ...] = ()) -> dict:
    """``python jobs/tag.py`` as a user runs it, with a Ray of its own; returns its run summary."""
    cmd = [sys.executable, str(ROOT / "jobs" / "tag.py"), "--config", "configs/tag.yaml", *args]
    cmd += ["--save_dir", str(work / name), "--lstm_weights", str(work / "attention_lstm.pdparams")]
    cmd += [a for o in (*ACTORS, *overrides) for a in ("-o", o)]
    res = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": ""}, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{name}: jobs/tag.py exited {res.returncode}:\n{res.stderr[-3000:]}")
    return json.loads(sorted((work / name / "runs").glob("*.json"))[-1].read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=400, help="rows of the feature table re-tagged in (a)")
    p.add_argument("--clips", type=int, default=2, help="bundled clips tagged from the videos in (b)")
    p.add_argument("--cache_mb", type=int, default=16, help="data.cache_mb for (c): tables of 1x and 10x it")
    p.add_argument("--skip", default="", help="sections to skip: b, c, d; a,b,c runs (d) alone")
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)  # internal: the data-writing process
    args = p.parse_args()
    if args.prepare:
        prepare(Path(args.prepare), args.videos, args.cache_mb)
        return
    skip = set(args.skip.split(","))
    if skip >= {"a", "b", "c"}:
        return one_thread()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    work = Path(tempfile.mkdtemp(prefix="vtp-retag-"))
    try:
        subprocess.run([sys.executable, __file__, "--prepare", str(work), "--videos", str(args.videos),
                        "--cache_mb", str(args.cache_mb)], check=True)  # fmt: skip
        print(f"(a) re-tagging {args.videos} videos from a feature table (300x2048 float16), full-size AttentionLSTM")
        stored = tag(work, "out_a", "--features", str(work / "big" / "features"))
        assert stored["succeeded"] == args.videos, stored
        rate_a = args.videos / stored["elapsed_seconds"]
        busy = stored["stage_seconds"].get("lstm", 0.0) / 2  # per actor: the two run side by side
        print(
            f"  {stored['elapsed_seconds']:8.1f} s: {rate_a:6.2f} videos/s (goal >= 10), the job's wall time, its start-up included"
        )
        print(f"  the AttentionLSTM actors once started: {busy:6.1f} s busy each, {args.videos / busy:6.2f} videos/s")

        if "b" not in skip:
            print(f"(b) tagging {args.clips} bundled clips from the videos, full-size TSN (ResNet-101, 300 segments)")
            library = work / "lib"
            library.mkdir()
            for name in CLIPS[: args.clips]:
                shutil.copy(ROOT / "examples" / "videos" / name, library / name)
            (work / "m.list").write_text("".join(f"{library / n}\n" for n in CLIPS[: args.clips]))
            decoded = tag(work, "out_b", "--filelist", str(work / "m.list"))
            assert decoded["succeeded"] == args.clips, decoded
            rate_b = args.clips / decoded["elapsed_seconds"]
            print(f"  {decoded['elapsed_seconds']:8.1f} s: {rate_b:6.4f} videos/s")
            print(f"  from the stores / from the videos = {rate_a / rate_b:.0f}x (goal >= 100x)")

        if "c" not in skip:
            print(f"(c) memory re-tagging tables of 1x and 10x data.cache_mb={args.cache_mb}")
            for times in (1, 10):
                n = max(1, int(times * args.cache_mb / PER_VIDEO_MB))
                s = tag(work, f"out_c{times}", "--features", str(work / f"mem{times}" / "features"),
                        overrides=(f"data.cache_mb={args.cache_mb}",))  # fmt: skip
                assert s["succeeded"] == n, s
                peaks = s["stage_peak_mb"]
                print(
                    f"  {times:>2}x: {n:5d} videos ({n * PER_VIDEO_MB:6.0f} MB of features): driver peak "
                    f"{s['driver_peak_mb']:6.0f} MB, AttentionLSTM actor +{peaks.get('lstm', 0):5.0f} MB "
                    f"over its loaded model (+{peaks.get('lstm call', 0):.0f} MB at most in one call)"
                )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if "d" not in skip:
        one_thread()


def one_thread() -> None:
    """(d) the full-size AttentionLSTM in this process alone, one thread: ms a video, one video a
    call (as the tagging actors run it) and batches of 4, 8 and 16 videos, in Paddle's dygraph and in
    the numpy engine that the CPU stages run (``models/lstm_numpy.py``), and how far apart their
    logits are."""
    import time

    import paddle
    from threadpoolctl import threadpool_limits

    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model
    from vtplatform.models.lstm_numpy import NumpyAttentionLSTM
    from vtplatform.stages.lstm import forward_logits

    print("(d) the full-size AttentionLSTM alone, one thread, 300x2048 features: ms a video, best of 3")
    paddle.base.core.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    model = build_model(AttentionLSTMConfig(2048, 1024, 512, 8192, 4096, 3396), seed=1)
    model.eval()
    engines = {"Paddle dygraph": lambda x, n: forward_logits(model, x, n)}
    engines["numpy engine"] = NumpyAttentionLSTM.from_model(model).logits
    x = (np.random.default_rng(0).standard_normal((16, 300, 2048)) * 0.3).astype(np.float32)
    rates = {}
    for name, logits in engines.items():
        logits(x[:1], np.array([300]))  # warm-up
        for batch in (1, 4, 8, 16):
            best = float("inf")
            for _ in range(3):
                start = time.perf_counter()
                for i in range(0, 16, batch):
                    logits(x[i : i + batch], np.array([300] * batch))
                best = min(best, (time.perf_counter() - start) / 16 * 1000)
            rates[name, batch] = best
            print(f"  {name:14s} {batch:2d} video{'s' if batch > 1 else ' '} a call: {best:6.0f} ms a video")
    print(f"  numpy / Paddle, one video a call: {rates['Paddle dygraph', 1] / rates['numpy engine', 1]:.2f}x faster")
    lengths = np.array([300, 200, 37, 1])
    diff = np.abs(engines["Paddle dygraph"](x[:4], lengths) - engines["numpy engine"](x[:4], lengths)).max()
    print(f"  largest logit difference between the two (lengths {lengths.tolist()}): {diff:.1e}")


if __name__ == "__main__":
    main()
