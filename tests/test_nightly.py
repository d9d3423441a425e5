"""The nightly run on a tiny library: extract -> fine-tune -> eval gate -> promote -> tag, then a
same-day rerun that does nothing new, and a run killed after a step that resumes there."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT, run_job
from vtplatform import registry as R
from vtplatform import schema as S
from vtplatform.config import load_config
from vtplatform.nightly import STOP_AFTER_ENV, decide, run_nightly

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
    "train_run.num_workers=1",
    "train_run.cpus_per_worker=1",
    "train_run.threads_per_worker=1",
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
    return pq.read_table(registry / "tags" / "tags")


def test_first_run_promotes_and_a_same_day_rerun_does_nothing_new(ray_cluster, setup):
    tmp_path, _, overrides = setup
    registry = tmp_path / "registry"
    config = load_config(ROOT / "configs" / "nightly.yaml", overrides)

    first = run_nightly(config)
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
    assert tags.num_rows == len(CLIPS) and first.tagged == len(CLIPS)
    assert all(len(ids) == 3 for ids in tags.column(S.CLASS_IDS).to_pylist())
    assert json.loads(tags.schema.metadata[S.METADATA_KEY])["model_id"] == first.run_id

    second = run_nightly(config)
    assert second.nothing_new and second.run_id == first.run_id
    assert second.new_videos == 0 and second.tagged == 0 and "train" not in second.steps
    assert len(R.history(str(registry), config.storage)) == 1
    assert R.read_champion(str(registry), config.storage) == champion
    assert [p.name for p in (registry / "models").iterdir()] == [first.run_id]
    assert _tags(registry).num_rows == len(CLIPS)


@pytest.mark.slow
def test_new_data_is_gated_and_a_killed_run_resumes_at_its_step(ray_cluster, setup):
    tmp_path, lib, overrides = setup
    registry = tmp_path / "registry"
    config = load_config(ROOT / "configs" / "nightly.yaml", overrides)
    first = run_nightly(config)

    for name in LATER:  # two new videos arrive, with labels
        shutil.copy(EXAMPLES / name, lib / name)
    args = ["--config", "configs/nightly.yaml", *[a for o in [*overrides, "nightly.margin=0.0"] for a in ("-o", o)]]
    env = {"RAY_ADDRESS": ray_cluster}
    killed = run_job("nightly.py", *args, env={**env, STOP_AFTER_ENV: "train"})
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL right after the fine-tune was recorded
    runs = sorted(p.name for p in (registry / "runs").iterdir())
    assert len(runs) == 2
    state = json.loads((registry / "runs" / runs[-1] / "state.json").read_text())
    assert state["completed"] == ["train"] and not state["done"]
    checkpoints = sorted(p.name for p in (registry / "models" / runs[-1]).iterdir())

    resumed = run_job("nightly.py", *args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed at step     evaluate" in resumed.stdout
    assert sorted(p.name for p in (registry / "models" / runs[-1]).iterdir()) == checkpoints  # not trained again
    history = R.history(str(registry), config.storage)
    assert history[0]["decision"] == "first" and len(history) == 2
    second = history[1]
    assert second["champion_before"] == first.run_id and second["decision"] in ("promoted", "kept")
    assert second["decision"] == decide(second["candidate"], second["champion"], 0.0)
    champion = R.read_champion(str(registry), config.storage)
    assert champion["model_id"] == (runs[-1] if second["decision"] == "promoted" else first.run_id)
    report = (registry / "runs" / runs[-1] / "report.md").read_text()
    assert "champion" in report and "Per-class AP changes" in report
    assert _tags(registry).num_rows == len(CLIPS) + len(LATER)  # the new videos got tags


@pytest.mark.slow
@pytest.mark.parametrize("step", ["extract", "evaluate", "promote"])
def test_a_run_killed_after_any_step_resumes_there(ray_cluster, setup, step):
    """The other kill points (after ``train`` is covered above): the rerun redoes nothing finished."""
    tmp_path, lib, overrides = setup
    registry = tmp_path / "registry"
    config = load_config(ROOT / "configs" / "nightly.yaml", overrides)
    first = run_nightly(config)
    for name in LATER:
        shutil.copy(EXAMPLES / name, lib / name)
    args = ["--config", "configs/nightly.yaml", *[a for o in [*overrides, "nightly.margin=0.0"] for a in ("-o", o)]]
    env = {"RAY_ADDRESS": ray_cluster}
    killed = run_job("nightly.py", *args, env={**env, STOP_AFTER_ENV: step})
    assert killed.returncode == -9, killed.stderr[-3000:]
    features = pq.read_table(registry / "features" / "features").num_rows
    assert features == len(CLIPS) + len(LATER)  # extraction finished before any kill point
    runs = sorted(p.name for p in (registry / "runs").iterdir())
    if step == "extract":  # killed before the run was recorded: the rerun starts it
        assert runs == [first.run_id]
    else:
        state = json.loads((registry / "runs" / runs[-1] / "state.json").read_text())
        assert state["completed"] == ["train", "evaluate", "promote"][: ["evaluate", "promote"].index(step) + 2]
        models = sorted(p.name for p in (registry / "models" / runs[-1]).iterdir())
    history_before = len(R.history(str(registry), config.storage))
    assert history_before == (2 if step == "promote" else 1)

    resumed = run_job("nightly.py", *args, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected_resume = {"extract": None, "evaluate": "promote", "promote": "tag"}[step]
    if expected_resume:
        assert f"resumed at step     {expected_resume}" in resumed.stdout, resumed.stdout[-2000:]
        assert sorted(p.name for p in (registry / "models" / runs[-1]).iterdir()) == models  # not retrained
    else:
        assert "resumed at step" not in resumed.stdout
    history = R.history(str(registry), config.storage)
    assert len(history) == 2 and history[1]["champion_before"] == first.run_id  # promoted once, not twice
    champion = R.read_champion(str(registry), config.storage)
    assert champion["model_id"] == (history[1]["run_id"] if history[1]["decision"] == "promoted" else first.run_id)
    assert _tags(registry).num_rows == len(CLIPS) + len(LATER)
    again = run_job("nightly.py", *args, env=env)  # and the day after, with nothing new, nothing happens
    assert again.returncode == 0 and len(R.history(str(registry), config.storage)) == 2


def test_decide():
    assert decide({"gap": 0.5}, None, 0.01) == "first"
    assert decide({"gap": 0.52}, {"gap": 0.5}, 0.01) == "promoted"
    assert decide({"gap": 0.505}, {"gap": 0.5}, 0.01) == "kept"
