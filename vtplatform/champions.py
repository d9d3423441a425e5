"""The champion store: the registry folder the nightly run keeps (``nightly.registry``, local or on
S3), which model is the champion, and how each run went::

    champion.json             the current champion: model id, weights, metrics, when and by which run
    history/<run_id>.json     one record per nightly run: data and config fingerprints, metrics of
                              the candidate and the champion, the decision
    models/<run_id>/          each run's fine-tune (Ray Train run folder: checkpoints, best/, curves)
    runs/<run_id>/            each run's state (for resuming), evaluations and report
    features/                 the feature store: every library video's TSN features (jobs/extract.py)
    timeline/                 with nightly.segment_seconds, the timeline store: their TSN features at
                              tag.timeline_fps, with their times (written as new videos are tagged)
    tags/<model_id>/          every library video's tags made with that champion: a jobs/tag.py
                              output (tags/, and with segments segments/ and spans/), re-tagged from
                              the stores when the model became champion; earlier ones are kept
    tags/current.json         which of those folders holds the champion's tags of the whole library
                              (``current_tags``); it moves to a new champion's once that folder is whole

``jobs/tag.py --model_dir REGISTRY`` tags with the champion.
"""

from __future__ import annotations

import json
from typing import Any

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError, StorageSection


def _read_json(uri: str, storage: StorageSection) -> dict[str, Any] | None:
    fs, path = st.filesystem(uri, storage)
    if not st.exists(fs, path):
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read().decode("utf-8"))


def _write_json(uri: str, record: dict[str, Any], storage: StorageSection) -> None:
    fs, path = st.filesystem(uri, storage)
    st.write_bytes(json.dumps(record, indent=1, ensure_ascii=False, sort_keys=True).encode("utf-8"), fs, path)


def join(registry: str, *parts: str) -> str:
    return "/".join([registry.rstrip("/"), *parts])


def read_champion(registry: str, storage: StorageSection) -> dict[str, Any] | None:
    return _read_json(join(registry, S.CHAMPION_FILE), storage)


def write_champion(registry: str, record: dict[str, Any], storage: StorageSection) -> None:
    """Replaces the champion pointer atomically (readers see the old or the new one, never half)."""
    _write_json(join(registry, S.CHAMPION_FILE), record, storage)


def write_history(registry: str, run_id: str, record: dict[str, Any], storage: StorageSection) -> None:
    _write_json(join(registry, S.HISTORY_DIR, f"{run_id}.json"), record, storage)


def history(registry: str, storage: StorageSection) -> list[dict[str, Any]]:
    fs, root = st.filesystem(join(registry, S.HISTORY_DIR), storage)
    records = []
    for path in st.list_files(fs, root, ".json"):
        with fs.open_input_stream(path) as f:
            records.append(json.loads(f.read().decode("utf-8")))
    return sorted(records, key=lambda r: r.get("started_at", ""))


def read_run_state(registry: str, run_id: str, storage: StorageSection) -> dict[str, Any] | None:
    return _read_json(join(registry, S.RUNS_DIR, run_id, S.RUN_STATE_FILE), storage)


def write_run_state(registry: str, run_id: str, state: dict[str, Any], storage: StorageSection) -> None:
    _write_json(join(registry, S.RUNS_DIR, run_id, S.RUN_STATE_FILE), state, storage)


def resolve_model_dir(model_dir: str, storage: StorageSection) -> tuple[str | None, str]:
    """(TSN weights or None, AttentionLSTM weights) of a registry's champion, or of a run folder or
    checkpoint given directly (then the TSN weights come from elsewhere)."""
    champion = read_champion(model_dir, storage)
    if champion is not None:
        return champion.get("tsn_weights"), champion["lstm_weights"]
    fs, path = st.filesystem(model_dir, storage)
    if not st.exists(fs, path):
        raise ConfigError(f"--model_dir {st.redact(model_dir)} does not exist")
    return None, model_dir


def read_current(tags: str, storage: StorageSection) -> dict[str, Any] | None:
    """The pointer to the folder holding the champion's tags of the whole library (None before any)."""
    return _read_json(join(tags, S.CURRENT_TAGS_FILE), storage)


def write_current(tags: str, model_id: str, folder: str, storage: StorageSection) -> None:
    """Points readers at ``folder``, a model's whole tags; atomic: they see the old folder or the new."""
    import datetime as dt

    record = {
        "model_id": model_id,
        "tags": folder,
        "since": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json(join(tags, S.CURRENT_TAGS_FILE), record, storage)


def current_tags(registry_tags: str, storage: StorageSection) -> str:
    """``REGISTRY/tags``' answer to "the champion's tags of every video": the URI of the tags table to
    read (``pyarrow.parquet.read_table(current_tags(...))``); never a mix of two models."""
    current = read_current(registry_tags, storage)
    if current is None:
        raise ConfigError(f"{st.redact(registry_tags)} has no champion's tags yet ({S.CURRENT_TAGS_FILE})")
    return join(current["tags"], S.TAGS_DIR)
