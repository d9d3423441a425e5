"""The nightly run on a tiny library: extract -> fine-tune -> eval gate -> promote -> tag (-> segment
tags per champion), then a same-day rerun that does nothing new, and a run killed after a step that
resumes there."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT, run_job
from tests.ray_nodes import kill_job_midway, kill_later, kill_tree
from tests.train.kills import assert_resumed, on_disk, registered, resumed_in
from vtplatform import champions as R
from vtplatform import schema as S
from vtplatform.config import ConfigError, load_config
from vtplatform.faults import NIGHTLY_ENV as STOP_AFTER_ENV
from vtplatform.nightly import decide, run_nightly, write_report

CLIPS = [
    "mmaction2_demo.mp4",
    "mmaction2_test.mp4",
    "paddlevideo_example.avi",
    "mmaction2_part_0.mp4",
    "decord_flipping_a_pancake.mkv",
    "mmaction2_test_video_structuralize.mp4",
]
LATER = ["paddlevideo_eivideo_example.mp4", "mmaction2_demo_spatiotemporal_det.mp4"]
SMALL = [
    "MODEL.num_layers=18",
    "INFER.seg_num=4",
    "MODEL.feature_dims=[512]",
    "MODEL.embedding_size=16",
    "MODEL.lstm_size=8",
    "MODEL.fc1_size=16",
    "MODEL.fc2_size=8",
    "MODEL.num_classes=5",
    "MODEL.topk=3",
    "TRAIN.epoch=2",
    "TRAIN.batch_size=2",
    "TRAIN.num_gpus=1",
    "TRAIN.decay_epochs=[1]",
    "TRAIN.learning_rate=0.01",
    "TEST.batch_size=4",
    "resources.train_workers=1",
    "resources.train_cpus=1",
    "resources.train_threads=1",
    "tag.topk=3",
    "resources.tsn_threads=1",
    "resources.tsn_actors=1",
    "output.rows_per_file=4",
]


@pytest.fixture
def setup(tmp_path):
    lib = tmp_path / "library"
    lib.mkdir()
    for name in CLIPS:
        shutil.copy(EXAMPLES / name, lib / name)
    labels = "\n".join(f"{lib / name} {i % 5} {(i + 2) % 5}" for i, name in enumerate(CLIPS + LATER)) + "\n"
    (tmp_path / "labels.list").write_text(labels)
    (tmp_path / "holdout.list").write_text(f"{lib / CLIPS[0]} 0 2\n{lib / CLIPS[3]} 3 0\n")
    (tmp_path / "names.txt").write_text("\n".join(["cat", "dog", "car", "sky", "cat"]) + "\n")
    overrides = [
        *SMALL,
        f"nightly.library={lib}",
        f"nightly.labels={tmp_path / 'labels.list'}",
        f"nightly.holdout={tmp_path / 'holdout.list'}",
        f"nightly.registry={tmp_path / 'registry'}",
        f"tag.label_file={tmp_path / 'names.txt'}",
        "nightly.tsn_weights=null",  # seeded random init: no weights ship with the project
        "nightly.pretrain=null",
    ]
    return tmp_path, lib, overrides


def _tags(registry):
    """The champion's tags of the whole library, as a reader finds them (``champions.current_tags``)."""
    from vtplatform.config import StorageSection

    return pq.read_table(R.current_tags(str(registry / "tags"), StorageSection()))


SEGMENT_S = 5.0


def _segment_tags(registry, model_id: str, videos: list[str]) -> list[str]:
    """Checks a champion's tags folder holds the tags and windows of exactly ``videos``, made with
    that champion's weights, and readable spans; returns its tags, segments and spans part files."""
    folder = registry / "tags" / model_id
    tags = pq.read_table(folder / "tags")
    assert sorted(tags.column(S.VIDEO_ID).to_pylist()) == sorted(videos)  # one row each
    segments = pq.read_table(folder / "segments")
    assert sorted(set(segments.column(S.VIDEO_ID).to_pylist())) == sorted(videos)
    for table in (tags, segments):
        meta = S.read_provenance(table.schema)
        assert meta["lstm_source"].startswith(str(registry / "models" / model_id))
    assert meta["segments"] == {"seconds": SEGMENT_S, "stride_seconds": SEGMENT_S, "timeline_fps": 1.0,
                                "timeline_chunk_frames": 512}  # fmt: skip
    for vid in videos:  # the clips last 1 to 10.4 s: windows 0, 1, ... from 0 s, one per 5 s
        rows = segments.filter(pc.equal(segments.column(S.VIDEO_ID), vid))
        assert sorted(rows.column(S.WINDOW).to_pylist()) == list(range(rows.num_rows))
        assert min(rows.column(S.START_S).to_pylist()) == 0.0 and all(
            len(ids) == 3 for ids in rows[S.CLASS_IDS].to_pylist()
        )
    spans = pq.read_table(folder / "spans")
    assert spans.schema.names == S.SPAN_SCHEMA.names and set(spans.column(S.VIDEO_ID).to_pylist()) <= set(videos)
    return sorted(f"{d}/{p.name}" for d in ("tags", "segments", "spans") for p in (folder / d).iterdir())


def _models_of(table) -> set[str]:
    """The lstm_source of every part of a tags table (one folder: one model)."""
    return {S.read_provenance(pq.read_schema(p))["lstm_source"] for p in table}


@pytest.mark.slow
def test_first_run_then_new_data_gated_with_a_run_killed_after_each_step(ray_cluster, setup):
    """The first run promotes its model and tags the library, with its windows (every video decoded,
    its timeline stored); a same-day rerun does nothing new. Then two new videos arrive. The run is
    killed right after extract, then after train, evaluate and promote in turn (each rerun resumes
    where the last one died), then a random moment into the new champion's re-tag of the library.
    The rerun finishes it: nothing is redone, the gate decided once (a fine-tune with learning rate 0
    ties the champion, so margin 0 promotes it), the new champion's folder holds the whole library
    re-tagged from the stores (only the two new videos decoded, for want of a stored timeline), a
    reader saw the old champion's whole tags until then and the new one's after, and a further rerun
    does nothing."""
    tmp_path, lib, overrides = setup
    overrides = [*overrides, f"nightly.segment_seconds={SEGMENT_S}"]
    registry = tmp_path / "registry"
    config = load_config(ROOT / "configs" / "nightly.yaml", overrides)
    first = run_nightly(config)  # the first run: everything is new, the candidate is promoted
    assert first.new_videos == len(CLIPS) and first.decision == "first" and not first.nothing_new
    assert first.labelled_videos == len(CLIPS) - 2  # the holdout is never trained on
    champion = R.read_champion(str(registry), config.storage)
    assert champion["model_id"] == first.run_id and champion["metrics"]["gap"] == pytest.approx(first.candidate["gap"])
    assert (registry / "models" / first.run_id / "best").exists() or any(
        (registry / "models" / first.run_id).glob("epoch_*")
    )
    history = R.history(str(registry), config.storage)
    assert [h["decision"] for h in history] == ["first"] and history[0]["champion_before"] is None
    report = (registry / "runs" / first.run_id / "report.md").read_text()
    assert (
        "GAP" in report
        and "Hit@1" in report
        and (registry / "runs" / first.run_id / "report.png").stat().st_size > 1000
    )
    tags = _tags(registry)
    assert tags.num_rows == len(CLIPS) and first.tagged == len(CLIPS) and first.decoded == len(CLIPS)
    assert all(len(ids) == 3 for ids in tags.column(S.CLASS_IDS).to_pylist())
    assert json.loads(tags.schema.metadata[S.METADATA_KEY])["model_id"] == first.run_id
    first_library = tags.column(S.VIDEO_ID).to_pylist()
    assert first.current == first.tags == str(registry / "tags" / first.run_id)
    assert f"tagged              {len(CLIPS)} videos, {len(CLIPS)} decoded, 0 failed" in first.format()
    timeline = pq.read_table(registry / "timeline")  # the timeline store: every video's, with its end
    assert sorted(set(timeline.column(S.VIDEO_ID).to_pylist())) == sorted(first_library)
    first_segments = _segment_tags(registry, first.run_id, first_library)
    same_day = run_nightly(config)
    assert same_day.nothing_new and same_day.run_id == first.run_id and (same_day.tagged, same_day.decoded) == (0, 0)
    assert "train" not in same_day.steps and len(R.history(str(registry), config.storage)) == 1
    assert R.read_champion(str(registry), config.storage) == champion and _tags(registry).num_rows == len(CLIPS)
    assert _segment_tags(registry, first.run_id, first_library) == first_segments

    for name in LATER:
        shutil.copy(EXAMPLES / name, lib / name)
    later = [*overrides, "nightly.margin=0.0", "TRAIN.learning_rate=0"]  # the candidate ties the champion: promoted
    args = ["--config", "configs/nightly.yaml", *[a for o in later for a in ("-o", o)]]
    env = {"RAY_ADDRESS": ray_cluster}

    killed = run_job("nightly.py", *args, env={**env, STOP_AFTER_ENV: "extract"})
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert pq.read_table(registry / "features" / "features").num_rows == len(CLIPS) + len(LATER)
    assert sorted(p.name for p in (registry / "runs").iterdir()) == [first.run_id]  # not recorded yet

    checkpoints: list[str] = []
    for step, completed, resumes_at in (
        ("train", ["train"], None),
        ("evaluate", ["train", "evaluate"], "evaluate"),
        ("promote", ["train", "evaluate", "promote"], "promote"),
    ):
        killed = run_job("nightly.py", *args, env={**env, STOP_AFTER_ENV: step})
        assert killed.returncode == -9, killed.stderr[-3000:]
        run_id = sorted(p.name for p in (registry / "runs").iterdir() if p.name != first.run_id)[0]
        if resumes_at:
            assert f"resuming run {run_id} at step {resumes_at}" in killed.stderr
            assert sorted(p.name for p in (registry / "models" / run_id).iterdir()) == checkpoints  # not retrained
        else:
            checkpoints = sorted(p.name for p in (registry / "models" / run_id).iterdir())
            assert checkpoints
        state = json.loads((registry / "runs" / run_id / "state.json").read_text())
        assert state["completed"] == completed and not state["done"]
        assert len(R.history(str(registry), config.storage)) == (2 if step == "promote" else 1)
    assert R.read_champion(str(registry), config.storage)["model_id"] == run_id  # promoted, the library not re-tagged
    assert _models_of((registry / "tags" / first.run_id / "tags").glob("*.parquet")) == {
        S.read_provenance(_tags(registry).schema)["lstm_source"]
    }

    # a random moment into the new champion's re-tag: a reader still sees the old champion's whole tags
    new_tags = registry / "tags" / run_id / "tags"
    command = [sys.executable, str(ROOT / "jobs" / "nightly.py"), *args]
    kill_job_midway(command, ROOT, lambda: any(new_tags.glob("*.parquet")), timeout=900)
    seen = _tags(registry)
    assert sorted(seen.column(S.VIDEO_ID).to_pylist()) == sorted(first_library)  # the old folder, whole
    assert json.loads(seen.schema.metadata[S.METADATA_KEY])["model_id"] == first.run_id

    resumed = run_job("nightly.py", *args, env=env)  # the rerun finishes the re-tag
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step     tag" in resumed.stdout
    history = R.history(str(registry), config.storage)
    assert [h["run_id"] for h in history] == [first.run_id, run_id]  # promoted once, not twice
    second = history[1]
    assert second["champion_before"] == first.run_id and second["candidate"] == second["champion"]  # a tie
    assert second["decision"] == decide(second["candidate"], second["champion"], 0.0) == "promoted"
    report = (registry / "runs" / run_id / "report.md").read_text()
    assert "champion" in report and "| +0.0000 |" in report  # no per-class changes: test_report_per_class_changes
    tags = _tags(registry)  # the new champion's, of every video, once, and only its
    library = tags.column(S.VIDEO_ID).to_pylist()
    assert len(library) == len(set(library)) == len(CLIPS) + len(LATER)
    assert json.loads(tags.schema.metadata[S.METADATA_KEY])["model_id"] == run_id
    assert _models_of(new_tags.glob("*.parquet")) == {S.read_provenance(tags.schema)["lstm_source"]}
    state = json.loads((registry / "runs" / run_id / "state.json").read_text())
    assert state["done"] and state["completed"][-1] == "tag"
    assert state["tag"]["decoded"] == len(LATER)  # the stored videos came from the stores: no decode
    new_segments = _segment_tags(registry, run_id, library)
    assert _segment_tags(registry, first.run_id, first_library) == first_segments  # the old one's untouched
    again = run_job("nightly.py", *args, env=env)  # and the day after, with nothing new, nothing happens
    assert again.returncode == 0 and len(R.history(str(registry), config.storage)) == 2
    assert (
        "tagged              0 videos, 0 decoded" in again.stdout
        and _segment_tags(registry, run_id, library) == new_segments
    )
    other_windows = load_config(ROOT / "configs" / "nightly.yaml", [*later, "nightly.segment_seconds=4"])
    with pytest.raises(ConfigError, match=r"segments differ.*delete it to re-tag"):  # never mixed in one folder
        run_nightly(other_windows)
    assert _segment_tags(registry, run_id, library) == new_segments


@pytest.mark.slow
def test_a_nightly_driver_killed_during_the_fine_tune_ends_with_one_row_and_one_decision(setup):
    """SIGKILL of `python jobs/nightly.py` (and the Ray it started) from outside, a random moment
    into the fine-tune, then the same command again."""
    tmp_path, _, overrides = setup
    registry = tmp_path / "registry"
    overrides = [*overrides, "TRAIN.epoch=6", "train_run.checkpoint_every_steps=1"]  # a fine-tune of 12 steps
    command = [sys.executable, str(ROOT / "jobs" / "nightly.py"), "--config", str(ROOT / "configs" / "nightly.yaml")]
    command += [a for o in overrides for a in ("-o", o)]
    env = {**os.environ, "RAY_ADDRESS": ""}
    driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def fine_tuning() -> bool:  # 4 of its 12 steps are behind it, and Ray Train has registered that checkpoint
        return any("epoch_002_step_0000000" in registered(run) for run in (registry / "models").glob("*"))

    killer = kill_later(fine_tuning, lambda: kill_tree(driver.pid), what="the nightly driver")
    driver.wait(timeout=900)
    killer.landed()
    assert driver.returncode == -signal.SIGKILL, killer.replay
    (run_id,) = [p.name for p in (registry / "runs").iterdir()]
    assert not json.loads((registry / "runs" / run_id / "state.json").read_text())["done"]
    assert not (registry / "tags").exists()
    fine_tune = registry / "models" / run_id
    at_kill, known = on_disk(fine_tune), registered(fine_tune)  # what the dead run left

    rerun = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    resumed = resumed_in(rerun.stderr)  # the fine-tune went on from there
    assert_resumed(fine_tune, resumed, at_kill, known, killer.at, "epoch_006_step_0000000", killer.replay)
    features = pq.read_table(registry / "features" / "features").column(S.VIDEO_ID).to_pylist()
    tags = _tags(registry).column(S.VIDEO_ID).to_pylist()
    assert len(features) == len(set(features)) == len(CLIPS)
    assert len(tags) == len(set(tags)) == len(CLIPS)
    history = R.history(str(registry), load_config(ROOT / "configs" / "nightly.yaml", overrides).storage)
    assert [(h["run_id"], h["decision"]) for h in history] == [(run_id, "first")]
    assert sorted(p.name for p in (registry / "models").iterdir()) == [run_id]


def test_report_per_class_changes(tmp_path):
    """The report's per-class section: the classes whose full-ranking AP moved most, by name."""
    config = load_config(
        ROOT / "configs" / "nightly.yaml", [f"nightly.registry={tmp_path}", f"tag.label_file={tmp_path / 'n.txt'}"]
    )
    (tmp_path / "n.txt").write_text("cat\ndog\ncar\n")
    base = {"gap": 0.5, "hit_at_one": 0.5, "perr": 0.5, "map": 0.5, "num_videos": 2, "per_class_ap": [None] * 3}
    evaluated = {
        "candidate": {**base, "gap": 0.6, "per_class_ap_full_ranking": [0.5, 0.9, 0.2]},
        "champion": {**base, "per_class_ap_full_ranking": [0.5, 0.4, 0.3]},
    }
    assert write_report(config, "r1", evaluated, "promoted") == f"{tmp_path}/runs/r1/report.md"
    report = (tmp_path / "runs" / "r1" / "report.md").read_text()
    assert "| GAP | 0.6000 | 0.5000 | +0.1000 |" in report and "Per-class AP changes" in report
    assert report.index("| 1 | dog | 0.4000 | 0.9000 | +0.5000 |") < report.index(
        "| 2 | car | 0.3000 | 0.2000 | -0.1000 |"
    )
    assert "| 0 | cat |" not in report and (tmp_path / "runs" / "r1" / "report.png").stat().st_size > 1000


def test_decide():
    assert decide({"gap": 0.5}, None, 0.01) == "first"
    assert decide({"gap": 0.52}, {"gap": 0.5}, 0.01) == "promoted"
    assert decide({"gap": 0.505}, {"gap": 0.5}, 0.01) == "kept"
