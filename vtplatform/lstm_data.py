"""The AttentionLSTM's inputs: features joined to labels, as Ray Data datasets that stream to
the training workers (and to evaluation and prediction).

Two layouts, chosen by ``data.features``:

* a feature table written by ``jobs/extract.py`` (``OUT/features``, local or ``s3://``), joined to
  labels from the phase's filelist: a seed list file (``path l1 l2 ...``, trailing spaces allowed,
  a path may contain spaces: the trailing integer tokens are the labels, see
  ``manifest.parse_list_line``; a ``.npy`` path names its video by the file stem, as
  ``--format npy`` writes them, any other path by its derived video_id) or a labels table
  (Parquet/CSV with ``labels`` and ``video_id`` and/or ``uri``). The table's provenance metadata is checked on the way in.
* the seed's layout (``data.features`` unset): the filelist lists ``.npy`` feature files,
  ``[T, D]`` float arrays, with their labels.

Planning (``read_inputs``) runs in the driver and reads only ids, labels and ``.npy`` headers.
Rows that cannot be used (a missing feature file, a label >= num_classes, a wrong feature shape)
raise ``DataError`` naming them, or with ``data.on_bad_row=skip`` are counted and left out.
``make_dataset`` then streams features in blocks, so memory stays bounded for any table size.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import itertools
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import Config, ConfigError, StorageSection
from vtplatform.manifest import parse_list_line
from vtplatform.pipeline import blocks_dataset

log = logging.getLogger(__name__)

ROWS_PER_BLOCK = 16  # rows per Ray Data block in the seed layout (one .npy read task)
UNIT = "unit"  # planned rows: the (file, row group) of the table, or the .npy file, that holds the row
READ_ROWS = 32  # feature-table rows read at once (about 40 MB at 300 x 2048 float16)

# Reasons a row is left out.
MISSING_FEATURES = "missing_features"
LABEL_OUT_OF_RANGE = "label_out_of_range"
BAD_SHAPE = "bad_feature_shape"
UNREADABLE = "unreadable_feature_file"
BAD_LINE = "bad_label_line"


class DataError(ConfigError):
    """Input data that cannot be used as configured (the message names the rows and the fix)."""


@dataclass
class FeatureInputs:
    """One phase's planned inputs: the rows to read, and what was left out and why."""

    phase: str
    source: str  # the feature table, or the seed list file
    rows: pa.Table  # video_id, uri, labels (+ path for .npy files), one row per video to read
    feature_dim: int
    num_segments: int | None  # fixed for a table; None for .npy files (their own lengths)
    provenance: dict[str, Any] | None
    table: str | None = None  # the feature table, when there is one
    table_units: list[tuple[str, int]] = field(default_factory=list)  # (file, row group) to read, in order
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    bad: dict[str, list[str]] = field(default_factory=dict)  # reason -> the rows, while planning
    unlabelled: int = 0  # table rows that the labels do not mention (not used)
    nbytes: int = 0  # size of the features to read (as the workers receive them)

    def __len__(self) -> int:
        return self.rows.num_rows

    def summary(self) -> str:
        parts = [f"{self.phase}: {len(self)} videos from {st.redact(self.source)}"]
        if self.skipped:
            parts.append("skipped " + ", ".join(f"{n} {r}" for r, n in sorted(self.skipped.items())))
        if self.unlabelled:
            parts.append(f"{self.unlabelled} table rows without labels not used")
        return "; ".join(parts)


# --- labels ----------------------------------------------------------------------------------


def read_labels(source: str, storage: StorageSection) -> tuple[pa.Table, list[str]]:
    """A seed list file or a labels table -> (LABEL_SCHEMA rows, problems). List lines split as
    ``manifest.parse_list_line`` does (trailing integers are labels, the rest is the path, spaces
    included). A line that does not parse (a NUL byte) becomes a problem, reported like any bad
    row, not a crash."""
    fs, path = st.filesystem(source, storage)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise ConfigError(f"label/list file not found: {st.redact(source)}")
    if path.lower().endswith((".parquet", ".csv")):
        return _labels_from_table(fs, path), []
    with fs.open_input_stream(path) as f:
        text = f.read().decode("utf-8")
    rows, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            item, labels = parse_list_line(line)
        except ValueError as exc:
            problems.append(f"{st.redact(source)} line {number}: {exc}")
            continue
        rows.append({S.VIDEO_ID: _list_video_id(item), S.URI: _resolve(item), S.LABELS: labels})
    return pa.Table.from_pylist(rows, schema=S.LABEL_SCHEMA), problems


def _resolve(item: str) -> str:
    return item if st.is_s3(item) else st.canonical_uri(item)


def _list_video_id(item: str) -> str:
    """``OUT/npy/<video_id>.npy`` -> video_id; a video path -> the id extraction gave it."""
    if item.lower().endswith(".npy"):
        return os.path.splitext(os.path.basename(item.rstrip("/")))[0]
    return st.derive_video_id(item)


def _labels_from_table(fs: pafs.FileSystem, path: str) -> pa.Table:
    if path.lower().endswith(".csv"):
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(
                f,
                convert_options=pacsv.ConvertOptions(
                    column_types={S.URI: pa.string(), S.VIDEO_ID: pa.string(), S.LABELS: pa.string()}
                ),
            )
    else:
        table = pq.read_table(path, filesystem=fs)
    if S.LABELS not in table.column_names or not {S.VIDEO_ID, S.URI} & set(table.column_names):
        raise ConfigError(
            f"labels table {path} needs a '{S.LABELS}' column and '{S.VIDEO_ID}' or '{S.URI}' "
            f"(has {table.column_names})"
        )
    n = table.num_rows
    ids = table.column(S.VIDEO_ID).to_pylist() if S.VIDEO_ID in table.column_names else [None] * n
    uris = table.column(S.URI).to_pylist() if S.URI in table.column_names else [None] * n
    labels = [_parse_labels(v, path, i) for i, v in enumerate(table.column(S.LABELS).to_pylist())]
    uris = [_resolve(u) if u else None for u in uris]
    return pa.table({S.VIDEO_ID: ids, S.URI: uris, S.LABELS: labels}, schema=S.LABEL_SCHEMA)


def _parse_labels(value: Any, path: str, row: int) -> list[int]:
    if value is None:
        return []
    tokens = (
        value.replace(",", " ").split() if isinstance(value, str) else value if isinstance(value, list) else [value]
    )
    try:
        labels = [int(t) for t in tokens]
    except (TypeError, ValueError):
        raise ConfigError(f"labels table {path} row {row}: labels must be integers, got {value!r}") from None
    if any(x < 0 for x in labels):
        raise ConfigError(f"labels table {path} row {row}: labels must be >= 0, got {labels}")
    return labels


# --- feature tables --------------------------------------------------------------------------


@dataclass
class FeatureTable:
    uri: str
    files: list[str]  # paths inside ``fs``
    row_groups: list[int]  # per file
    group_rows: list[list[int]]  # per file, the rows of each of its row groups
    fs: pafs.FileSystem
    num_segments: int
    feature_dim: int
    provenance: dict[str, Any]
    itemsize: int = 2


def open_feature_table(uri: str, storage: StorageSection) -> FeatureTable:
    """Lists a feature table's parts and checks that they agree with each other and with this
    version's schema: one extractor signature, one [segments, dim] shape."""
    fs, root = st.filesystem(uri, storage)
    files = st.list_files(fs, root, ".parquet")
    if not files:
        raise ConfigError(f"no feature table (Parquet files) at {st.redact(uri)}: pass jobs/extract.py's OUT/features")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        footers = list(pool.map(lambda f: pq.read_metadata(f, filesystem=fs), files))
    schemas = [m.schema.to_arrow_schema() for m in footers]
    first = schemas[0]
    if S.FEATURES not in first.names or not hasattr(first.field(S.FEATURES).type, "shape"):
        raise ConfigError(f"{st.redact(files[0])} is not a feature table: no fixed-shape '{S.FEATURES}' column")
    prov = S.read_provenance(first)
    if prov is None:
        raise ConfigError(f"{st.redact(uri)} carries no provenance metadata: it was not written by jobs/extract.py")
    if prov.get("schema_version") != S.SCHEMA_VERSION:
        raise ConfigError(
            f"{st.redact(uri)} has feature schema version {prov.get('schema_version')}; "
            f"this version reads {S.SCHEMA_VERSION}"
        )
    shape = tuple(first.field(S.FEATURES).type.shape)
    for path, schema in zip(files[1:], schemas[1:], strict=True):
        other = S.read_provenance(schema) or {}
        diff = S.signature_diff(prov, other)
        if diff or tuple(schema.field(S.FEATURES).type.shape) != shape:
            raise ConfigError(
                f"{st.redact(path)} was made differently from {st.redact(files[0])}: "
                f"{'; '.join(diff) or 'feature shape'}"
            )
    if prov.get("weights") == "random-init":
        log.warning("%s holds features of a randomly initialised TSN: they carry no meaning", st.redact(uri))
    itemsize = first.field(S.FEATURES).type.value_type.bit_width // 8
    return FeatureTable(
        uri,
        files,
        [m.num_row_groups for m in footers],
        [[m.row_group(g).num_rows for g in range(m.num_row_groups)] for m in footers],
        fs,
        int(shape[0]),
        int(shape[1]),
        prov,
        itemsize,
    )


# --- planning --------------------------------------------------------------------------------


def read_inputs(config: Config, phase: str, filelist: str | None, need_labels: bool = True) -> FeatureInputs:
    """Which rows ``phase`` reads and with which labels. For prediction (``need_labels=False``)
    a feature table is read whole when no filelist is given."""
    num_classes = config.model.num_classes
    if config.data.features:
        table = open_feature_table(config.data.features, config.storage)
        inputs = _table_inputs(table, phase, filelist, config, need_labels)
        itemsize = table.itemsize
    else:
        if not filelist:
            raise ConfigError(f"{phase.upper()}.filelist is not set (or set data.features to a feature table)")
        inputs = _npy_inputs(filelist, phase, config)
    bad = _out_of_range(inputs.rows, num_classes) if need_labels else []
    if bad:
        _bad_rows(
            config,
            inputs,
            LABEL_OUT_OF_RANGE,
            [f"{r[S.VIDEO_ID]}: labels {r[S.LABELS]} (MODEL.num_classes {num_classes})" for r in bad],
        )
        dropped = pa.array(sorted({r[S.VIDEO_ID] for r in bad}), pa.string())
        inputs.rows = inputs.rows.filter(pc.invert(pc.is_in(inputs.rows.column(S.VIDEO_ID), dropped)))
    _settle_bad_rows(config, inputs)
    if len(inputs) == 0:
        raise DataError(f"{phase}: no usable videos in {st.redact(inputs.source)} ({inputs.summary()})")
    if inputs.num_segments is not None:
        inputs.nbytes = len(inputs) * inputs.num_segments * inputs.feature_dim * itemsize
    else:
        inputs.nbytes = int(pc.sum(inputs.rows.column(S.STEPS)).as_py() or 0) * inputs.feature_dim * 4
    log.info("%s", inputs.summary())
    return inputs


def _out_of_range(rows: pa.Table, num_classes: int) -> list[dict]:
    flat = pc.list_flatten(rows.column(S.LABELS))
    if len(flat) == 0 or pc.max(flat).as_py() < num_classes:
        return []
    return [r for r in rows.select([S.VIDEO_ID, S.LABELS]).to_pylist() if any(x >= num_classes for x in r[S.LABELS])]


def _bad_rows(config: Config, inputs: FeatureInputs, reason: str, examples: list[str]) -> None:
    """Records rows left out for ``reason``; ``_settle_bad_rows`` then raises or counts them."""
    if examples:
        inputs.bad.setdefault(reason, []).extend(examples)


def _settle_bad_rows(config: Config, inputs: FeatureInputs) -> None:
    if not inputs.bad:
        return
    if config.data.on_bad_row == "error":
        lines = []
        for reason, examples in sorted(inputs.bad.items()):
            lines.append(f"{len(examples)} row(s) with {reason}:")
            lines += [f"  {e}" for e in examples[:5]] + (
                [f"  ... and {len(examples) - 5} more"] if len(examples) > 5 else []
            )
        raise DataError(
            f"{inputs.phase}: rows that cannot be used in {st.redact(inputs.source)}\n" + "\n".join(lines) + "\n"
            "fix them, or set -o data.on_bad_row=skip to leave such rows out (they are counted)"
        )
    for reason, examples in sorted(inputs.bad.items()):
        inputs.skipped[reason] = len(examples)
        log.warning("%s: skipping %d row(s) with %s, e.g. %s", inputs.phase, len(examples), reason, examples[0])


def _table_inputs(
    table: FeatureTable, phase: str, filelist: str | None, config: Config, need_labels: bool
) -> FeatureInputs:
    keys = pa.concat_tables([pq.read_table(f, columns=[S.VIDEO_ID, S.URI], filesystem=table.fs) for f in table.files])
    ids, uris = keys.column(S.VIDEO_ID).to_pylist(), keys.column(S.URI).to_pylist()
    units = [(f, g) for f, groups in zip(table.files, table.row_groups, strict=True) for g in range(groups)]
    inputs = FeatureInputs(
        phase,
        table.uri,
        S.LABEL_SCHEMA.empty_table(),
        table.feature_dim,
        table.num_segments,
        table.provenance,
        table=table.uri,
        table_units=units,
    )
    if not filelist:
        if need_labels:
            raise ConfigError(
                f"{phase.upper()}.filelist must name the labels (a list file or labels table) for the feature table"
            )
        inputs.rows = pa.table({S.VIDEO_ID: ids, S.URI: uris, S.LABELS: [[] for _ in ids]}, schema=S.LABEL_SCHEMA)
        inputs.rows = inputs.rows.append_column(UNIT, pa.array(_units_of(table, np.arange(len(ids))), pa.int32()))
        return inputs
    labels, problems = read_labels(filelist, config.storage)
    inputs.source = f"{table.uri} + {filelist}"
    _bad_rows(config, inputs, BAD_LINE, problems)
    by_id = {v: i for i, v in enumerate(ids)}
    by_uri = {u: i for i, u in enumerate(uris)}
    merged: dict[int, set[int]] = {}
    missing = []
    for row in labels.to_pylist():
        index = by_id.get(row[S.VIDEO_ID]) if row[S.VIDEO_ID] else None
        if index is None and row[S.URI]:
            index = by_uri.get(row[S.URI])
        if index is None:
            missing.append(f"{st.redact(row[S.VIDEO_ID] or row[S.URI])}: not in the feature table")
            continue
        merged.setdefault(index, set()).update(row[S.LABELS])
    _bad_rows(config, inputs, MISSING_FEATURES, missing)
    order = sorted(merged)  # table order: reads stream through the files in order
    inputs.rows = pa.table(
        {
            S.VIDEO_ID: [ids[i] for i in order],
            S.URI: [uris[i] for i in order],
            S.LABELS: [sorted(merged[i]) for i in order],
        },
        schema=S.LABEL_SCHEMA,
    ).append_column(UNIT, pa.array(_units_of(table, np.asarray(order, np.int64)), pa.int32()))
    inputs.unlabelled = len(ids) - len(merged)
    return inputs


def _units_of(table: FeatureTable, rows: np.ndarray) -> np.ndarray:
    """The unit (index into the table's (file, row group) list) of each table row index in ``rows``."""
    sizes = np.asarray([n for groups in table.group_rows for n in groups], np.int64)
    return np.searchsorted(np.cumsum(sizes), rows, side="right")


def _npy_inputs(filelist: str, phase: str, config: Config) -> FeatureInputs:
    """The seed's layout: checks every listed .npy file's header (in parallel on Ray Data)."""
    import ray

    labels, problems = read_labels(filelist, config.storage)
    feature_dim = config.model.feature_dims[0]
    inputs = FeatureInputs(phase, filelist, S.LABEL_SCHEMA.empty_table(), feature_dim, None, None)
    _bad_rows(config, inputs, BAD_LINE, problems)
    rows = labels.append_column(S.PATH, labels.column(S.URI))
    ds = blocks_dataset(_blocks(rows.select([S.VIDEO_ID, S.PATH]), 256))
    checked = ds.map_batches(
        _check_npy, batch_format="pyarrow", fn_kwargs={"storage": config.storage, "feature_dim": feature_dim}
    ).to_arrow_refs()
    status = pa.concat_tables(ray.get(checked)) if checked else pa.table({"status": pa.array([], pa.string())})
    reasons = dict(
        zip(
            status.column(S.PATH).to_pylist(),
            zip(status.column("status").to_pylist(), status.column("detail").to_pylist(), strict=True),
            strict=True,
        )
    )
    steps = dict(zip(status.column(S.PATH).to_pylist(), status.column(S.STEPS).to_pylist(), strict=True))
    good = []
    by_reason: dict[str, list[str]] = collections.defaultdict(list)
    for i, path in enumerate(rows.column(S.PATH).to_pylist()):
        reason, detail = reasons[path]
        if reason == "ok":
            good.append(i)
        else:
            by_reason[reason].append(f"{st.redact(path)}: {detail}")
    for reason, examples in sorted(by_reason.items()):
        _bad_rows(config, inputs, reason, examples)
    rows = rows.append_column(S.STEPS, pa.array([steps[p] for p in rows.column(S.PATH).to_pylist()], pa.int64()))
    rows = rows.take(pa.array(good, pa.int64()))
    inputs.rows = rows.append_column(UNIT, pa.array(np.arange(rows.num_rows), pa.int32()))  # a file each
    return inputs


def _check_npy(batch: pa.Table, storage: StorageSection, feature_dim: int) -> pa.Table:
    statuses, details, steps = [], [], []
    for path in batch.column(S.PATH).to_pylist():
        shape: tuple[int, ...] = ()
        try:
            shape, dtype = _npy_header(path, storage)
        except FileNotFoundError:
            statuses.append(MISSING_FEATURES)
            details.append("file not found")
        except (OSError, ValueError) as exc:
            statuses.append(UNREADABLE)
            details.append(st.redact(f"{type(exc).__name__}: {exc}"))
        else:
            if len(shape) != 2 or shape[0] == 0 or shape[1] != feature_dim or dtype.kind != "f":
                statuses.append(BAD_SHAPE)
                details.append(
                    f"shape {list(shape)} {dtype}, expected [T>0, {feature_dim}] floats (MODEL.feature_dims)"
                )
            else:
                statuses.append("ok")
                details.append("")
        steps.append(int(shape[0]) if len(shape) == 2 else 0)
    return pa.table(
        {S.PATH: batch.column(S.PATH), "status": statuses, "detail": details, S.STEPS: pa.array(steps, pa.int64())}
    )


def _npy_header(path: str, storage: StorageSection) -> tuple[tuple[int, ...], np.dtype]:
    fs, inner = st.filesystem(path, storage)
    if fs.get_file_info(inner).type != pafs.FileType.File:
        raise FileNotFoundError(path)
    with fs.open_input_file(inner) as f:
        head = io.BytesIO(f.read(4096))
    version = np.lib.format.read_magic(head)
    reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = reader(head)
    return tuple(shape), np.dtype(dtype)


def _blocks(table: pa.Table, rows: int) -> list[pa.Table]:
    return [table.slice(i, rows) for i in range(0, max(table.num_rows, 1), rows)] if table.num_rows else [table]


# --- datasets --------------------------------------------------------------------------------


def make_dataset(inputs: FeatureInputs, config: Config, with_targets: bool = True, task_cpus: float = 1.0):
    """A Ray Dataset of all the planned rows, in table (or list) order, as numpy batches of
    ``video_id``, ``features`` ((T, D) per row, as stored), ``length`` and, with targets,
    ``targets`` (multi-hot uint8 over MODEL.num_classes), for evaluation and prediction. Each read
    task reserves ``task_cpus`` (sized with the model stage that consumes the rows). Training reads
    per worker instead (``epoch_rows``, ``unit_blocks``, ``load_rows``)."""
    ds = _dataset(inputs, config, with_targets, task_cpus)
    ds.context.execution_options.preserve_order = True  # blocks in input order, whichever task finishes first
    return ds


def _dataset(inputs: FeatureInputs, config: Config, with_targets: bool, task_cpus: float):

    num_classes = config.model.num_classes
    index = {
        "ids": inputs.rows.column(S.VIDEO_ID).combine_chunks(),
        "labels": inputs.rows.column(S.LABELS).combine_chunks(),
    }
    kwargs = {"num_classes": num_classes, "with_targets": with_targets}
    if inputs.table_units:
        units = pa.table({S.PATH: [u[0] for u in inputs.table_units], "row_group": [u[1] for u in inputs.table_units]})
        ds = blocks_dataset(_blocks(units, 1))  # one read task per row group, in table order
        return ds.map_batches(
            _table_rows,
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=task_cpus,
            fn_kwargs={"table": inputs.table, "storage": config.storage, "index": index, **kwargs},
        )
    rows = inputs.rows.select([S.VIDEO_ID, S.PATH, S.LABELS])
    ds = blocks_dataset(_blocks(rows, ROWS_PER_BLOCK))
    return ds.map_batches(
        _npy_rows,
        batch_size=ROWS_PER_BLOCK,
        batch_format="pyarrow",
        num_cpus=task_cpus,
        fn_kwargs={"storage": config.storage, **kwargs},
    )


def _targets(labels: pa.ListArray, num_classes: int) -> np.ndarray:
    counts = pc.fill_null(pc.list_value_length(labels), 0).to_numpy(zero_copy_only=False)
    values = pc.list_flatten(labels).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros((len(labels), num_classes), dtype=np.uint8)
    out[np.repeat(np.arange(len(labels)), counts), values] = 1
    return out


def _table_rows(unit: pa.Table, table: str, storage: StorageSection, index: dict, num_classes: int, with_targets: bool):
    """Reads one row group of the feature table in slices of READ_ROWS rows, keeping the planned rows."""
    fs, _ = st.filesystem(table, storage)
    path, group = unit.column(S.PATH)[0].as_py(), unit.column("row_group")[0].as_py()
    with fs.open_input_file(path) as f:
        for batch in pq.ParquetFile(f).iter_batches(
            batch_size=READ_ROWS, row_groups=[group], columns=[S.VIDEO_ID, S.FEATURES]
        ):
            pos = pc.index_in(batch.column(S.VIDEO_ID), value_set=index["ids"])
            keep = pc.is_valid(pos)
            if not pc.any(keep).as_py():
                continue
            batch, pos = batch.filter(keep), pos.filter(keep)
            feats = batch.column(S.FEATURES).to_numpy_ndarray()  # (N, T, D)
            out = {
                S.VIDEO_ID: np.asarray(batch.column(S.VIDEO_ID).to_pylist(), dtype=object),
                S.FEATURES: feats,
                S.LENGTH: np.full(len(feats), feats.shape[1], dtype=np.int32),
            }
            if with_targets:
                out[S.TARGETS] = _targets(index["labels"].take(pos.cast(pa.int64())), num_classes)
            yield out


def _npy_rows(batch: pa.Table, storage: StorageSection, num_classes: int, with_targets: bool) -> dict[str, np.ndarray]:
    feats = []
    for path in batch.column(S.PATH).to_pylist():
        fs, inner = st.filesystem(path, storage)
        with fs.open_input_file(inner) as f:
            feats.append(np.load(io.BytesIO(f.read()), allow_pickle=False).astype(np.float32, copy=False))
    ragged = np.empty(len(feats), dtype=object)
    ragged[:] = feats
    out = {
        S.VIDEO_ID: np.asarray(batch.column(S.VIDEO_ID).to_pylist(), dtype=object),
        S.FEATURES: ragged,
        S.LENGTH: np.asarray([len(a) for a in feats], dtype=np.int32),
    }
    if with_targets:
        out[S.TARGETS] = _targets(batch.column(S.LABELS).combine_chunks(), num_classes)
    return out


# --- training: each worker's rows of an epoch ---------------------------------------------------


def epoch_rows(rows: pa.Table, seed: int, epoch: int, rank: int, world: int) -> pa.Table:
    """A worker's share of the planned ``rows`` in ``epoch``: the units (row groups of the table,
    or .npy files) in an order drawn from (seed, epoch), each unit's rows together in table order,
    and each worker a contiguous ``len(rows) // world`` of them. It depends on nothing else, so a
    restarted worker reads what it read before."""
    units = rows.column(UNIT).to_numpy()
    if not len(units):
        return rows
    present = np.unique(units)
    place = np.zeros(int(present.max()) + 1, np.int64)
    place[present[np.random.default_rng([seed, epoch]).permutation(len(present))]] = np.arange(len(present))
    order = np.lexsort((np.arange(len(units)), place[units]))
    per = len(units) // world
    return rows.take(pa.array(order[rank * per : (rank + 1) * per]))


def unit_blocks(rows: pa.Table, inputs: FeatureInputs) -> list[pa.Table]:
    """Planned rows (in the order a worker takes them) as read tasks' blocks: a table's rows a run
    of one unit at a time, with the unit's file and row group; .npy files ``ROWS_PER_BLOCK`` at a time."""
    if not inputs.table_units:
        return _blocks(rows.select([S.VIDEO_ID, S.PATH, S.LABELS]), ROWS_PER_BLOCK)
    units = rows.column(UNIT).to_numpy()
    bounds = np.flatnonzero(np.r_[True, units[1:] != units[:-1], True]) if len(units) else np.array([0])
    blocks = []
    for lo, hi in itertools.pairwise(bounds):
        path, group = inputs.table_units[int(units[lo])]
        block = rows.slice(lo, hi - lo).select([S.VIDEO_ID, S.LABELS, UNIT])
        blocks.append(
            block.append_column(S.PATH, pa.array([path] * block.num_rows)).append_column(
                "row_group", pa.array([group] * block.num_rows, pa.int32())
            )
        )
    return blocks


def load_rows(
    block: pa.Table, table: str | None, storage: StorageSection, num_classes: int, cache: list | None = None
) -> dict[str, np.ndarray]:
    """A block of planned rows (``unit_blocks``) -> numpy ``video_id``, ``features``, ``length``,
    ``targets``, in the block's order: from the table's row group (or its copy in Ray's object
    store, ``cache``), or from the .npy files."""
    if table is None:
        return _npy_rows(block, storage, num_classes, with_targets=True)
    import ray

    ids = block.column(S.VIDEO_ID)
    if cache is not None:
        part = ray.get(cache[block.column(UNIT)[0].as_py()])
    else:
        fs, _ = st.filesystem(table, storage)
        path, group = block.column(S.PATH)[0].as_py(), block.column("row_group")[0].as_py()
        with fs.open_input_file(path) as f:
            part = pq.ParquetFile(f).read_row_group(group, columns=[S.VIDEO_ID, S.FEATURES])
    part = part.take(pc.index_in(ids, value_set=part.column(S.VIDEO_ID)))  # the block's rows, in its order
    feats = part.column(S.FEATURES).combine_chunks().to_numpy_ndarray()
    return {
        S.VIDEO_ID: np.asarray(ids.to_pylist(), dtype=object),
        S.FEATURES: feats,
        S.LENGTH: np.full(len(feats), feats.shape[1], dtype=np.int32),
        S.TARGETS: _targets(block.column(S.LABELS).combine_chunks(), num_classes),
    }


def cache_units(inputs: FeatureInputs, config: Config, task_cpus: float) -> list | None:
    """With a feature table whose planned features fit ``data.cache_mb``: each unit's planned rows
    read once, by Ray tasks, into Ray's object store (a list of refs by unit, None for units
    without planned rows), so that the epochs after the first read no storage. None otherwise."""
    if not inputs.table or inputs.nbytes > config.data.cache_mb * 2**20:
        return None
    import ray

    read = ray.remote(_read_unit).options(num_cpus=task_cpus)
    units = inputs.rows.column(UNIT).to_numpy()
    ids = inputs.rows.column(S.VIDEO_ID)
    refs: list = [None] * len(inputs.table_units)
    for unit in np.unique(units):
        path, group = inputs.table_units[int(unit)]
        refs[int(unit)] = read.remote(inputs.table, config.storage, path, group, ids.filter(pa.array(units == unit)))
    return refs


def _read_unit(table: str, storage: StorageSection, path: str, group: int, ids: pa.Array) -> pa.Table:
    fs, _ = st.filesystem(table, storage)
    with fs.open_input_file(path) as f:
        part = pq.ParquetFile(f).read_row_group(group, columns=[S.VIDEO_ID, S.FEATURES])
    return part.filter(pc.is_in(part.column(S.VIDEO_ID), value_set=ids))


def collate(batch: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """A numpy batch -> padded float32 features (B, T, D), lengths (B,) int64, float32 targets."""
    feats = batch[S.FEATURES]
    lengths = np.asarray(batch[S.LENGTH], dtype=np.int64)
    if isinstance(feats, np.ndarray) and feats.dtype != object and feats.ndim == 3:
        x = feats.astype(np.float32, copy=False)
    else:
        rows = list(feats)
        x = np.zeros((len(rows), int(lengths.max()), rows[0].shape[-1]), dtype=np.float32)
        for i, row in enumerate(rows):
            x[i, : len(row)] = row
    targets = batch.get(S.TARGETS)
    return x, lengths, None if targets is None else np.asarray(targets, dtype=np.float32)
