import pytest

from tests.conftest import ROOT, SEED
from vtplatform.config import Config, ConfigError, load_config, parse_override


@pytest.mark.parametrize("name", ["tsn.yaml", "tsn-single.yaml", "attention_lstm.yaml", "attention_lstm-single.yaml"])
def test_seed_configs_load_unchanged(name):
    config = load_config(SEED / "configs" / name)
    if name.startswith("tsn"):
        assert config.model.name == "TSN" and config.model.num_layers == 101
        assert (config.train.seg_num, config.valid.seg_num, config.test.seg_num, config.infer.seg_num) == (3, 3, 7, 300)
        assert config.train.l2_weight_decay == pytest.approx(1e-4)  # '1e-4' is a string to YAML 1.1
        assert config.train.batch_size == (256 if name == "tsn.yaml" else 32)
    else:
        assert config.model.name == "AttentionLSTM"
        assert (config.model.embedding_size, config.model.lstm_size, config.model.num_classes) == (1024, 512, 3396)
        assert config.train.decay_epochs == (5,) and config.model.feature_dims == (2048,)
        assert config.model.bone_nework is None  # the seed's 'None' string


def test_project_configs_load():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        assert isinstance(load_config(path), Config), path


def test_overrides_use_seed_key_names(tmp_path):
    config = load_config(
        SEED / "configs" / "tsn.yaml",
        ["MODEL.num_layers=50", "INFER.seg_num=8", "storage.endpoint_url=http://127.0.0.1:9"],
    )
    assert config.model.num_layers == 50 and config.infer.seg_num == 8
    assert config.storage.endpoint_url == "http://127.0.0.1:9"
    assert load_config(None, ["infer.seg_num=4"]).infer.seg_num == 4  # sections are case-insensitive


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("MODEL.num_layers=77", r"MODEL.num_layers must be one of \[18, 34, 50, 101, 152\]"),
        ("INFER.seg_num=0", "INFER.seg_num must be > 0"),
        ("INFER.seg_num=abc", "infer.seg_num must be an integer"),
        ("INFER.segnum=3", "unknown key"),
        ("OUTPUT.dtype=float64", r"output.dtype must be one of \['float16', 'float32'\]"),
        ("bogus.key=1", "unknown config section 'bogus'"),
        ("INFER.seg_num", "must look like SECTION.key=value"),
        ("resources.use_gpu=maybe", "resources.use_gpu"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(SEED / "configs" / "tsn.yaml", [override])


def test_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("MODEL: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "broken.yaml")


def test_override_values_are_yaml():
    assert parse_override("MODEL.image_mean=[0.5, 0.5, 0.5]") == ("model", "image_mean", [0.5, 0.5, 0.5])
    assert parse_override("output.dtype=float32") == ("output", "dtype", "float32")


def test_moved_keys_still_work_and_name_their_new_place(tmp_path, caplog):
    """Actor sizes moved under ``resources``; a config or override with the old name still runs."""
    old = tmp_path / "old.yaml"
    old.write_text("tag:\n  lstm_cpus: 0.5\n  lstm_threads: 3\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="vtplatform.config"):
        config = load_config(old, ["tag.lstm_gpus=0.125"])
    assert (config.resources.lstm_cpus, config.resources.lstm_threads) == (0.5, 3)
    assert config.resources.lstm_gpus == 0.125
    assert "tag.lstm_cpus is now resources.lstm_cpus" in caplog.text
    assert not hasattr(config.tag, "lstm_cpus")
    with pytest.raises(ConfigError, match=r"tag\.lstm_cpus and resources\.lstm_cpus are both set"):
        load_config(old, ["resources.lstm_cpus=2"])
    moved = load_config(
        None, ["train_run.num_workers=3", "train_run.cpus_per_worker=0.5", "train_run.threads_per_worker=2"]
    )
    assert (moved.resources.train_workers, moved.resources.train_cpus, moved.resources.train_threads) == (3, 0.5, 2)


def test_retired_keys_load_with_a_warning_saying_why(tmp_path, caplog):
    """Batch sizes counted in videos no longer bound anything: they load, are dropped, and say why
    (also under their older name, moved first)."""
    old = tmp_path / "old.yaml"
    old.write_text("resources:\n  tsn_batch_size: 4\ntag:\n  lstm_batch_size: 3\n", encoding="utf-8")
    with caplog.at_level("WARNING", logger="vtplatform.config"):
        config = load_config(old)
    assert not hasattr(config.resources, "tsn_batch_size") and not hasattr(config.resources, "lstm_batch_size")
    assert "resources.tsn_batch_size is no longer used (a TSN actor now takes one decoded block" in caplog.text
    assert "resources.lstm_batch_size is no longer used" in caplog.text


def test_job_flags_that_set_config_values_are_overrides_and_win():
    import argparse

    from vtplatform import cli

    args = argparse.Namespace(
        override=["INFER.filelist=other.txt", "MODEL.topk=3"],
        filelist="s3://b/list: 1.txt",
        infer_topk=7,
        features=None,
    )
    flags = {"filelist": "INFER.filelist", "infer_topk": "MODEL.topk", "features": "data.features"}
    config = load_config(SEED / "configs" / "attention_lstm.yaml", cli.overrides(args, flags))
    assert (config.infer.filelist, config.model.topk, config.data.features) == ("s3://b/list: 1.txt", 7, None)
