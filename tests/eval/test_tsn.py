"""The TSN classifier stage (Paddle Inference on CPU) and weight loading for eval/predict, without Ray."""

import json

import numpy as np
import paddle
import pyarrow as pa
import pytest

from tests.clips import write_indexed_clip
from tests.conftest import SEED
from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection, load_config
from vtplatform.models import tsn_classifier as tc
from vtplatform.stages.classifier import ClassifierSpec, ClassifierStage, read_weights
from vtplatform.train import checkpoint
from vtplatform.tsn_data import clip_frames, clip_spec, load_clips


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tc.build(tc.TSNClassifierConfig(depth=18, num_classes=3), seed=2)
    model.eval()
    folder = tmp_path_factory.mktemp("ckpt") / "epoch_001_step_0000000"
    checkpoint.save(
        folder, model=model, optimizer=None, name_map=tc.name_map(model), meta={"model_name": "TSN", "epoch": 1}
    )
    return model, folder


def test_classifier_stage_gives_top_k_and_label_probabilities(saved, tmp_path):
    model, folder = saved
    clip = write_indexed_clip(tmp_path / "clip.mp4", 40)
    config = load_config(SEED / "configs" / "tsn.yaml", ["TEST.short_size=64", "TEST.target_size=56"])
    rows = [
        {S.VIDEO_ID: "a", S.URI: str(clip), S.LABEL: 2, S.NUM_FRAMES: -1, S.EPOCH: 0},
        {S.VIDEO_ID: "b", S.URI: str(tmp_path / "missing.mp4"), S.LABEL: 1, S.NUM_FRAMES: -1, S.EPOCH: 0},
    ]
    plan = pa.Table.from_pylist(
        [r | {S.SHARD: None, S.FIRST_ROW_GROUP: -1, S.POOL_SIZE: -1, S.HEIGHT: -1, S.WIDTH: -1} for r in rows],
        schema=S.SAMPLE_SCHEMA,
    )
    clips = load_clips(plan, clip_spec(config, "test", 0))
    spec = ClassifierSpec(
        tc.TSNClassifierConfig(18, 3, config.model.image_mean, config.model.image_std), str(folder), "cpu", 1, 5, 7, 56
    )
    out = ClassifierStage(spec, StorageSection())(clips)
    assert out.column(S.ERROR_TYPE).to_pylist() == [None, "FileNotFoundError"]
    with paddle.no_grad():
        probs = paddle.nn.functional.softmax(
            model(paddle.to_tensor(clip_frames(clips.slice(0, 1), 7, 56))), -1
        ).numpy()[0]
    ids, top = out.column(S.CLASS_IDS)[0].as_py(), out.column(S.PROBS)[0].as_py()
    assert ids == np.argsort(-probs, kind="stable").tolist()  # 3 classes: top-5 is all of them
    np.testing.assert_allclose(top, probs[ids], atol=1e-5)
    assert out.column(S.LABEL_PROB)[0].as_py() == pytest.approx(float(probs[2]), abs=1e-5)
    assert out.column(S.CLASS_IDS)[1].as_py() is None


def _plan(clip, labels: list[int]) -> pa.Table:
    """One row per label, all of the same clip (so they share one set of probabilities)."""
    rows = [
        {S.VIDEO_ID: f"v{i}", S.URI: str(clip), S.LABEL: label, S.NUM_FRAMES: -1, S.EPOCH: 0}
        | {S.SHARD: None, S.FIRST_ROW_GROUP: -1, S.POOL_SIZE: -1, S.HEIGHT: -1, S.WIDTH: -1}
        for i, label in enumerate(labels)
    ]
    return pa.Table.from_pylist(rows, schema=S.SAMPLE_SCHEMA)


def test_top5_over_eight_classes_from_the_stage_against_brute_force(tmp_path):
    """TOP1 < TOP5 < 1: labels at ranks 0, 2, 4 and 7 of the model's 8 classes."""
    from vtplatform.eval.classification import evaluate

    model = tc.build(tc.TSNClassifierConfig(depth=18, num_classes=8), seed=4)
    model.eval()
    folder = tmp_path / "ckpt" / "epoch_001_step_0000000"
    checkpoint.save(folder, model=model, optimizer=None, name_map=tc.name_map(model), meta={"model_name": "TSN"})
    clip = write_indexed_clip(tmp_path / "clip.mp4", 40)
    config = load_config(SEED / "configs" / "tsn.yaml", ["TEST.short_size=64", "TEST.target_size=56"])
    probe = load_clips(_plan(clip, [0]), clip_spec(config, "test", 0))
    with paddle.no_grad():
        probs = paddle.nn.functional.softmax(model(paddle.to_tensor(clip_frames(probe, 7, 56))), -1).numpy()[0]
    ranked = sorted(range(8), key=lambda c: -probs[c])
    gaps = -np.diff(np.sort(probs)[::-1])
    assert min(gaps[0], gaps[4]) > 1e-4, gaps  # clear top-1 and top-5 boundaries: the engine agrees on them
    labels = [ranked[r] for r in (0, 2, 4, 7)]
    spec = ClassifierSpec(
        tc.TSNClassifierConfig(18, 8, config.model.image_mean, config.model.image_std), str(folder), "cpu", 1, 5, 7, 56
    )
    out = ClassifierStage(spec, StorageSection())(load_clips(_plan(clip, labels), clip_spec(config, "test", 0)))
    assert all(len(ids) == 5 for ids in out.column(S.CLASS_IDS).to_pylist())
    report = evaluate(np.array(out.column(S.CLASS_IDS).to_pylist()), np.array(labels), 8)
    brute = [[int(label in ranked[:k]) for label in labels] for k in (1, 5)]  # the label among the k best
    assert report["TOP1_ACC"] == pytest.approx(np.mean(brute[0])) == 0.25
    assert report["TOP5_ACC"] == pytest.approx(np.mean(brute[1])) == 0.75


def test_weights_from_a_run_a_checkpoint_or_a_file_and_never_another_model(saved, tmp_path):
    model, folder = saved
    state = read_weights(str(folder.parent), StorageSection())  # a run folder: its latest checkpoint
    np.testing.assert_array_equal(state["fc_0.w_0"], model.fc.weight.numpy())
    assert read_weights(str(folder / "model.pdparams"), StorageSection()).keys() == state.keys()
    other = tmp_path / "lstm"
    other.mkdir()
    (other / "model.pdparams").write_bytes((folder / "model.pdparams").read_bytes())
    lstm_dims = {"feature_dim": 8, "embedding_size": 4, "lstm_size": 4, "fc1_size": 4, "fc2_size": 4, "num_classes": 3}
    for meta in (
        {"model_name": "AttentionLSTM", "model": lstm_dims},
        {"model": lstm_dims},
    ):  # as written now, and by older versions
        (other / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(ConfigError, match="is an AttentionLSTM checkpoint, not a TSN one"):
            read_weights(str(other), StorageSection())
    with pytest.raises(ConfigError, match="not found"):
        read_weights(str(tmp_path / "nothing"), StorageSection())
    from vtplatform.stages.lstm import resolve_model  # and the other way round

    lstm_config = load_config(SEED / "configs" / "attention_lstm.yaml")
    with pytest.raises(ConfigError, match="is a TSN checkpoint, not an AttentionLSTM one"):
        resolve_model(lstm_config, str(folder), 1024)
