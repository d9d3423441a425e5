"""CheckpointMeta: the meta.json of every fine-tune, read back typed, including the dicts that
older versions wrote, and the model check readers make with it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vtplatform.config import ConfigError
from vtplatform.models.weights import CheckpointMeta, LoadedWeights

LSTM_DIMS = {"feature_dim": 8, "embedding_size": 4, "lstm_size": 4, "fc1_size": 4, "fc2_size": 4, "num_classes": 3}
TRAIN_STATE = {"epoch": 2, "step": 0, "global_step": 10, "best": 0.5, "history": [{"epoch": 0}, {"epoch": 1}]}
OLD_LSTM = {  # as AttentionLSTM checkpoints were written before CheckpointMeta
    **TRAIN_STATE,
    "epoch_partial": None,
    "model_name": "AttentionLSTM",
    "model": LSTM_DIMS,
    "config": {"MODEL": {"name": "AttentionLSTM"}},
    "metrics": {"epoch": 1, "valid_gap": 0.5},
    "label_fingerprint": "abc",
    "features": {"model": {"depth": 18}},
    "steps_per_epoch": 5,
    "num_workers": 2,
}
OLD_TSN = {  # and TSN ones
    **TRAIN_STATE,
    "model_name": "TSN",
    "num_classes": 3,
    "depth": 18,
    "metrics": {"epoch": 1, "valid_top1": 0.5},
    "best_metric": "valid_top1",
    "label_fingerprint": "abc",
    "config": {"MODEL": {"name": "TSN"}},
}


def test_old_metas_read_typed_and_write_back_every_key():
    lstm, tsn = CheckpointMeta.from_dict(OLD_LSTM), CheckpointMeta.from_dict(OLD_TSN)
    assert (lstm.model_name, lstm.num_classes, lstm.steps_per_epoch, lstm.extra) == ("AttentionLSTM", 3, 5, {})
    assert (tsn.model_name, tsn.num_classes, tsn.model, tsn.extra) == ("TSN", 3, {}, {"depth": 18})
    assert lstm.epoch == tsn.epoch == 2 and lstm.history == tsn.history == TRAIN_STATE["history"]
    for old, meta in ((OLD_LSTM, lstm), (OLD_TSN, tsn)):
        written = meta.to_dict()
        assert {k: written[k] for k in old} == old  # nothing lost or changed
        assert CheckpointMeta.from_dict(json.loads(json.dumps(written))) == meta
    # the AttentionLSTM checkpoints that predate model_name carried their dims under "model"
    assert CheckpointMeta.from_dict({"model": LSTM_DIMS}).model_name == "AttentionLSTM"
    assert CheckpointMeta.from_dict({"epoch": 1}).model_name is None


def test_extra_keys_never_override_named_ones():
    meta = CheckpointMeta("TSN", epoch=3, extra={"epoch": 99, "depth": 18})
    assert meta.to_dict()["epoch"] == 3 and meta.to_dict()["depth"] == 18


@pytest.mark.parametrize(
    ("meta", "name"),
    [
        (OLD_LSTM, "AttentionLSTM"),
        ({"model": LSTM_DIMS}, "AttentionLSTM"),
        (OLD_TSN, "TSN"),
        (CheckpointMeta("TSN", model={"depth": 18, "num_classes": 3}).to_dict(), "TSN"),
    ],
)
def test_require_refuses_a_checkpoint_of_the_other_model(meta, name):
    loaded = LoadedWeights({"w": np.zeros(1)}, meta, "/runs/x")
    assert loaded.model_name == name and loaded.require(name) is loaded
    other = {"AttentionLSTM": "TSN", "TSN": "AttentionLSTM"}[name]
    with pytest.raises(ConfigError, match=f"is an? {name} checkpoint, not an? {other} one"):
        loaded.require(other)
    bare = LoadedWeights({"w": np.zeros(1)}, None, "/w.pdparams")  # a bare weight file: any model
    assert bare.model_name is None and bare.checkpoint is None and bare.require(other) is bare
