"""The extraction job end to end, on a real local Ray, real clips and every kind of bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.clips import truncate, write_audio_only, write_indexed_clip, write_noise_clip
from tests.conftest import EXAMPLES, ROOT, run_job
from tests.ray_nodes import kill_later
from vtplatform import schema as S
from vtplatform.config import ConfigError, load_config
from vtplatform.extract import run_extract
from vtplatform.outputs.features import FeatureOutput
from vtplatform.pipeline import finalize_outputs
from vtplatform.storage import derive_video_id

SEGMENTS = 4
SMALL = [
    "MODEL.num_layers=18",
    f"INFER.seg_num={SEGMENTS}",
    "output.rows_per_file=3",
    "resources.tsn_threads=1",
]
GOOD_CLIPS = [
    "mmaction2_demo.mp4",
    "paddlevideo_example.avi",
    "decord_flipping_a_pancake.mkv",
    "decord_rotation_90.mov",
]


def small_config(*extra: str):
    return load_config(ROOT / "configs" / "tsn.yaml", SMALL + list(extra))


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Real clips, generated clips and every kind of bad input, plus a manifest listing them all."""
    root = tmp_path_factory.mktemp("library")
    for name in [*GOOD_CLIPS, "decord_corrupted.mp4"]:
        shutil.copy(EXAMPLES / name, root / name)
    (root / "same").mkdir()
    shutil.copy(EXAMPLES / "mmaction2_part_0.mp4", root / "same" / "mmaction2_demo.mp4")  # same basename, other folder
    write_indexed_clip(root / "one_frame.mp4", 1)
    full = write_indexed_clip(root / "full.mp4", 200)
    truncate(full, root / "truncated.mp4", 0.5)
    truncate(full, root / "truncated_header.mp4", 0.01)
    (root / "zero.mp4").write_bytes(b"")
    (root / "random.mp4").write_bytes(np.random.default_rng(1).bytes(40_000))
    (root / "text.mp4").write_text("not a video\n" * 50)
    write_audio_only(root / "audio.m4a")
    (root / "unreadable.mp4").symlink_to("/proc/self/mem")  # reading fails with EIO, even as root
    good = [
        *GOOD_CLIPS,
        "decord_corrupted.mp4",
        "same/mmaction2_demo.mp4",
        "one_frame.mp4",
        "full.mp4",
        "truncated.mp4",
    ]
    bad = {
        "zero.mp4": ("read", "EmptyFile"),
        "random.mp4": ("decode", "DecodeError"),
        "text.mp4": ("decode", "DecodeError"),
        "audio.m4a": ("decode", "NoVideoStream"),
        "missing.mp4": ("read", "FileNotFoundError"),
        "unreadable.mp4": ("read", "OSError"),
        "truncated_header.mp4": ("decode", "DecodeError"),
    }
    lines = [str(root / p) for p in good + list(bad)]
    lines += [str(root / "full.mp4"), str(root / GOOD_CLIPS[0])]  # duplicate entries
    lines += [f"{root / 'labelled.mp4'}\x00 3"]  # malformed line (a NUL byte)
    (root / "all.list").write_text("\n".join(lines) + "\n")
    return {"root": root, "good": good, "bad": bad, "manifest": root / "all.list"}


def read_table(out: Path) -> pa.Table:
    return pq.read_table(out / S.FEATURES_DIR)


def read_dead(out: Path) -> pa.Table:
    return pq.read_table(out / "dead_letters")


def test_bad_inputs_become_dead_letters_and_good_videos_all_succeed(ray_cluster, library, tmp_path):
    root, out = library["root"], tmp_path / "out"
    summary = run_extract(small_config(), str(library["manifest"]), str(out))
    table, dead = read_table(out), read_dead(out)

    good_ids = {derive_video_id(str(root / p)) for p in library["good"]}
    assert set(table.column(S.VIDEO_ID).to_pylist()) == good_ids
    assert table.num_rows == len(good_ids)  # exactly one row per video, duplicates collapsed
    expected_dead = {derive_video_id(str(root / p)): kind for p, kind in library["bad"].items()}
    got_dead = {r[S.VIDEO_ID]: (r[S.STAGE], r[S.ERROR_TYPE]) for r in dead.to_pylist() if r[S.STAGE] != "manifest"}
    assert got_dead == expected_dead
    manifest_rows = [r for r in dead.to_pylist() if r[S.STAGE] == "manifest"]
    assert len(manifest_rows) == 1 and "NUL byte" in manifest_rows[0][S.MESSAGE]
    assert all(r[S.MESSAGE] for r in dead.to_pylist())

    assert summary.succeeded == len(good_ids) and summary.duplicates == 2 and summary.skipped == 0
    assert summary.failed_total == len(library["bad"]) + 1
    assert summary.failed["decode/DecodeError"] == 3 and summary.failed["manifest/ManifestParseError"] == 1

    rows = {
        r[S.VIDEO_ID]: r
        for r in table.select([S.VIDEO_ID, S.NUM_FRAMES, S.DECODER, S.WIDTH, S.HEIGHT, S.FPS]).to_pylist()
    }
    assert rows[derive_video_id(str(root / "decord_corrupted.mp4"))][S.DECODER] == "pyav"
    assert rows[derive_video_id(str(root / "decord_corrupted.mp4"))][S.NUM_FRAMES] == 49
    assert rows[derive_video_id(str(root / "mmaction2_demo.mp4"))][S.NUM_FRAMES] == 280
    assert rows[derive_video_id(str(root / "one_frame.mp4"))][S.NUM_FRAMES] == 1
    rotated = rows[derive_video_id(str(root / "decord_rotation_90.mov"))]
    assert (rotated[S.WIDTH], rotated[S.HEIGHT]) == (320, 568)
    assert rows[derive_video_id(str(root / "paddlevideo_example.avi"))][S.FPS] == pytest.approx(25.0)


def test_features_belong_to_their_video(ray_cluster, library, tmp_path):
    """Each row's features equal a direct, in-process computation for that very video."""
    from vtplatform.inference import frame_engine
    from vtplatform.models.tsn import TSNConfig, load_backbone
    from vtplatform.video.reader import ReadOptions, infer_plan, read_frames

    root, out = library["root"], tmp_path / "out"
    clips = [root / "mmaction2_demo.mp4", root / "same" / "mmaction2_demo.mp4", root / "paddlevideo_example.avi"]
    (tmp_path / "m.list").write_text("\n".join(map(str, clips)))
    run_extract(small_config("output.dtype=float32"), str(tmp_path / "m.list"), str(out))
    table = read_table(out)
    feats = dict(
        zip(
            table.column(S.VIDEO_ID).to_pylist(),
            table.column(S.FEATURES).combine_chunks().to_numpy_ndarray(),
            strict=True,
        )
    )
    indices = dict(zip(table.column(S.VIDEO_ID).to_pylist(), table.column(S.FRAME_INDICES).to_pylist(), strict=True))
    model, _ = load_backbone(TSNConfig(18), None, seed=0)
    engine = frame_engine(model, "cpu", "float32", threads=1)
    for clip in clips:
        sampled = read_frames(str(clip), *infer_plan(SEGMENTS), ReadOptions())
        vid = derive_video_id(str(clip))
        assert feats[vid].shape == (SEGMENTS, 512) and feats[vid].dtype == np.float32
        assert indices[vid] == sampled.indices.tolist()
        np.testing.assert_allclose(feats[vid], engine(sampled.frames), rtol=1e-4, atol=1e-4)
    a, b = (feats[derive_video_id(str(c))] for c in clips[:2])
    assert not np.allclose(a, b)  # same basename, different videos, different features


READ_WITHOUT_RAY = """
import sys
sys.modules["ray"] = None  # any import of ray fails: the table must not need it
import json, numpy as np, pandas as pd, pyarrow.parquet as pq
table = pq.read_table(sys.argv[1])
feats = table["features"].combine_chunks().to_numpy_ndarray()
one = table["features"][0].to_numpy()
df = pd.read_parquet(sys.argv[1])
shape = table.schema.field("features").type.shape
cell = np.asarray(df["features"].iloc[0]).reshape(shape)
meta = json.loads(table.schema.metadata[b"vtplatform"])
print(json.dumps({"shape": list(feats.shape), "one": list(one.shape), "dtype": str(feats.dtype), "pandas_equal": bool(np.array_equal(cell, one)),
                  "rows": len(df), "ids": df["video_id"].tolist(), "meta": meta}))
"""


def test_table_reads_with_plain_pyarrow_and_pandas_without_ray(ray_cluster, library, tmp_path):
    out = tmp_path / "out"
    clips = [library["root"] / c for c in GOOD_CLIPS[:3]]
    (tmp_path / "m.list").write_text("\n".join(map(str, clips)))
    run_extract(small_config(), str(tmp_path / "m.list"), str(out))
    res = json.loads(
        subprocess.check_output([sys.executable, "-c", READ_WITHOUT_RAY, str(out / S.FEATURES_DIR)], text=True)
    )
    assert res["shape"] == [3, SEGMENTS, 512] and res["one"] == [SEGMENTS, 512]
    assert res["dtype"] == "float16" and res["pandas_equal"] and res["rows"] == 3
    meta = res["meta"]
    assert meta["schema_version"] == S.SCHEMA_VERSION and meta["weights"] == "random-init"
    assert meta["model"] == {"name": "TSN", "depth": 18, "feature_dim": 512}
    assert meta["sampling"]["num_segments"] == SEGMENTS and meta["preprocessing"]["short_size"] == 256
    assert meta["feature_dtype"] == "float16" and "vtplatform_version" in meta
    # The tensor is stored without a dictionary (reading a dictionary-encoded float16 tensor back
    # runs at a fifth of the speed, which starves a training worker streaming the table); the
    # ids keep theirs.
    part = pq.ParquetFile(next((out / S.FEATURES_DIR).glob("*.parquet")))
    chunks = {
        part.schema.column(i).path: part.metadata.row_group(0).column(i) for i in range(part.metadata.num_columns)
    }
    assert not chunks["features.list.element"].has_dictionary_page
    assert chunks[S.VIDEO_ID].has_dictionary_page


def test_rerun_is_incremental_and_retry_failed_redoes_dead_letters(ray_cluster, library, tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    good = write_indexed_clip(root / "good.mp4", 20)
    later = root / "later.mp4"
    later.write_bytes(b"")  # bad for now
    (root / "m.list").write_text(f"{good}\n{later}\n")
    out = tmp_path / "out"
    first = run_extract(small_config(), str(root / "m.list"), str(out))
    assert (first.succeeded, first.failed_total) == (1, 1)
    files = sorted(p.name for p in (out / S.FEATURES_DIR).iterdir())

    again = run_extract(small_config(), str(root / "m.list"), str(out))
    assert (again.skipped, again.submitted, again.succeeded, again.failed_total) == (2, 0, 0, 0)
    assert sorted(p.name for p in (out / S.FEATURES_DIR).iterdir()) == files  # nothing rewritten

    write_indexed_clip(later, 12)  # the bad file got fixed upstream
    plain = run_extract(small_config(), str(root / "m.list"), str(out))
    assert plain.submitted == 0  # dead letters are done unless asked
    retried = run_extract(small_config(), str(root / "m.list"), str(out), retry_failed=True)
    assert (retried.skipped, retried.submitted, retried.succeeded) == (1, 1, 1)
    assert read_table(out).num_rows == 2
    assert not (out / "dead_letters").exists() or read_dead(out).num_rows == 0  # the resolved dead letter is gone


def test_refuses_to_mix_features_from_another_extractor(ray_cluster, library, tmp_path):
    (tmp_path / "m.list").write_text(str(library["root"] / "one_frame.mp4"))
    run_extract(small_config(), str(tmp_path / "m.list"), str(tmp_path / "out"))
    with pytest.raises(ConfigError, match="num_segments"):
        run_extract(small_config("INFER.seg_num=5"), str(tmp_path / "m.list"), str(tmp_path / "out"))


def test_job_npy_float32_and_exit_codes(ray_cluster, library, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster}
    (tmp_path / "m.list").write_text(f"{library['root'] / 'one_frame.mp4'}\n{library['root'] / 'zero.mp4'}\n")
    args = ["--config", "configs/tsn.yaml", "--filelist", str(tmp_path / "m.list"), "--save_dir", str(tmp_path / "out")]
    small = [a for o in SMALL for a in ("-o", o)]
    res = run_job("extract.py", *args, *small, "-o", "output.dtype=float32", "--format", "npy", env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (
        "1 ok, 1 failed" in res.stdout
        and "read/EmptyFile" in res.stdout
        and str(tmp_path / "out" / "features") in res.stdout
    )
    table = read_table(tmp_path / "out")
    vid = table.column(S.VIDEO_ID)[0].as_py()
    npy = np.load(tmp_path / "out" / "npy" / f"{vid}.npy")
    assert npy.dtype == np.float32 and npy.shape == (SEGMENTS, 512)
    np.testing.assert_array_equal(npy, table.column(S.FEATURES).combine_chunks().to_numpy_ndarray()[0])

    (tmp_path / "bad.list").write_text(f"{library['root'] / 'zero.mp4'}\n{library['root'] / 'text.mp4'}\n")
    res = run_job(
        "extract.py",
        "--config",
        "configs/tsn.yaml",
        "--filelist",
        str(tmp_path / "bad.list"),
        "--save_dir",
        str(tmp_path / "o2"),
        *small,
        env=env,
    )
    assert res.returncode == 1, res.stderr[-2000:]  # nothing at all succeeded
    assert read_dead(tmp_path / "o2").num_rows == 2

    res = run_job("extract.py", *args, "-o", "MODEL.num_layers=77", env=env)
    assert res.returncode == 2 and "MODEL.num_layers must be one of" in res.stderr


@pytest.fixture(scope="module")
def many_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("many")
    paths = [write_noise_clip(root / f"clip{i:02d}.mp4", 40, 160, 120, seed=i) for i in range(16)]
    (root / "m.list").write_text("\n".join(map(str, paths)) + "\n")
    return root / "m.list", paths


def test_killed_midway_then_rerun_ends_with_exactly_one_row_per_video(ray_cluster, many_clips, tmp_path):
    manifest, paths = many_clips
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "jobs" / "extract.py"),
        "--config",
        "configs/tsn.yaml",
        "--filelist",
        str(manifest),
        "--save_dir",
        str(out),
    ]
    cmd += [a for o in [*SMALL, "output.rows_per_file=2", "resources.decode_batch_size=1"] for a in ("-o", o)]
    env = {**os.environ, "RAY_ADDRESS": ray_cluster}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def kill_driver() -> None:
        assert proc.poll() is None, f"the job ended (exit {proc.returncode}) before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)

    first_part = lambda: any((out / S.FEATURES_DIR).glob("part-*.parquet"))  # noqa: E731
    killer = kill_later(first_part, kill_driver, timeout=300, what="the extraction driver")
    try:
        proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killer.landed()
    partial = _settled_rows(out)  # a write task of the dead driver may still finish on the cluster
    assert 0 < partial < len(paths), f"not killed midway: {partial} of {len(paths)} rows ({killer.replay})"

    res = run_job("extract.py", *cmd[2:], env={"RAY_ADDRESS": ray_cluster})
    assert res.returncode == 0, res.stderr[-3000:]
    ids = read_table(out).column(S.VIDEO_ID).to_pylist()
    assert sorted(ids) == sorted(derive_video_id(str(p)) for p in paths)  # every video, exactly once
    assert f"skipped (done before) {partial}" in res.stdout


def _settled_rows(out, quiet_s: float = 3.0, limit_s: float = 60.0) -> int:
    """The rows in ``out`` once no part has appeared for ``quiet_s``."""
    start, count, since = time.time(), -1, time.time()
    while time.time() - start < limit_s:
        now = len(list((out / S.FEATURES_DIR).glob("part-*.parquet")))
        if now != count:
            count, since = now, time.time()
        elif time.time() - since >= quiet_s:
            break
        time.sleep(0.2)
    return read_table(out).num_rows


def test_finalize_drops_rows_a_retried_write_repeated(tmp_path):
    import pyarrow.fs as pafs

    schema = S.feature_schema(2, 3, "float32", {"weights": "x"})

    def part(ids):
        n = len(ids)
        return pa.table(
            {
                S.VIDEO_ID: ids,
                S.URI: [f"/v/{i}" for i in ids],
                S.FEATURES: S.features_array(np.ones((n, 2, 3)), "float32"),
                S.NUM_FRAMES: pa.array([5] * n, pa.int32()),
                S.FRAME_INDICES: pa.FixedSizeListArray.from_arrays(pa.array([0, 1] * n, pa.int32()), 2),
                S.FPS: pa.array([25.0] * n, pa.float32()),
                S.WIDTH: pa.array([8] * n, pa.int32()),
                S.HEIGHT: pa.array([8] * n, pa.int32()),
                S.DECODER: ["decord"] * n,
            },
            schema=schema,
        )

    (tmp_path / S.FEATURES_DIR).mkdir()
    pq.write_table(part(["a", "b"]), tmp_path / S.FEATURES_DIR / "part-1.parquet")
    pq.write_table(part(["b", "c"]), tmp_path / S.FEATURES_DIR / "part-2.parquet")
    pq.write_table(part(["c"]), tmp_path / S.FEATURES_DIR / "part-3.parquet")
    features = [FeatureOutput(schema, write_npy=False, where=str(tmp_path))]
    finalize_outputs(features, pafs.LocalFileSystem(), str(tmp_path), expected=pa.array(["a", "b", "c"]))
    assert sorted(read_table(tmp_path).column(S.VIDEO_ID).to_pylist()) == ["a", "b", "c"]
    assert not (tmp_path / S.FEATURES_DIR / "part-3.parquet").exists()
    assert S.read_provenance(pq.read_schema(tmp_path / S.FEATURES_DIR / "part-2.parquet")) == {"weights": "x"}
    with pytest.raises(RuntimeError, match="neither features nor dead letters"):
        finalize_outputs(features, pafs.LocalFileSystem(), str(tmp_path), expected=pa.array(["a", "zzz"]))


def test_videos_that_crash_or_hang_the_decoder_process_become_dead_letters(library, tmp_path):
    """A decoder segfault kills the Ray worker, not just a Python call, and a hung decoder cannot be
    interrupted: its watchdog kills the worker. The job must dead-letter such videos after their
    retries and still finish every other one. The drill (``VTP_FAULT_DECODE``) is read by the job's
    driver and handed to its decode tasks (``faults.decode_faults``), as a user would set it."""
    poison, stuck = tmp_path / "poison.mp4", tmp_path / "stuck.mp4"
    for path in (poison, stuck):  # good files: only the hook makes them crash or hang
        shutil.copy(EXAMPLES / "mmaction2_demo.mp4", path)
    good = [library["root"] / "one_frame.mp4", library["root"] / GOOD_CLIPS[0]]
    (tmp_path / "m.list").write_text("\n".join(map(str, [good[0], poison, stuck, good[1]])) + "\n")
    res = run_job(
        "extract.py",
        "--config",
        "configs/tsn.yaml",
        "--filelist",
        str(tmp_path / "m.list"),
        "--save_dir",
        str(tmp_path / "out"),
        *[a for o in [*SMALL, "extract.decode_timeout_s=8"] for a in ("-o", o)],
        env={"RAY_ADDRESS": "local", "VTP_FAULT_DECODE": "crash:poison.mp4,hang:stuck.mp4"},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(read_table(tmp_path / "out").column(S.VIDEO_ID).to_pylist()) == sorted(
        derive_video_id(str(p)) for p in good
    )
    dead = sorted(read_dead(tmp_path / "out").to_pylist(), key=lambda d: d[S.ERROR_TYPE])
    assert [(d[S.VIDEO_ID], d[S.STAGE], d[S.ERROR_TYPE]) for d in dead] == [
        (derive_video_id(str(stuck)), "decode", "DecodeTimeout"),
        (derive_video_id(str(poison)), "decode", "DecoderCrashed"),
    ]
    assert all("died 2 times" in d[S.MESSAGE] for d in dead) and "over 8.0 s" in dead[0][S.MESSAGE]
    assert "decode/DecoderCrashed" in res.stdout and "decode/DecodeTimeout" in res.stdout
