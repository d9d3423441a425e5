"""jobs/train.py, jobs/eval.py and jobs/predict.py run as a user runs them, on a real local Ray,
with checkpoints on the moto S3 server, and checked against computations done here in-process."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from tests.conftest import FAKE_SECRET, SEED, run_job
from tests.synthetic_features import make_videos, provenance, write_feature_table, write_list, write_npy_files
from tests.train.run_files import scalar_tags
from vtplatform import schema as S
from vtplatform.config import StorageSection
from vtplatform.eval.youtube8m import compute_metrics
from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, load_state
from vtplatform.models.weights import read_weights

CLASSES, DIM, SEG = 4, 10, 6
DIMS = [
    "MODEL.embedding_size=8",
    "MODEL.lstm_size=8",
    "MODEL.fc1_size=16",
    "MODEL.fc2_size=8",
    f"MODEL.num_classes={CLASSES}",
]
NAMES = ["跑步", "唱歌", "跑步", "cat"]  # names repeat, as in label_3396.txt: ids are the keys


def _o(*items: str) -> list[str]:
    return [arg for item in items for arg in ("-o", item)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("lstm_jobs")
    ids, feats, labels = make_videos(30, SEG, DIM, CLASSES, seed=11)
    table = write_feature_table(root, ids, feats, rows_per_file=7)
    write_list(root / "train.list", [f"{v}.npy" for v in ids[:20]], labels[:20])
    write_list(root / "val.list", [f"{v}.npy" for v in ids[20:25]], labels[20:25])
    write_list(root / "test.list", [f"{v}.npy" for v in ids[25:]], labels[25:])
    (root / "labels.txt").write_text("\n".join(NAMES) + "\n", encoding="utf-8")
    return {"root": root, "table": table, "ids": ids, "feats": feats, "labels": labels}


def _s3(endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=endpoint.split("://")[1], scheme="http", region="us-east-1")


def _probs(state: dict, meta: dict, feats: np.ndarray) -> np.ndarray:
    model = build_model(AttentionLSTMConfig(**meta["model"]))
    model.eval()
    load_state(model, state)
    import paddle

    x = feats.astype(np.float16).astype(np.float32)  # the table stores float16
    with paddle.no_grad():
        logits = model(paddle.to_tensor(x), paddle.to_tensor(np.full(len(x), x.shape[1]))).numpy().astype(np.float64)
    return 1 / (1 + np.exp(-logits))


def test_train_eval_predict_with_checkpoints_on_s3(ray_cluster, moto_endpoint, s3_bucket, data, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster}
    root = data["root"]
    common = ["--model_name=AttentionLSTM", "--config", "configs/attention_lstm.yaml", "--features", str(data["table"])]
    common += _o(*DIMS, f"storage.endpoint_url={moto_endpoint}", "resources.use_gpu=false", "resources.train_cpus=0.5")
    save = f"s3://{s3_bucket}/runs"
    res = run_job(
        "train.py", *common, "--save_dir", save, "--label_file", str(root / "labels.txt"),
        *_o(f"TRAIN.filelist={root / 'train.list'}", f"VALID.filelist={root / 'val.list'}", "TRAIN.batch_size=4",
            "VALID.batch_size=4", "TRAIN.epoch=2", "TRAIN.learning_rate=0.01", "resources.train_workers=2",
            "train_run.checkpoint_every_steps=2", "train_run.keep_checkpoints=2", "train_run.log_interval=1"),
        env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "training summary" in res.stdout and "2 (10 steps)" in res.stdout  # 20 videos / 2 workers / 2 per worker
    assert "Epoch 1, iter 4/5 , loss =" in res.stderr  # the seed's progress lines
    assert FAKE_SECRET not in res.stdout + res.stderr

    fs = _s3(moto_endpoint)
    run = f"{s3_bucket}/runs/AttentionLSTM"
    entries = {i.base_name: i for i in fs.get_file_info(pafs.FileSelector(run))}
    checkpoints = sorted(n for n in entries if n.startswith("epoch_"))
    assert checkpoints == ["epoch_001_step_0000003", "epoch_002_step_0000000"]  # every 2 steps of the run; the last two
    history = json.loads(fs.open_input_stream(f"{run}/history.json").read())
    assert [h["epoch"] for h in history] == [0, 1] and all("valid_gap" in h for h in history)
    best_meta = json.loads(fs.open_input_stream(f"{run}/best/meta.json").read())
    gaps = [h["valid_gap"] for h in history]
    assert best_meta["best"] == max(gaps) and best_meta["epoch"] == int(np.argmax(gaps)) + 1
    assert best_meta["label_fingerprint"] and best_meta["features"]["model"]["depth"] == 18
    assert fs.open_input_stream(f"{run}/curves.png").read(8) == b"\x89PNG\r\n\x1a\n"
    events = [n for n in fs.get_file_info(pafs.FileSelector(f"{run}/tensorboard")) if "tfevents" in n.base_name]
    tags = set().union(*(scalar_tags(fs.open_input_stream(e.path).read()) for e in events))
    assert {"train/loss", "epoch/train_loss", "epoch/valid_gap"} <= tags

    # Evaluation of the run folder picks best/; its report equals the metrics computed here.
    res = run_job(
        "eval.py",
        *common,
        "--weights",
        f"{save}/AttentionLSTM",
        "--filelist",
        str(root / "test.list"),
        "--save_dir",
        str(tmp_path / "eval"),
        env=env,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["weights"].endswith("/AttentionLSTM/best") and report["num_videos"] == 5
    assert "\tavg_hit_at_one: " in res.stderr and "\tgap:" in res.stderr  # the seed's log line
    best = read_weights(f"{save}/AttentionLSTM/best", StorageSection(endpoint_url=moto_endpoint))
    probs = _probs(best.state, best.meta, data["feats"][25:])
    targets = np.zeros((5, CLASSES), np.uint8)
    for i, labs in enumerate(data["labels"][25:]):
        targets[i, labs] = 1
    expected = compute_metrics(probs, targets, 20)
    for key in ("gap", "hit_at_one", "perr", "map"):
        assert report[key] == pytest.approx(expected[key], abs=1e-6), key

    # Prediction over the whole table: top-k ids and names, the table and the seed's JSON.
    res = run_job(
        "predict.py", *common, "--weights", f"{save}/AttentionLSTM/best", "--label_file", str(root / "labels.txt"),
        "--save_dir", str(tmp_path / "pred"), "--seed_json", "--infer_topk", "3", env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    table = pq.read_table(tmp_path / "pred" / "predictions")
    assert table.schema.remove_metadata() == S.PREDICTION_SCHEMA
    assert sorted(table.column(S.VIDEO_ID).to_pylist()) == sorted(data["ids"])
    all_probs = _probs(best.state, best.meta, data["feats"])
    for row in table.to_pylist():
        i = data["ids"].index(row[S.VIDEO_ID])
        top = np.argsort(-all_probs[i], kind="stable")[:3]
        assert row[S.CLASS_IDS] == top.tolist()
        assert row[S.CLASS_NAMES] == [NAMES[c] for c in top]
        np.testing.assert_allclose(row[S.PROBS], all_probs[i, top], atol=1e-5)
        assert row[S.URI] == f"/videos/{row[S.VIDEO_ID]}.mp4"
    seed_json = json.loads((tmp_path / "pred" / "json" / "result0.json").read_text(encoding="utf-8"))
    assert seed_json[0] in data["ids"] and len(seed_json) == 4
    assert set(seed_json[1]) == {"class_id", "class_name", "probability"}  # not the original's "'class_id"


def test_seed_configs_and_npy_lists_as_they_are(ray_cluster, data, tmp_path):
    """The seed's single-GPU config and its list-file layout of .npy features (lines ending in a
    space, sequences of different lengths), then prediction over the seed's infer list."""
    env = {"RAY_ADDRESS": ray_cluster}
    root = tmp_path
    paths = write_npy_files(
        root / "tsn_features", data["ids"][:12], data["feats"][:12], lengths=[SEG - i % 3 for i in range(12)]
    )
    write_list(root / "train.list", [str(p) for p in paths[:10]], data["labels"][:10])
    write_list(root / "infer.list", [str(p) for p in paths[10:]], None)
    config = str(SEED / "configs" / "attention_lstm-single.yaml")  # num_gpus 1 -> one worker; CPU here
    small = _o(
        *DIMS,
        f"MODEL.feature_dims=[{DIM}]",
        "TRAIN.batch_size=5",
        "TRAIN.epoch=1",
        f"TRAIN.filelist={root / 'train.list'}",
        "VALID.filelist=None",
        "resources.train_cpus=0.5",
    )
    res = run_job(
        "train.py", "--model_name=AttentionLSTM", "--config", config, "--save_dir", str(root / "ckpt"), *small, env=env
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run = root / "ckpt" / "AttentionLSTM"
    assert (run / "epoch_001_step_0000000" / "model.pdparams").exists()
    assert not (run / "best").exists()  # no validation set

    infer = _o(*DIMS, f"MODEL.feature_dims=[{DIM}]", f"INFER.filelist={root / 'infer.list'}")
    res = run_job(
        "predict.py", "--model_name=AttentionLSTM", "--config", config, "--weights", str(run),
        "--save_dir", str(root / "pred"), "--seed_json", *infer, env=env,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    seed_json = json.loads((root / "pred" / "json" / "result0.json").read_text())
    assert seed_json[0] in data["ids"][10:12] and seed_json[1]["class_name"] is None  # no --label_file
    assert len(seed_json) == 1 + CLASSES  # MODEL.topk 20 of 4 classes


@pytest.mark.slow
def test_fine_tune_job_to_a_label_set_of_another_size(ray_cluster, data, tmp_path):
    """--pretrain with 4 output classes into a 6-class model: every layer loads except the output
    layer, which is re-initialised, and the job says so."""
    from vtplatform.models.attention_lstm import build_model, fluid_name_map
    from vtplatform.models.weights import save_state

    pretrained = build_model(AttentionLSTMConfig(DIM, 8, 8, 16, 8, CLASSES))
    save_state(pretrained, fluid_name_map(), tmp_path / "pretrained.pdparams")
    paths = write_npy_files(tmp_path / "tsn_features", data["ids"][:10], data["feats"][:10])
    write_list(tmp_path / "train.list", [str(p) for p in paths], data["labels"][:10])
    res = run_job(
        "train.py", "--config", str(SEED / "configs" / "attention_lstm-single.yaml"),
        "--save_dir", str(tmp_path / "ckpt"), "--pretrain", str(tmp_path / "pretrained.pdparams"),
        *_o(*DIMS, "MODEL.num_classes=6", f"MODEL.feature_dims=[{DIM}]", "TRAIN.batch_size=5", "TRAIN.epoch=1",
            f"TRAIN.filelist={tmp_path / 'train.list'}", "VALID.filelist=None", "resources.train_cpus=0.5"),
        env={"RAY_ADDRESS": ray_cluster},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    assert "re-initialised" in res.stderr and "4 output classes, the model 6" in res.stderr
    trained = read_weights(str(tmp_path / "ckpt" / "AttentionLSTM"), StorageSection())
    assert trained.state["output.w_0"].shape == (8, 6) and trained.meta["model"]["num_classes"] == 6


def test_job_errors_exit_2_with_one_clear_line(ray_cluster, data, tmp_path):
    env = {"RAY_ADDRESS": ray_cluster}
    base = ["--config", "configs/attention_lstm.yaml", "--features", str(data["table"]), *_o(*DIMS)]
    res = run_job("train.py", "--model_name=TSN", *base, "--save_dir", str(tmp_path), env=env)
    assert res.returncode == 2 and "MODEL.name is AttentionLSTM" in res.stderr
    bad = write_list(tmp_path / "bad.list", ["vid0000.npy", "vid0001.npy", "nope.npy"], [[0], [CLASSES + 1], [1]])
    res = run_job("train.py", *base, "--save_dir", str(tmp_path), *_o(f"TRAIN.filelist={bad}"), env=env)
    assert res.returncode == 2
    assert (
        "label_out_of_range" in res.stderr
        and "nope: not in the feature table" in res.stderr
        and "on_bad_row=skip" in res.stderr
    )
    res = run_job(
        "eval.py",
        *base,
        "--weights",
        str(tmp_path / "missing"),
        *_o(f"TEST.filelist={bad}", "data.on_bad_row=skip"),
        env=env,
    )
    assert res.returncode == 2 and "weights not found" in res.stderr


def test_eval_and_predict_refuse_features_from_another_extractor(ray_cluster, data, tmp_path):
    """A checkpoint trained on ResNet-50 features meets a table of ResNet-18 features (same size):
    both jobs stop with exit code 2 and say what differs; data.check_provenance=false overrides."""
    import dataclasses

    from vtplatform.models.attention_lstm import fluid_name_map
    from vtplatform.train import checkpoint

    model_config = AttentionLSTMConfig(DIM, 8, 8, 16, 8, CLASSES)
    trained_on = provenance(DIM, depth=50)
    assert provenance(DIM)["model"]["depth"] == 18  # what the table was made with (write_feature_table)
    ckpt = tmp_path / "ckpt" / "epoch_001_step_0000000"
    meta = {"model_name": "AttentionLSTM", "model": dataclasses.asdict(model_config), "features": trained_on}
    checkpoint.save(ckpt, model=build_model(model_config), optimizer=None, name_map=fluid_name_map(), meta=meta)
    env = {"RAY_ADDRESS": ray_cluster}
    common = ["--model_name=AttentionLSTM", "--config", "configs/attention_lstm.yaml", "--features", str(data["table"])]
    common += ["--weights", str(ckpt), *_o(*DIMS, "resources.use_gpu=false", "resources.train_cpus=0.5")]
    evaluate = ["eval.py", *common, "--filelist", str(data["root"] / "test.list"), "--save_dir", str(tmp_path / "e")]
    for args in (evaluate, ["predict.py", *common, "--save_dir", str(tmp_path / "pred")]):
        res = run_job(*args, env=env)
        assert res.returncode == 2, (args[0], res.stderr[-3000:])
        assert "made differently from the features the model was trained on" in res.stderr, res.stderr[-3000:]
        assert "'depth': 50" in res.stderr and "'depth': 18" in res.stderr  # the difference, named
        assert "data.check_provenance=false" in res.stderr
        assert not (tmp_path / "e" / "report.json").exists() and not (tmp_path / "pred" / "predictions").exists()
    res = run_job(*evaluate, *_o("data.check_provenance=false"), env=env)
    assert res.returncode == 0, res.stderr[-3000:]  # the checkpoint itself is fine: only the features differ
    assert json.loads((tmp_path / "e" / "report.json").read_text())["num_videos"] == 5


@pytest.mark.slow
def test_trains_from_a_table_that_extraction_wrote(ray_cluster, tmp_path):
    """Real clips -> run_extract (ResNet-18, 4 segments: 512-dim features) -> fine-tune -> eval
    -> predict; the model's feature size comes from the table."""
    import shutil

    from tests.conftest import EXAMPLES, ROOT
    from vtplatform.config import load_config
    from vtplatform.eval.lstm import run_eval
    from vtplatform.extract import run_extract
    from vtplatform.predict import run_predict
    from vtplatform.train.lstm import run_train

    clips = ["mmaction2_demo.mp4", "paddlevideo_example.avi", "mmaction2_test.mp4"]
    for name in clips:
        shutil.copy(EXAMPLES / name, tmp_path / name)
    (tmp_path / "videos.list").write_text("\n".join(str(tmp_path / n) for n in clips) + "\n")
    tsn = load_config(
        ROOT / "configs" / "tsn.yaml",
        ["MODEL.num_layers=18", "INFER.seg_num=4", "resources.tsn_threads=1"],
    )
    extracted = run_extract(tsn, str(tmp_path / "videos.list"), str(tmp_path / "out"))
    assert extracted.succeeded == 3
    labels = write_list(
        tmp_path / "labels.list", [str(tmp_path / n) for n in clips], [[0, 2], [1], [2]]
    )  # keyed by uri
    config = load_config(
        ROOT / "configs" / "attention_lstm.yaml",
        [
            *DIMS[:-1],
            "MODEL.num_classes=3",
            f"data.features={tmp_path / 'out' / 'features'}",
            f"TRAIN.filelist={labels}",
            f"VALID.filelist={labels}",
            "TRAIN.batch_size=1",
            "VALID.batch_size=3",
            "TRAIN.epoch=2",
            "resources.train_workers=1",
            "resources.train_cpus=0.5",
            "resources.use_gpu=false",
        ],
    )
    summary = run_train(config, str(tmp_path / "ckpt"))
    assert summary.epochs_finished == 2 and summary.train_videos == 3 and summary.best_valid_gap is not None
    trained = read_weights(str(tmp_path / "ckpt" / "AttentionLSTM"), StorageSection())
    assert trained.meta["model"]["feature_dim"] == 512 and trained.state["rgb_fc.w_0"].shape == (512, 8)
    assert trained.meta["features"]["model"]["depth"] == 18
    report = run_eval(config, str(tmp_path / "ckpt" / "AttentionLSTM"), str(tmp_path / "eval"), filelist=str(labels))
    assert report["num_videos"] == 3 and report["gap"] == pytest.approx(trained.meta["best"])  # same videos as valid
    predicted = run_predict(config, str(tmp_path / "ckpt" / "AttentionLSTM"), str(tmp_path / "pred"), whole_table=True)
    assert predicted.videos == 3
