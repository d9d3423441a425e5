"""Batch tagging: one pipeline from videos to tags, equal to extraction followed by predict."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import EXAMPLES, ROOT, run_job
from vtplatform import schema as S
from vtplatform.config import ConfigError, load_config
from vtplatform.extract import run_extract
from vtplatform.storage import derive_video_id
from vtplatform.tag import run_tag, run_tag_stores

CLIPS = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "decord_flipping_a_pancake.mkv"]
NUM_CLASSES = 20
SMALL = [
    "MODEL.num_layers=18",
    "INFER.seg_num=4",
    "MODEL.feature_dims=[512]",
    "MODEL.embedding_size=16",
    "MODEL.lstm_size=8",
    "MODEL.fc1_size=32",
    "MODEL.fc2_size=16",
    f"MODEL.num_classes={NUM_CLASSES}",
    "tag.topk=5",
    "resources.tsn_threads=1",
    "output.rows_per_file=2",
]


@pytest.fixture(scope="module")
def lstm_weights(tmp_path_factory):
    """A small AttentionLSTM (512-dim inputs, as ResNet-18 gives) in the official fluid-name format."""
    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    model = build_model(AttentionLSTMConfig(512, 16, 8, 32, 16, NUM_CLASSES), seed=7)
    state = model.state_dict()
    rng = np.random.default_rng(0)
    for key in ("output.bias", "fc1.bias"):  # spread the probabilities so that thresholds and ranks matter
        state[key].set_value(rng.normal(0, 1.5, state[key].shape).astype("float32"))
    path = tmp_path_factory.mktemp("lstm") / "attention_lstm.pdparams"
    W.save_state(model, fluid_name_map(model), path)
    return path


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    for name in CLIPS:
        shutil.copy(EXAMPLES / name, root / name)
    (root / "broken.mp4").write_bytes(b"\x00" * 1000)
    (root / "m.list").write_text("\n".join(str(root / n) for n in [*CLIPS, "broken.mp4"]) + "\n")
    names = [f"tag{i:02d}" for i in range(NUM_CLASSES - 1)] + ["tag00"]  # a repeated name, as in label_3396.txt
    (root / "labels.txt").write_text("\n".join(names) + "\n")
    return root


def config(library, *extra):
    return load_config(ROOT / "configs" / "tag.yaml", [*SMALL, f"tag.label_file={library / 'labels.txt'}", *extra])


def test_tagging_equals_extraction_then_predict(ray_cluster, library, lstm_weights, tmp_path):
    from vtplatform.predict import run_predict

    cfg = config(library)
    run_extract(cfg, str(library / "m.list"), str(tmp_path / "extract"))
    predict_cfg = load_config(
        ROOT / "configs" / "tag.yaml",
        [*SMALL, f"data.features={tmp_path / 'extract' / 'features'}", "INFER.batch_size=3"],
    )
    run_predict(
        predict_cfg,
        str(lstm_weights),
        str(tmp_path / "predict"),
        label_file=str(library / "labels.txt"),
        top_k=5,
        whole_table=True,
    )
    predicted = {r[S.VIDEO_ID]: r for r in pq.read_table(tmp_path / "predict" / "predictions").to_pylist()}

    top_probs = np.unique([p for r in predicted.values() for p in r[S.PROBS]])
    threshold = float(
        top_probs[len(top_probs) // 2 - 1 : len(top_probs) // 2 + 1].mean()
    )  # between two probs: splits the top-k
    cfg = config(library, f"tag.threshold={threshold}")
    summary = run_tag(cfg, str(library / "m.list"), str(tmp_path / "tags"), str(lstm_weights), formats=("json", "hub"))
    tags = {r[S.VIDEO_ID]: r for r in pq.read_table(tmp_path / "tags" / "tags").to_pylist()}
    assert set(tags) == set(predicted) == {derive_video_id(str(library / c)) for c in CLIPS}
    for vid, row in tags.items():
        assert row[S.CLASS_IDS] == predicted[vid][S.CLASS_IDS]
        np.testing.assert_allclose(row[S.PROBS], predicted[vid][S.PROBS], rtol=1e-6, atol=1e-7)
        assert row[S.CLASS_NAMES] == predicted[vid][S.CLASS_NAMES]
        assert len(row[S.CLASS_IDS]) == 5 and row[S.PROBS] == sorted(row[S.PROBS], reverse=True)
        above = [i for i, p in zip(row[S.CLASS_IDS], row[S.PROBS], strict=True) if p >= threshold]
        assert row[S.LABELS][: len(above)] == above  # labels: every class >= threshold, best first
        assert row[S.LABEL_NAMES] == [f"tag{i:02d}" if i < NUM_CLASSES - 1 else "tag00" for i in row[S.LABELS]]
    assert any(row[S.LABELS] for row in tags.values()) and any(len(row[S.LABELS]) < 5 for row in tags.values())

    dead = pq.read_table(tmp_path / "tags" / "dead_letters").to_pylist()
    assert [(d[S.STAGE], d[S.ERROR_TYPE]) for d in dead] == [("decode", "DecodeError")]
    assert summary.succeeded == 3 and summary.failed_total == 1 and "lstm" in summary.format()
    assert not (tmp_path / "tags" / "features").exists()  # no feature files in between

    vid = derive_video_id(str(library / CLIPS[0]))
    seed = json.loads((tmp_path / "tags" / "json" / f"{vid}.json").read_text())
    assert seed[0] == vid and seed[1]["class_id"] == tags[vid][S.CLASS_IDS][0]
    assert seed[1]["probability"] == pytest.approx(tags[vid][S.PROBS][0])
    hub = json.loads((tmp_path / "tags" / "hub_results.json").read_text())
    assert sorted(h["path"] for h in hub) == sorted(str(library / c) for c in CLIPS)
    for item in hub:
        row = next(r for r in tags.values() if r[S.URI] == item["path"])
        expected = {}
        for name, p in zip(row[S.CLASS_NAMES], row[S.PROBS], strict=True):
            if p >= 0.5:
                expected.setdefault(name, p)
        assert item["prediction"] == pytest.approx(expected)


def test_tag_job_resumes_and_refuses_other_weights(ray_cluster, library, lstm_weights, tmp_path):
    args = ["--config", "configs/tag.yaml", "--filelist", str(library / "m.list"), "--save_dir", str(tmp_path / "out")]
    args += [
        a for o in [*SMALL, f"tag.label_file={library / 'labels.txt'}", "tag.write_features=true"] for a in ("-o", o)
    ]
    env = {"RAY_ADDRESS": ray_cluster}
    res = run_job("tag.py", *args, "--lstm_weights", str(lstm_weights), env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "tagging summary" in res.stdout and "3 ok, 1 failed" in res.stdout
    features = pq.read_table(tmp_path / "out" / "features")
    assert features.num_rows == 3 and features.column(S.FEATURES).type.shape == [4, 512]

    again = run_job("tag.py", *args, "--lstm_weights", str(lstm_weights), env=env)
    assert again.returncode == 0 and "skipped (done before) 4" in again.stdout
    assert pq.read_table(tmp_path / "out" / "tags").num_rows == 3

    with pytest.raises(ConfigError, match="threshold"):
        run_tag(
            config(library, "tag.threshold=0.9", "tag.write_features=true"),
            str(library / "m.list"),
            str(tmp_path / "out"),
            str(lstm_weights),
        )
    missing = run_job("tag.py", *args, env=env)
    assert missing.returncode == 2 and "needs AttentionLSTM weights" in missing.stderr


def test_the_tsn_actors_memory_is_bounded_by_frames_not_by_rows(ray_cluster, tmp_path):
    """Eight segments per video and timeline chunks of one 8-s window (32 frames): rows hold 8 or 32
    crops, so a stage that gathered rows by count (videos_per_call(8) = 64 rows a call) would take
    a long video's whole timeline in one call once the decode has run ahead. Here it has: the
    video is decoded first, then its blocks go through the TSN actor in a real Ray Data pipeline.
    Measured, as the job summary reports it: the actor's own memory over the loaded model, and the
    most that one call added, on 2400 timeline frames (28 MB of 64x64 crops). A call may hold at
    most two blocks' worth (FRAMES_PER_BLOCK crops, 6 MB each) and its forward passes."""
    from tests.clips import write_clip
    from vtplatform import resources as R
    from vtplatform.config import StorageSection
    from vtplatform.pipeline import blocks_dataset
    from vtplatform.stages import tsn
    from vtplatform.stages.decode import FRAMES_PER_BLOCK, decode_options, decode_videos

    rng = np.random.default_rng(3)
    frames = (rng.integers(0, 255, (48, 64, 3), np.uint8) for _ in range(2400))
    write_clip(tmp_path / "long.mp4", frames, 64, 48, fps=4, options={"preset": "ultrafast", "crf": "30"})
    small = ["INFER.seg_num=8", "INFER.short_size=72", "INFER.target_size=64", "resources.tsn_frames_per_forward=8"]
    small += ["tag.segment_seconds=8", "tag.timeline_fps=4", "tag.timeline_chunk_frames=16"]
    cfg = load_config(ROOT / "configs" / "tag.yaml", [*SMALL, *small])
    video = pa.table({S.VIDEO_ID: ["long"], S.URI: [str(tmp_path / "long.mp4")]})
    blocks = list(decode_videos(video, decode_options(cfg, tagging=True), StorageSection()))
    plan = R.size_pipeline(cfg, [tsn.need(cfg)])
    spec = tsn.tsn_spec(cfg, None, plan.device, 1)
    ds = tsn.tsn_stage(blocks_dataset(blocks), cfg, spec, plan)
    out = pa.concat_tables(ds.iter_batches(batch_size=None, batch_format="pyarrow"))
    crop_mb = 64 * 64 * 3 / 2**20
    timeline = sum(S.split_rows(out)[S.CHUNK_ROWS].column(S.TIMELINE_FRAMES).to_pylist())
    grown, call = (max(out.column(c).to_pylist()) for c in (S.TSN_PEAK_MB, S.TSN_CALL_MB))
    bound = 2 * FRAMES_PER_BLOCK * crop_mb + 8  # two blocks of crops, and the forward passes of 8 frames
    print(f"TSN actor: +{grown:.1f} MB over the loaded model, +{call:.1f} MB at most in a call (bound {bound:.0f});"
          f" the timeline: {timeline} frames, {timeline * crop_mb:.0f} MB of crops, in {len(blocks)} blocks")  # fmt: skip
    assert timeline == 2400 and len(blocks) >= 4 and out.num_rows > 2400 // 32 - 5  # rows of 32 crops, about
    assert timeline * crop_mb > bound  # a call that held the timeline's crops would not fit
    assert grown > 0 and 0 <= call <= bound


def test_an_output_made_with_other_window_settings_is_refused(library):
    """Every setting that shapes the windows and their chunks (which the resume bookkeeping counts)
    is checked against an existing output, ``tag.timeline_chunk_frames`` included."""
    from vtplatform.outputs import check_signature
    from vtplatform.outputs.tags import TAGGER_KEYS
    from vtplatform.tag import segment_settings

    def check_same_tagger(existing, made, where):
        check_signature(existing, made, TAGGER_KEYS, where, "tags")

    made = config(library, "tag.segment_seconds=4", "tag.timeline_chunk_frames=64").tag
    existing = pa.schema([]).with_metadata({S.METADATA_KEY: json.dumps({"segments": segment_settings(made)})})
    check_same_tagger(existing, {"segments": segment_settings(made)}, "OUT")  # the same: accepted
    for change in ("tag.timeline_chunk_frames=32", "tag.timeline_fps=2", "tag.segment_stride_seconds=2"):
        other = config(library, "tag.segment_seconds=4", "tag.timeline_chunk_frames=64", change).tag
        with pytest.raises(ConfigError, match="segments"):
            check_same_tagger(existing, {"segments": segment_settings(other)}, "OUT")


def test_windows_of_many_lengths_in_one_call_tag_as_each_alone(lstm_weights):
    """The AttentionLSTM over a chunk's windows, padded to the longest in one call, gives each
    window what it gets alone; a video's own row in the same batch is tagged as before."""
    from vtplatform.config import StorageSection
    from vtplatform.models.attention_lstm import AttentionLSTMConfig
    from vtplatform.stages.lstm import ModelSpec, TagSpec, TagStage

    model = ModelSpec(AttentionLSTMConfig(512, 16, 8, 32, 16, NUM_CLASSES), str(lstm_weights), StorageSection())
    stage = TagStage(TagSpec(model, 5, 0.5, "float16", 4, 512, keep_features=False))
    rng = np.random.default_rng(0)
    chunks = [rng.normal(0, 1, (n, 512)).astype(np.float16) for n in (9, 4)]
    video = rng.normal(0, 1, (4, 512)).astype(np.float16)
    bounds = [[(0, 1), (1, 7), (3, 9)], [(0, 4), (2, 3)]]  # overlapping windows of 1 to 6 frames
    batch = pa.table(
        {
            S.VIDEO_ID: ["v", "c", "c"],
            S.FEATURES: pa.array([video.tobytes(), *(c.tobytes() for c in chunks)], pa.large_binary()),
            S.CHUNK: pa.array([None, 0, 1], pa.int32()),
            S.ROW_KIND: [S.VIDEO_ROWS, S.CHUNK_ROWS, S.CHUNK_ROWS],
            S.WIN_LO: [None, *([lo for lo, _ in b] for b in bounds)],
            S.WIN_HI: [None, *([hi for _, hi in b] for b in bounds)],
        }
    )
    out = stage(batch).to_pylist()

    def alone(x):
        return stage.tags(x[None].astype(np.float32), np.array([len(x)]))[0]

    ids, probs, labels, _ = alone(video)
    assert (out[0][S.CLASS_IDS], out[0][S.LABELS]) == (ids, labels)
    assert out[0][S.PROBS] == pytest.approx(probs, abs=1e-6) and out[0][S.WIN_PROBS] is None
    for row, chunk, b in zip(out[1:], chunks, bounds, strict=True):
        assert row[S.CLASS_IDS] is None and len(row[S.WIN_CLASS_IDS]) == len(b)
        for j, (lo, hi) in enumerate(b):
            ids, probs, labels, label_probs = alone(chunk[lo:hi])
            assert row[S.WIN_CLASS_IDS][j] == ids and row[S.WIN_LABELS][j] == labels
            assert row[S.WIN_PROBS][j] == pytest.approx(probs, abs=1e-6)
            assert row[S.WIN_LABEL_PROBS][j] == pytest.approx(label_probs, abs=1e-6)
    assert len({tuple(p) for row in out[1:] for p in row[S.WIN_PROBS]}) == 5  # the windows differ


# --- tagging from the stores (jobs/tag.py --features/--timeline): a new AttentionLSTM re-tags a
# library from its feature and timeline tables, with the videos moved away, and gets what tagging
# the videos with that model gets: video tags and window probabilities within 1e-5, spans exactly.

WINDOWS = ["tag.segment_seconds=2", "tag.timeline_fps=2", "tag.timeline_chunk_frames=4", "tag.threshold=0.4"]


@pytest.fixture(scope="module")
def other_weights(tmp_path_factory):
    """A second AttentionLSTM of the same shape: the 'new champion' that re-tags the library."""
    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    model = build_model(AttentionLSTMConfig(512, 16, 8, 32, 16, NUM_CLASSES), seed=11)
    state = model.state_dict()
    rng = np.random.default_rng(5)
    for key in ("output.bias", "fc1.bias"):
        state[key].set_value(rng.normal(0, 1.5, state[key].shape).astype("float32"))
    path = tmp_path_factory.mktemp("lstm_b") / "attention_lstm.pdparams"
    W.save_state(model, fluid_name_map(model), path)
    return path


@pytest.fixture(scope="module")
def stores(ray_cluster, library, lstm_weights, tmp_path_factory):
    """A library tagged by model A from its videos, keeping the feature table and the timeline."""
    out = tmp_path_factory.mktemp("stores")
    cfg = config(library, *WINDOWS, "tag.write_features=true", "tag.write_timeline=true")
    summary = run_tag(cfg, str(library / "m.list"), str(out), str(lstm_weights))
    assert summary.succeeded == len(CLIPS) and summary.failed_total == 1, summary.format()
    return out


def _segments(folder):
    table = pq.read_table(folder / S.SEGMENTS_DIR).select(
        [S.VIDEO_ID, S.WINDOW, S.START_S, S.END_S, S.CLASS_IDS, S.PROBS, S.LABELS]
    )
    return {(r[S.VIDEO_ID], r[S.WINDOW]): r for r in table.to_pylist()}


def _spans(folder):
    rows = pq.read_table(folder / S.SPANS_DIR).to_pylist()
    return sorted((r[S.VIDEO_ID], r[S.CLASS_ID], r[S.START_S], r[S.END_S]) for r in rows)


def test_a_new_model_tags_the_stores_as_it_tags_the_videos(ray_cluster, library, other_weights, stores, tmp_path):
    moved = tmp_path / "moved"  # no video may be opened: they are gone while the stores are tagged
    moved.mkdir()
    for name in CLIPS:
        shutil.move(library / name, moved / name)
    try:
        args = ["--config", "configs/tag.yaml", "--features", str(stores / S.FEATURES_DIR), "--timeline",
                str(stores / S.TIMELINE_DIR), "--segments", "2", "--save_dir", str(tmp_path / "from_stores"),
                "--lstm_weights", str(other_weights)]  # fmt: skip
        overrides = [*SMALL, f"tag.label_file={library / 'labels.txt'}", *WINDOWS[1:]]
        res = run_job("tag.py", *args, *[a for o in overrides for a in ("-o", o)], env={"RAY_ADDRESS": ray_cluster})
        assert res.returncode == 0, res.stderr[-3000:]
        assert (
            f"processed now         {len(CLIPS)} ok, 0 failed" in res.stdout
            and "decode" not in res.stdout.split("stage")[1]
        )
    finally:
        for name in CLIPS:
            shutil.move(moved / name, library / name)
    from_videos = tmp_path / "from_videos"
    summary = run_tag(config(library, *WINDOWS), str(library / "m.list"), str(from_videos), str(other_weights))
    assert summary.succeeded == len(CLIPS)

    a, b = (pq.read_table(f / S.TAGS_DIR).sort_by(S.VIDEO_ID) for f in (tmp_path / "from_stores", from_videos))
    assert a.column(S.VIDEO_ID).equals(b.column(S.VIDEO_ID)) and a.num_rows == len(CLIPS)
    assert a.column(S.CLASS_IDS).to_pylist() == b.column(S.CLASS_IDS).to_pylist()
    np.testing.assert_allclose(
        np.array(a.column(S.PROBS).to_pylist()), np.array(b.column(S.PROBS).to_pylist()), atol=1e-5
    )
    assert (
        json.loads(a.schema.metadata[S.METADATA_KEY])["lstm_weights"]
        == json.loads(b.schema.metadata[S.METADATA_KEY])["lstm_weights"]
    )

    sa, sb = _segments(tmp_path / "from_stores"), _segments(from_videos)
    assert sa.keys() == sb.keys() and len(sa) >= 6  # every window of every video, once
    for key, row in sa.items():
        other = sb[key]
        assert (row[S.START_S], row[S.END_S], row[S.CLASS_IDS]) == (
            other[S.START_S],
            other[S.END_S],
            other[S.CLASS_IDS],
        )
        np.testing.assert_allclose(row[S.PROBS], other[S.PROBS], atol=1e-5)
    spans = _spans(tmp_path / "from_stores")
    assert spans == _spans(from_videos) and spans  # exactly, and there are some


def test_the_stores_serve_only_what_they_hold(ray_cluster, library, lstm_weights, stores, tmp_path):
    """A timeline at another rate, windows shorter than its frame interval, windows without a timeline,
    a feature table from another extractor: refused in the driver, before any row is read."""
    features, timeline = str(stores / S.FEATURES_DIR), str(stores / S.TIMELINE_DIR)
    with pytest.raises(ConfigError, match=r"holds TSN features at 2 frames/s, tag\.timeline_fps is 1"):
        run_tag_stores(
            config(library, "tag.segment_seconds=2"), str(tmp_path / "a"), str(lstm_weights), features, timeline
        )
    with pytest.raises(ConfigError, match=r"windows of 0\.25 s need frames"):
        cfg = config(library, "tag.segment_seconds=0.25", "tag.timeline_fps=2")
        run_tag_stores(cfg, str(tmp_path / "b"), str(lstm_weights), features, timeline)
    with pytest.raises(ConfigError, match="windows need the timeline table"):
        run_tag_stores(config(library, "tag.segment_seconds=2"), str(tmp_path / "c"), str(lstm_weights), features)
    other = tmp_path / "other"  # the same table, said to come from a ResNet-50 extractor
    other.mkdir()
    for part in (stores / S.FEATURES_DIR).glob("*.parquet"):
        table = pq.read_table(part)
        made = S.read_provenance(table.schema) | {"model": {"name": "TSN", "depth": 50, "feature_dim": 512}}
        pq.write_table(table.replace_schema_metadata({S.METADATA_KEY: json.dumps(made)}), other / part.name)
    with pytest.raises(ConfigError, match="made differently from the features the model was trained on"):
        from vtplatform.models import weights as W

        meta_model = tmp_path / "ckpt"  # a checkpoint that records the features it was trained on
        meta_model.mkdir()
        shutil.copy(lstm_weights, meta_model / "model.pdparams")
        trained_on = S.read_provenance(pq.read_schema(next((stores / S.FEATURES_DIR).glob("*.parquet"))))
        meta = W.CheckpointMeta("AttentionLSTM", {"feature_dim": 512, "embedding_size": 16, "lstm_size": 8, "fc1_size": 32,
                                "fc2_size": 16, "num_classes": NUM_CLASSES, "drop_rate": 0.5}, NUM_CLASSES, features=trained_on)  # fmt: skip
        (meta_model / "meta.json").write_text(json.dumps(meta.to_dict()))
        run_tag_stores(config(library), str(tmp_path / "d"), str(meta_model), str(other))


def test_feature_rows_that_cannot_be_used_are_dead_letters_and_a_rerun_resumes(
    ray_cluster, library, lstm_weights, stores, tmp_path
):
    """A part of the feature table made by another extractor: its videos become dead letters, the
    others are tagged; a rerun tags nothing again; tags from the stores equal the stored run's tags."""
    table = tmp_path / "features"
    table.mkdir()
    stored = pq.read_table(stores / S.FEATURES_DIR)
    pq.write_table(stored.slice(0, 2), table / "part-a.parquet")  # the table's first part says how it was made
    bad = stored.slice(2)
    made = S.read_provenance(stored.schema) | {"weights": "someone-else"}
    pq.write_table(bad.replace_schema_metadata({S.METADATA_KEY: json.dumps(made)}), table / "part-b.parquet")
    cfg = config(library)
    first = run_tag_stores(cfg, str(tmp_path / "out"), str(lstm_weights), features=str(table))
    assert first.succeeded == len(CLIPS) - bad.num_rows and first.failed == {"read/OtherExtractor": bad.num_rows}
    dead = pq.read_table(tmp_path / "out" / S.DEAD_LETTERS_DIR)
    assert sorted(dead.column(S.VIDEO_ID).to_pylist()) == sorted(bad.column(S.VIDEO_ID).to_pylist())
    assert "weights" in dead.column(S.MESSAGE)[0].as_py()
    again = run_tag_stores(cfg, str(tmp_path / "out"), str(lstm_weights), features=str(table))
    assert again.submitted == 0 and again.skipped == len(CLIPS)
    ours = pq.read_table(tmp_path / "out" / S.TAGS_DIR).sort_by(S.VIDEO_ID)
    theirs = pq.read_table(stores / S.TAGS_DIR)
    theirs = theirs.filter(pc.is_in(theirs.column(S.VIDEO_ID), value_set=ours.column(S.VIDEO_ID))).sort_by(S.VIDEO_ID)
    assert ours.column(S.CLASS_IDS).to_pylist() == theirs.column(S.CLASS_IDS).to_pylist()
    np.testing.assert_allclose(
        np.array(ours.column(S.PROBS).to_pylist()), np.array(theirs.column(S.PROBS).to_pylist()), atol=1e-5
    )
