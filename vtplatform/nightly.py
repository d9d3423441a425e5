"""The nightly run: (a) extract new videos -> (b) fine-tune AttentionLSTM from the champion on all
labelled features -> (c) evaluate on the fixed holdout -> (d) promote if GAP improves by at least
``nightly.margin`` -> (e) keep the whole library's tags on the champion (``tag_library``).

(e) tags into the champion's own folder, ``REGISTRY/tags/<model_id>/``, from the stores: the
feature store for the video-level tags and, with ``nightly.segment_seconds``, the timeline store
for the window tags and spans, with no video decoded. Videos whose timeline was never stored (new
ones) are decoded, and their timeline goes into the store as they are tagged, so the next champion
needs no decode. Once the folder holds the whole library, ``REGISTRY/tags/current.json`` points
readers to it (``champions.current_tags``): a reader never sees two models mixed, and a kill
anywhere in a re-tag leaves the pointer on the previous champion's whole folder until the rerun
finishes it.

A run is identified by the fingerprint of what it trains on (the feature rows and their
provenance, the labels, the holdout, the model and training settings). A run that finds a
completed run with the same fingerprint does nothing new; one that finds an unfinished run
resumes it at the step it reached (the fine-tune itself resumes from its last checkpoint).
State, evaluations and the report live in ``REGISTRY/runs/<run_id>/`` (see ``champions``).

The last step only does what is not done yet, so it runs on every invocation, a completed run's
too: it catches up whatever a killed invocation left (new videos, a re-tag cut short), and a run
killed in it resumes there. A run is done once all its steps are.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vtplatform import champions as R
from vtplatform import faults
from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError
from vtplatform.eval.lstm import run_eval
from vtplatform.extract import run_extract
from vtplatform.labels import read_label_names
from vtplatform.lstm_data import read_labels
from vtplatform.manifest import read_manifest
from vtplatform.tag import run_tag, run_tag_stores
from vtplatform.train.lstm import run_train

log = logging.getLogger(__name__)

STEPS = ("extract", "train", "evaluate", "promote", "tag")


@dataclass
class NightlySummary:
    run_id: str = ""
    nothing_new: bool = False
    resumed_from: str | None = None
    steps: dict[str, float] = field(default_factory=dict)  # step -> seconds (this invocation)
    new_videos: int = 0
    failed_videos: int = 0
    labelled_videos: int = 0
    decision: str = ""
    candidate: dict[str, float] = field(default_factory=dict)
    champion: dict[str, float] = field(default_factory=dict)
    tagged: int = 0  # videos tagged now with the champion (from the stores, or decoded)
    decoded: int = 0  # of those, decoded for want of a stored timeline
    tag_failed: int = 0
    tags: str = ""  # the champion's tags folder
    current: str = ""  # the folder REGISTRY/tags/current.json points to
    report: str = ""

    def format(self) -> str:
        lines = [f"nightly summary: run {self.run_id or '-'}"]
        if self.resumed_from:
            lines.append(f"  resumed at step     {self.resumed_from}")
        lines.append(f"  new videos          {self.new_videos} extracted, {self.failed_videos} dead letters")
        if self.nothing_new:
            lines.append("  training            nothing new since the last completed run: no fine-tune, no promotion")
        else:
            lines.append(f"  labelled videos     {self.labelled_videos}")
            for name, metrics in (("candidate", self.candidate), ("champion", self.champion)):
                if metrics:
                    lines.append(f"  {name:<19} GAP {metrics['gap']:.4f}  Hit@1 {metrics['hit_at_one']:.4f}")
            lines.append(f"  decision            {self.decision}")
        where = f" in {st.redact(self.tags)}" if self.tags else " (no champion yet)"
        lines.append(
            f"  tagged              {self.tagged} videos, {self.decoded} decoded, {self.tag_failed} failed{where}"
        )
        if self.current:
            lines.append(f"  champion's tags     {st.redact(self.current)}")
        lines += [f"  step {step:<14} {seconds:8.1f} s" for step, seconds in self.steps.items()]
        if self.report:
            lines.append(f"  report              {self.report}")
        return "\n".join(lines)


def _require(config: Config) -> None:
    missing = [k for k in ("library", "labels", "holdout", "registry") if not getattr(config.nightly, k)]
    if missing:
        raise ConfigError(f"nightly needs {', '.join('nightly.' + k for k in missing)} in the config")


def locations(config: Config) -> dict[str, str]:
    n = config.nightly
    extract = n.features or R.join(n.registry, S.FEATURES_DIR)
    return {
        "extract": extract,  # extraction's OUT: the feature table and its dead letters
        "features": R.join(extract, S.FEATURES_DIR),  # the feature table
        "timeline": n.timeline or R.join(n.registry, S.TIMELINE_DIR),
        "tags": n.tags or R.join(n.registry, S.TAGS_DIR),  # a folder per champion, and current.json
        "models": R.join(n.registry, S.MODELS_DIR),
    }


def steps(config: Config) -> tuple[str, ...]:
    """The steps a run goes through."""
    return STEPS


def _content_hash(uri: str, config: Config) -> str:
    fs, path = st.filesystem(uri, config.storage)
    with fs.open_input_stream(path) as f:
        return hashlib.sha256(f.read()).hexdigest()


def data_fingerprint(config: Config, features: str) -> str:
    """What a fine-tune depends on: feature rows (ids and provenance), labels, holdout, settings."""
    fs, root = st.filesystem(features, config.storage)
    ids = sorted(st.read_column(fs, root, S.VIDEO_ID).to_pylist())
    parts = st.list_files(fs, root, ".parquet")
    prov = S.read_provenance(pq.read_schema(parts[0], filesystem=fs)) if parts else None
    settings = {k: v for k, v in config.to_dict().items() if k in ("model", "train", "train_run", "data")}
    h = hashlib.sha256()
    for item in (
        "\n".join(ids),
        json.dumps(S.extractor_signature(prov) if prov else None, sort_keys=True),
        _content_hash(config.nightly.labels, config),
        _content_hash(config.nightly.holdout, config),
        json.dumps(settings, sort_keys=True, default=str),
        str(config.nightly.pretrain),
    ):
        h.update(item.encode())
        h.update(b"\0")
    return h.hexdigest()


def _find_run(config: Config, fingerprint: str) -> tuple[str | None, dict | None]:
    """The run with this fingerprint, if any: (run_id, state)."""
    fs, root = st.filesystem(R.join(config.nightly.registry, S.RUNS_DIR), config.storage)
    for path in st.list_files(fs, root, S.RUN_STATE_FILE):
        with fs.open_input_stream(path) as f:
            state = json.loads(f.read())
        if state.get("fingerprint") == fingerprint:
            return state["run_id"], state
    return None, None


def _training_config(config: Config, features: str, train_labels: str) -> Config:
    """The fine-tune and evaluation settings: labels joined to the feature store, the holdout as
    the test set, rows without features skipped (and counted), no validation split."""
    return replace(
        config,
        data=replace(config.data, features=features, on_bad_row="skip"),
        train=replace(config.train, filelist=train_labels),
        valid=replace(config.valid, filelist=None),
        test=replace(config.test, filelist=config.nightly.holdout),
    )


def _write_train_labels(config: Config, path: str) -> int:
    """The training labels minus every holdout video (matched by video_id or uri)."""
    labels, problems = read_labels(config.nightly.labels, config.storage)
    holdout, _ = read_labels(config.nightly.holdout, config.storage)
    for problem in problems:
        log.warning("labels: %s", problem)
    held_ids = pa.array(holdout.column(S.VIDEO_ID).drop_null().to_pylist(), pa.string())
    held_uris = pa.array(holdout.column(S.URI).drop_null().to_pylist(), pa.string())
    keep = pc.invert(
        pc.or_kleene(pc.is_in(labels.column(S.VIDEO_ID), held_ids), pc.is_in(labels.column(S.URI), held_uris))
    )
    table = labels.filter(pc.fill_null(keep, True))
    fs, inner = st.filesystem(path, config.storage)
    st.write_parquet(table, fs, inner)
    return table.num_rows


def run_nightly(config: Config) -> NightlySummary:
    """One nightly run (see the module docstring). Needs ``ray.init()``."""
    _require(config)
    config = replace(config, storage=st.resolve_storage(config.storage))
    where = locations(config)
    summary = NightlySummary()

    start = time.perf_counter()
    extracted = run_extract(config, config.nightly.library, where["extract"], weights=config.nightly.tsn_weights)
    summary.new_videos, summary.failed_videos = extracted.succeeded, extracted.failed_total
    summary.steps["extract"] = time.perf_counter() - start
    faults.stop_nightly_after("extract")

    fingerprint = data_fingerprint(config, where["features"])
    run_id, state = _find_run(config, fingerprint)
    if state is not None and state.get("done"):
        log.info("nothing new since run %s (same data and settings): no fine-tune, no promotion", run_id)
        summary.run_id, summary.nothing_new = run_id, True
    else:
        if state is None:
            run_id = f"{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%SZ}-{fingerprint[:8]}"
            champion = R.read_champion(config.nightly.registry, config.storage)
            state = {
                "run_id": run_id,
                "fingerprint": fingerprint,
                "started_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "champion_before": champion,
                "completed": [],
                "done": False,
            }
            R.write_run_state(config.nightly.registry, run_id, state, config.storage)
        else:
            summary.resumed_from = next(
                (s for s in steps(config)[1:] if s not in state["completed"]), steps(config)[-1]
            )
            log.info("resuming run %s at step %s", run_id, summary.resumed_from)
        summary.run_id = run_id
        _train_evaluate_promote(config, where, state, summary)
    tagged = _final_step(config, state, "tag", summary, lambda: tag_library(config, where))
    summary.tagged, summary.decoded, summary.tag_failed = tagged["tagged"], tagged["decoded"], tagged["failed"]
    summary.tags, summary.current = tagged["save_dir"] or "", tagged["current"] or ""
    return summary


def _step(config: Config, state: dict, name: str, summary: NightlySummary, fn) -> Any:
    """Runs step ``name`` unless the run already completed it; records its result in the state."""
    if name in state["completed"]:
        return state.get(name)
    start = time.perf_counter()
    result = fn()
    state[name] = result
    state["completed"].append(name)
    R.write_run_state(config.nightly.registry, state["run_id"], state, config.storage)
    summary.steps[name] = time.perf_counter() - start
    faults.stop_nightly_after(name)
    return result


def _final_step(config: Config, state: dict, name: str, summary: NightlySummary, fn) -> Any:
    """Runs step ``name`` (tag, segments: incremental, they only do what is not done yet) on every
    invocation. In a run that is not done yet it records the step and its result in the state, and
    marks the run done after its last step."""
    start = time.perf_counter()
    result = fn()
    if not state.get("done"):
        state[name] = result
        if name not in state["completed"]:
            state["completed"].append(name)
        state["done"] = all(s in state["completed"] for s in steps(config)[1:])
        R.write_run_state(config.nightly.registry, state["run_id"], state, config.storage)
    summary.steps[name] = time.perf_counter() - start
    faults.stop_nightly_after(name)
    return result


def _train_evaluate_promote(config: Config, where: dict[str, str], state: dict, summary: NightlySummary) -> None:
    registry, run_id = config.nightly.registry, state["run_id"]
    run_dir = R.join(registry, S.RUNS_DIR, run_id)
    train_labels = R.join(run_dir, "train_labels.parquet")
    cfg = _training_config(config, where["features"], train_labels)
    champion = state["champion_before"]
    pretrain = champion["lstm_weights"] if champion else config.nightly.pretrain
    candidate = R.join(where["models"], run_id)

    def train() -> dict:
        labelled = _write_train_labels(config, train_labels)
        trained = run_train(cfg, where["models"], pretrain=pretrain, label_file=config.tag.label_file, run_name=run_id)
        return {
            "labelled": labelled,
            "videos": trained.train_videos,
            "epochs": trained.epochs_finished,
            "weights": candidate,
        }

    trained = _step(config, state, "train", summary, train)
    summary.labelled_videos = trained["videos"]

    def evaluate() -> dict:
        result = {"candidate": _metrics(run_eval(cfg, candidate, R.join(run_dir, S.EVAL_DIR, "candidate")))}
        if champion:
            result["champion"] = _metrics(
                run_eval(cfg, champion["lstm_weights"], R.join(run_dir, S.EVAL_DIR, "champion"))
            )
        return result

    evaluated = _step(config, state, "evaluate", summary, evaluate)
    summary.candidate, summary.champion = evaluated["candidate"], evaluated.get("champion", {})

    def promote() -> dict:
        decision = decide(evaluated["candidate"], evaluated.get("champion"), config.nightly.margin)
        if decision != "kept":
            R.write_champion(
                registry,
                {
                    "model_id": run_id,
                    "lstm_weights": candidate,
                    "tsn_weights": config.nightly.tsn_weights,
                    "metrics": {k: evaluated["candidate"][k] for k in ("gap", "hit_at_one", "perr", "map")},
                    "promoted_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                    "previous": champion["model_id"] if champion else None,
                },
                config.storage,
            )
        report = write_report(config, run_id, evaluated, decision)
        R.write_history(
            registry,
            run_id,
            {
                "run_id": run_id,
                "started_at": state["started_at"],
                "finished_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "data_fingerprint": state["fingerprint"],
                "config": {
                    k: v for k, v in config.to_dict().items() if k in ("model", "train", "train_run", "nightly")
                },
                "labelled_videos": trained["videos"],
                "champion_before": champion["model_id"] if champion else None,
                "candidate": {k: evaluated["candidate"][k] for k in ("gap", "hit_at_one", "perr", "map")},
                "champion": {k: evaluated["champion"][k] for k in ("gap", "hit_at_one", "perr", "map")}
                if champion
                else None,
                "margin": config.nightly.margin,
                "decision": decision,
                "report": report,
            },
            config.storage,
        )
        return {"decision": decision, "report": report}

    promoted = _step(config, state, "promote", summary, promote)
    summary.decision, summary.report = promoted["decision"], promoted["report"]


def _metrics(report: dict[str, Any]) -> dict[str, Any]:
    keys = ("gap", "hit_at_one", "perr", "map", "num_videos", "per_class_ap", "per_class_ap_full_ranking")
    return {k: report[k] for k in keys}


def decide(candidate: dict, champion: dict | None, margin: float) -> str:
    """ "promoted" when the candidate's GAP beats the champion's by at least ``margin``, "first"
    when there is no champion yet, else "kept" (the champion stays)."""
    if champion is None:
        return "first"
    return "promoted" if candidate["gap"] >= champion["gap"] + margin else "kept"


def ap_changes(
    candidate: list, champion: list, names: list[str] | None, limit: int = 10
) -> list[tuple[int, str, float, float]]:
    """The classes whose holdout AP moved most: (class id, name, champion AP, candidate AP). The
    report compares full-ranking AP (every holdout video ranked per class), which moves with any
    change in a class's scores; VideoTag's top-k AP stays put until a class enters a top k."""
    rows = []
    for c, (new, old) in enumerate(zip(candidate, champion, strict=True)):
        if new is not None and old is not None and new != old:
            rows.append((c, names[c] if names else str(c), old, new))
    rows.sort(key=lambda r: -abs(r[3] - r[2]))
    return rows[:limit]


def write_report(config: Config, run_id: str, evaluated: dict, decision: str) -> str:
    """A short markdown report and a PNG comparing the candidate with the champion."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = read_label_names(config.tag.label_file, config.storage) if config.tag.label_file else None
    cand, champ = evaluated["candidate"], evaluated.get("champion")
    key = "per_class_ap_full_ranking"
    changes = ap_changes(cand[key], champ.get(key) or champ["per_class_ap"], names) if champ else []
    lines = [
        f"# Nightly run {run_id}",
        "",
        f"Decision: **{decision}** (margin {config.nightly.margin} GAP)",
        "",
        "| metric | candidate | champion | change |",
        "|---|---|---|---|",
    ]
    for key, label in (("gap", "GAP"), ("hit_at_one", "Hit@1"), ("perr", "PERR"), ("map", "mAP")):
        old = champ[key] if champ else None
        change = f"{cand[key] - old:+.4f}" if old is not None else "n/a"
        lines.append(f"| {label} | {cand[key]:.4f} | {'n/a' if old is None else f'{old:.4f}'} | {change} |")
    lines += ["", f"Holdout: {cand['num_videos']} videos.", ""]
    if changes:
        lines += [
            "## Per-class AP changes that matter most",
            "",
            "Full-ranking AP: each class's ranking of every holdout video.",
            "",
            "| class | name | champion AP | candidate AP | change |",
            "|---|---|---|---|---|",
        ]
        lines += [f"| {c} | {n} | {old:.4f} | {new:.4f} | {new - old:+.4f} |" for c, n, old, new in changes]
    lines += ["", "![metrics](report.png)", ""]

    fig, axes = plt.subplots(1, 2 if changes else 1, figsize=(11 if changes else 5, 4), squeeze=False)
    keys = ["gap", "hit_at_one", "perr", "map"]
    x = np.arange(len(keys))
    axes[0][0].bar(x - 0.2, [cand[k] for k in keys], 0.4, label="candidate")
    if champ:
        axes[0][0].bar(x + 0.2, [champ[k] for k in keys], 0.4, label="champion")
    axes[0][0].set_xticks(x, ["GAP", "Hit@1", "PERR", "mAP"])
    axes[0][0].set_ylim(0, 1)
    axes[0][0].legend()
    axes[0][0].set_title(f"holdout metrics ({decision})")
    if changes:
        labels = [f"{c} {n}"[:24] for c, n, _, _ in changes]
        deltas = [new - old for _, _, old, new in changes]
        axes[0][1].barh(labels[::-1], deltas[::-1], color=["tab:green" if d > 0 else "tab:red" for d in deltas[::-1]])
        axes[0][1].set_title("per-class AP change (candidate - champion)")
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100)
    plt.close(fig)

    run_dir = R.join(config.nightly.registry, S.RUNS_DIR, run_id)
    fs, root = st.filesystem(run_dir, config.storage)
    st.write_bytes(png.getvalue(), fs, f"{root}/report.png")
    st.write_bytes("\n".join(lines).encode("utf-8"), fs, f"{root}/report.md")
    return R.join(run_dir, "report.md")


def tag_library(config: Config, where: dict[str, str]) -> dict[str, Any]:
    """Keeps every library video's tags on the champion (see the module docstring): tags from the
    stores what its folder lacks, decodes the videos whose timeline was never stored (with
    segments), and points ``REGISTRY/tags/current.json`` to the folder once it holds the whole
    library. Returns the counts of this call."""
    champion = R.read_champion(config.nightly.registry, config.storage)
    out: dict[str, Any] = {"model_id": None, "save_dir": None, "tagged": 0, "decoded": 0, "failed": 0, "current": None}
    if champion is None:
        log.warning("no champion yet: nothing to tag with")
        return out
    model_id, weights = champion["model_id"], champion["lstm_weights"]
    save_dir = R.join(where["tags"], model_id)
    segments = config.nightly.segment_seconds
    cfg = replace(
        config,
        tag=replace(config.tag, segment_seconds=segments, thumbnails=False, write_timeline=bool(segments)),
    )
    meta = {"model_id": model_id}
    timeline = where["timeline"] if segments and _has_parts(where["timeline"], config) else None
    try:
        # from the stores; with windows, only once there is a timeline store (the videos without a
        # stored timeline become NotInTimeline dead letters, which the decode below makes up for)
        if _has_parts(where["features"], config) and (timeline or not segments):
            stored = run_tag_stores(cfg, save_dir, weights, where["features"], timeline, meta=meta)
            out["tagged"], out["failed"] = stored.succeeded, stored.failed_total
        if segments:
            decoded = _decode_without_timeline(cfg, where, save_dir, weights, meta)
            if decoded is not None:
                out["tagged"] += decoded.succeeded
                out["decoded"], out["failed"] = decoded.submitted, out["failed"] + decoded.failed_total
    except ConfigError as exc:
        fs, root = st.filesystem(save_dir, config.storage)
        if st.exists(fs, f"{root}/{S.TAGS_DIR}") or st.exists(fs, f"{root}/{S.SEGMENTS_DIR}"):
            raise ConfigError(
                f"nightly tags: {exc} (that is the champion's tags folder: delete it to re-tag the library with "
                "the current settings, or restore the settings it was made with)"
            ) from exc
        raise
    out.update(model_id=model_id, save_dir=save_dir)
    if _whole(cfg, where, save_dir):
        current = R.read_current(where["tags"], config.storage)
        if current is None or current["model_id"] != model_id:
            R.write_current(where["tags"], model_id, save_dir, config.storage)
            log.info("the champion's tags of the whole library are now in %s", st.redact(save_dir))
        out["current"] = save_dir
    else:
        current = R.read_current(where["tags"], config.storage)
        out["current"] = current["tags"] if current else None
        log.warning("%s does not hold every library video yet: readers stay on %s", st.redact(save_dir), out["current"])
    log.info(
        "tagged %d videos with %s (%d decoded for want of a stored timeline, %d failed) in %s",
        out["tagged"], model_id, out["decoded"], out["failed"], st.redact(save_dir),
    )  # fmt: skip
    return out


def _has_parts(uri: str, config: Config) -> bool:
    fs, root = st.filesystem(uri, config.storage)
    return bool(st.list_files(fs, root, ".parquet"))


def _folder_state(cfg: Config, save_dir: str) -> tuple[pa.Array, pa.Table]:
    """(the videos whole in a tags folder, its dead letters: video ids and error types)."""
    from vtplatform.outputs import done_videos
    from vtplatform.outputs.segments import WindowTagOutput
    from vtplatform.outputs.tags import TagOutput

    fs, root = st.filesystem(save_dir, cfg.storage)
    outputs = [TagOutput(S.TAG_SCHEMA, None, save_dir)]
    if cfg.tag.segment_seconds:
        outputs.append(WindowTagOutput(S.SEGMENT_SCHEMA, None))
    dead_dir = f"{root}/{S.DEAD_LETTERS_DIR}"
    dead = [
        pq.read_table(f, filesystem=fs, columns=[S.VIDEO_ID, S.ERROR_TYPE])
        for f in st.list_files(fs, dead_dir, ".parquet")
    ]
    empty = pa.table({S.VIDEO_ID: pa.array([], pa.string()), S.ERROR_TYPE: pa.array([], pa.string())})
    return done_videos(outputs, fs, root), pa.concat_tables(dead) if dead else empty


def _decode_without_timeline(cfg: Config, where: dict[str, str], save_dir: str, weights: str, meta: dict):
    """Decodes (with segments, its timeline into the store) every library video the folder does not
    hold whole that no stored timeline could serve; returns the tag job's summary (None: none to)."""
    manifest = read_manifest(cfg.nightly.library, cfg.storage)
    done, dead = _folder_state(cfg, save_dir)
    other = dead.filter(pc.invert(pc.is_in(dead.column(S.ERROR_TYPE), pa.array(["NotInTimeline", "NotInTable"]))))
    skip = pa.concat_arrays([done, other.column(S.VIDEO_ID).combine_chunks().cast(pa.string())])
    ids = manifest.entries.column(S.VIDEO_ID)
    todo = manifest.entries.filter(pc.invert(pc.is_in(ids, value_set=skip))) if len(skip) else manifest.entries
    if not todo.num_rows:
        return None
    fs, root = st.filesystem(save_dir, cfg.storage)
    path = f"{root}/_decode.parquet"  # '_': not one of the folder's tables
    st.write_parquet(todo.select([S.VIDEO_ID, S.URI]), fs, path)
    uri = path if fs.type_name == "local" else f"s3://{path}"
    log.info("%d library videos have no stored timeline (or features): decoding them", todo.num_rows)
    return run_tag(
        cfg,
        uri,
        save_dir,
        weights,
        cfg.nightly.tsn_weights,
        retry_failed=True,
        timeline_store=where["timeline"],
        meta=meta,
    )


def _whole(cfg: Config, where: dict[str, str], save_dir: str) -> bool:
    """Whether the folder holds every library video that can be tagged: each done, or dead-lettered
    for a reason of its own (not for a missing timeline, which a decode makes up for)."""
    manifest = read_manifest(cfg.nightly.library, cfg.storage)
    done, dead = _folder_state(cfg, save_dir)
    own = dead.filter(pc.invert(pc.is_in(dead.column(S.ERROR_TYPE), pa.array(["NotInTimeline", "NotInTable"]))))
    fs, root = st.filesystem(where["extract"], cfg.storage)
    extract_dead = st.read_column(fs, f"{root}/{S.DEAD_LETTERS_DIR}", S.VIDEO_ID).combine_chunks()
    landed = pa.concat_arrays(
        [done, own.column(S.VIDEO_ID).combine_chunks().cast(pa.string()), extract_dead.cast(pa.string())]
    )
    return (
        bool(pc.all(pc.is_in(manifest.entries.column(S.VIDEO_ID), value_set=landed)).as_py())
        if manifest.entries.num_rows
        else True
    )
