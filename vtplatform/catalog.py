"""The models a job can be asked for by name (``--model_name``, the config's ``MODEL.name``): one
entry each, with what ``jobs/train.py``, ``jobs/eval.py`` and ``jobs/predict.py`` run for it.

Adding a model is its own module in ``models/`` (the network), ``train/`` (its ``Trainee`` for the
scaffold's one loop) and, where it runs on a per-video pipeline, ``stages/``; then its name in
``schema.MODEL_NAMES`` (which the config accepts) and its entry here, which every job reads.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from vtplatform import schema as S
from vtplatform.config import Config, ConfigError


@dataclass(frozen=True)
class ModelJobs:
    """What each job runs for one model. ``evaluate`` returns the report ``format_report`` prints."""

    train: Callable[..., Any]  # (config, save_dir, pretrain, label_file) -> train.scaffold.TrainSummary
    evaluate: Callable[..., dict[str, Any]]  # (config, weights, save_dir, label_file) -> report
    format_report: Callable[[dict[str, Any], str], str]  # (report, save_dir) -> text
    predict: Callable[..., Any]  # (config, weights, save_dir, label_file, seed_json, whole_table) -> PredictSummary


def _attention_lstm() -> ModelJobs:
    from vtplatform.eval import lstm as evaluation
    from vtplatform.predict import run_predict
    from vtplatform.train.lstm import run_train

    def predict(config, weights, save_dir, label_file, seed_json, whole_table):
        return run_predict(
            config, weights, save_dir, label_file=label_file, seed_json=seed_json, whole_table=whole_table
        )

    def evaluate(config, weights, save_dir, label_file):
        return evaluation.run_eval(config, weights, save_dir)

    return ModelJobs(run_train, evaluate, evaluation.format_report, predict)


def _tsn() -> ModelJobs:
    from vtplatform.eval import classification
    from vtplatform.eval import tsn as evaluation
    from vtplatform.predict import run_predict_tsn
    from vtplatform.train.tsn import run_train

    def predict(config, weights, save_dir, label_file, seed_json, whole_table):
        return run_predict_tsn(config, weights, save_dir, label_file=label_file, seed_json=seed_json)

    def evaluate(config, weights, save_dir, label_file):
        return evaluation.run_eval(config, weights, save_dir, label_file=label_file)

    return ModelJobs(run_train, evaluate, lambda report, save_dir: classification.format_report(report), predict)


MODELS: dict[str, Callable[[], ModelJobs]] = {S.MODEL_ATTENTION_LSTM: _attention_lstm, S.MODEL_TSN: _tsn}


def pick(name: str | None, config: Config) -> ModelJobs:
    """The entry for ``--model_name`` (default ``MODEL.name``), matched case-insensitively like the
    seed; it must be the config's model."""
    name = name or config.model.name
    found = {k.lower(): k for k in MODELS}.get(name.lower())
    if found is None:
        raise ConfigError(f"--model_name {name!r} is not one of {sorted(MODELS)}")
    if found.lower() != config.model.name.lower():
        raise ConfigError(f"--model_name {name} but the config's MODEL.name is {config.model.name}")
    return MODELS[found]()
