"""Manifests: which videos a job processes.

A manifest is one of
* a seed list file: one path or URI per line, optional integer labels after it
  (``TsnExtractor.list``, ``train.list``); blank lines and ``#`` comments are skipped; a path may
  contain spaces and tabs: the trailing integer tokens are the labels (``parse_list_line``);
* a directory or a glob (local or ``s3://``): every video file under it;
* a Parquet or CSV table with a ``uri`` column (optional ``video_id`` and ``labels``).

Entries that cannot be used (a line with a NUL byte or invalid UTF-8, an unsupported scheme, a
video_id claimed by two URIs) come back as dead-letter rows; exact duplicates are collapsed and
counted.
"""

from __future__ import annotations

import fnmatch
import io
import logging
import os
import re
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection
from vtplatform.storage import canonical_uri, derive_video_id, filesystem, is_s3, list_s3, redact

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    ".mp4", ".avi", ".mkv", ".mov", ".webm", ".flv", ".m4v", ".mpg", ".mpeg", ".wmv", ".ts", ".3gp", ".ogv", ".mts", ".m2ts",
)  # fmt: skip
TABLE_EXTENSIONS = (".parquet", ".csv")


@dataclass
class Manifest:
    entries: pa.Table  # MANIFEST_SCHEMA, unique video_id
    rejected: list[dict] = field(default_factory=list)  # dead-letter rows (stage "manifest")
    duplicates: int = 0  # exact repeats collapsed into one entry

    def __len__(self) -> int:
        return self.entries.num_rows


def read_manifest(source: str, storage: StorageSection) -> Manifest:
    """Reads any manifest form; raises ``ConfigError`` if ``source`` does not exist or is empty."""
    fs, path = filesystem(source, storage)
    if _has_glob(source):
        rows, rejected = _from_paths(_glob(fs, source, storage)), []
    else:
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.NotFound:
            raise ConfigError(f"manifest not found: {redact(source)}")
        if info.type == pafs.FileType.Directory:
            rows, rejected = _from_paths(_list_videos(fs, path, is_s3(source), storage)), []
        elif path.lower().endswith(TABLE_EXTENSIONS):
            rows, rejected = _from_table(fs, path)
        else:
            with fs.open_input_stream(path) as f:
                rows, rejected = _from_list(f.read())
    manifest = _dedupe(rows, rejected)
    if len(manifest) == 0 and not manifest.rejected:
        raise ConfigError(f"manifest {redact(source)} lists no videos")
    return manifest


_TOKEN = re.compile(r"[^ \t]+")  # list-line tokens: separated by any run of spaces or tabs
_LABEL = re.compile(r"[0-9]+")  # a label token: a non-negative integer (ASCII digits)
_LINE_ENDS = " \t\r\n\v\f"


def parse_list_line(line: str) -> tuple[str, list[int]]:
    """``"PATH [LABEL ...]"`` -> (PATH, [LABEL, ...]), for names with spaces too.

    The trailing tokens that are non-negative integers are the labels; the path is the rest of
    the line, its inner spaces and tabs kept as written (only the line's own leading and
    trailing whitespace is dropped). A line of integers only is a path followed by labels; a
    token such as ``-1`` or ``x`` is not a label, so it stays part of the path. A name whose last
    word is a number is ambiguous (``/lib/2019 12`` reads as ``/lib/2019``, label 12): a
    Parquet/CSV manifest with a ``uri`` column is the unambiguous form. Raises ValueError with
    the reason (a NUL byte, an empty line)."""
    if "\x00" in line:
        raise ValueError("line contains a NUL byte")
    text = line.strip(_LINE_ENDS)
    tokens = list(_TOKEN.finditer(text))
    if not tokens:
        raise ValueError("empty line")
    first_label = len(tokens)
    while first_label > 1 and _LABEL.fullmatch(tokens[first_label - 1].group()):
        first_label -= 1
    path = text[: tokens[first_label - 1].end()]
    return path, [int(t.group()) for t in tokens[first_label:]]


class _Columns:
    """Manifest rows gathered column by column: a dict per row would cost about half a KB each,
    and a manifest may have millions of rows."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.uris: list[str] = []
        self.labels: list = []
        self.sizes: list[int | None] = []

    def add(self, uri: str, labels: list[int] | None = None, video_id: str | None = None, size: int | None = None):
        uri = canonical_uri(uri)
        self.ids.append(video_id or derive_video_id(uri))
        self.uris.append(uri)
        self.labels.append(labels or ())  # one shared empty tuple for the many rows without labels
        self.sizes.append(size)


def rejected_entry(raw: str, error_type: str, message: str, video_id: str | None = None) -> dict:
    """The dead-letter row of a manifest or list entry that cannot be used (stage ``manifest``)."""
    raw = redact(raw)
    return {S.VIDEO_ID: video_id or f"manifest-{derive_video_id(raw)}", S.URI: raw} | S.failure(
        "manifest", error_type, redact(message)
    )


def _check_scheme(uri: str) -> str | None:
    if "://" in uri and not uri.startswith(("s3://", "file://")):
        return f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://"
    if uri.startswith("s3://") and not uri[5:].partition("/")[2].strip("/"):
        return f"{uri!r} names no object"
    return None


def _from_list(data: bytes) -> tuple[_Columns, list[dict]]:
    rows, rejected = _Columns(), []
    for number, raw in enumerate(io.BytesIO(data), start=1):
        raw = raw.rstrip(b"\n")
        try:
            line = raw.decode("utf-8").rstrip("\r")
        except UnicodeDecodeError:
            text = raw.decode("utf-8", errors="replace")
            rejected.append(rejected_entry(text, "ManifestParseError", f"line {number} is not valid UTF-8"))
            continue
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            uri, labels = parse_list_line(line)
        except ValueError as exc:
            rejected.append(rejected_entry(line.strip(), "ManifestParseError", f"line {number}: {exc}"))
            continue
        problem = _check_scheme(uri)
        if problem:
            rejected.append(rejected_entry(uri, "UnsupportedURI", f"line {number}: {problem}"))
            continue
        rows.add(uri, labels)
    return rows, rejected


def _from_table(fs: pafs.FileSystem, path: str) -> tuple[_Columns, list[dict]]:
    if path.lower().endswith(".csv"):
        with fs.open_input_stream(path) as f:
            table = pacsv.read_csv(
                f, convert_options=pacsv.ConvertOptions(column_types={S.URI: pa.string(), S.VIDEO_ID: pa.string()})
            )
    else:
        table = pq.read_table(path, filesystem=fs)
    if S.URI not in table.column_names:
        raise ConfigError(f"manifest table {path} has no '{S.URI}' column (columns: {table.column_names})")
    uris = table.column(S.URI).to_pylist()
    ids = table.column(S.VIDEO_ID).to_pylist() if S.VIDEO_ID in table.column_names else [None] * len(uris)
    labels = table.column(S.LABELS).to_pylist() if S.LABELS in table.column_names else [None] * len(uris)
    del table
    rows, rejected = _Columns(), []
    for number, (uri, video_id, label) in enumerate(zip(uris, ids, labels, strict=True), start=1):
        if not uri or not str(uri).strip():
            rejected.append(rejected_entry(f"row {number}", "ManifestParseError", f"row {number}: empty uri", video_id))
            continue
        problem = _check_scheme(uri)
        if problem:
            rejected.append(rejected_entry(uri, "UnsupportedURI", f"row {number}: {problem}", video_id))
            continue
        try:
            parsed = _parse_labels(label)
        except ValueError as exc:
            rejected.append(rejected_entry(uri, "ManifestParseError", f"row {number}: {exc}", video_id))
            continue
        rows.add(uri.strip(), parsed, video_id)
    return rows, rejected


def _parse_labels(value) -> list[int]:
    """Labels in a table: a list of ints, one int, or a space/comma-separated string."""
    if value is None:
        return []
    if isinstance(value, str):
        tokens = value.replace(",", " ").split()
    elif isinstance(value, (list, tuple)):
        tokens = value
    else:
        tokens = [value]
    labels = []
    for token in tokens:
        if isinstance(token, float) and not token.is_integer():
            raise ValueError(f"labels must be integers, got {value!r}")
        try:
            labels.append(int(token))
        except (TypeError, ValueError):
            raise ValueError(f"labels must be integers, got {value!r}") from None
    if any(label < 0 for label in labels):
        raise ValueError(f"labels must be >= 0, got {labels}")
    return labels


def _from_paths(files: list[tuple[str, int]]) -> _Columns:
    rows = _Columns()
    for uri, size in files:
        rows.add(uri, size=size)
    return rows


def _has_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def _list_videos(fs: pafs.FileSystem, path: str, s3: bool, storage: StorageSection) -> list[tuple[str, int]]:
    """(path or URI, size) of every video file under a folder or prefix."""
    return _listing(fs, path, s3, storage, lambda p: p.lower().endswith(VIDEO_EXTENSIONS))


def _glob(fs: pafs.FileSystem, source: str, storage: StorageSection) -> list[tuple[str, int]]:
    s3 = is_s3(source)
    pattern = canonical_uri(source)[5:] if s3 else canonical_uri(source)
    base = pattern
    while _has_glob(base):
        base = os.path.dirname(base)
    if not s3 and fs.get_file_info(base).type != pafs.FileType.Directory:
        return []
    return _listing(fs, base, s3, storage, lambda p: fnmatch.fnmatchcase(p, pattern))


def _listing(fs: pafs.FileSystem, base: str, s3: bool, storage: StorageSection, keep) -> list[tuple[str, int]]:
    """The files under ``base`` that ``keep`` accepts, sorted; an S3 prefix is listed a page of
    1,000 keys at a time, keeping only the matches of each page."""
    if s3:
        found = [(f"s3://{p}", size) for page in list_s3(base, storage) for p, size in page if keep(p)]
    else:
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True))
        found = [(i.path, i.size) for i in infos if i.type == pafs.FileType.File and keep(i.path)]
    return sorted(found)


def _dedupe(rows: _Columns, rejected: list[dict]) -> Manifest:
    """One entry per video_id, in first-seen order: a repeat of the same URI is collapsed and
    counted; another URI claiming a taken video_id is a dead letter. Vectorized: the driver's
    memory per entry stays that of the Arrow columns."""
    table = pa.table(
        {
            S.VIDEO_ID: pa.array(rows.ids, pa.string()),
            S.URI: pa.array(rows.uris, pa.string()),
            S.LABELS: pa.array(rows.labels, pa.list_(pa.int32())),
            S.SIZE_BYTES: pa.array(rows.sizes, pa.int64()),
        }
    ).cast(S.MANIFEST_SCHEMA)
    rows.ids = rows.uris = rows.labels = rows.sizes = []
    codes = pc.dictionary_encode(table.column(S.VIDEO_ID).combine_chunks()).indices.to_numpy()  # first seen: 0, ...
    _, first = np.unique(codes, return_index=True)
    duplicates = 0
    if len(first) < len(codes):
        keep = np.zeros(len(codes), bool)
        keep[first] = True
        repeats = np.flatnonzero(~keep)
        uris = table.column(S.URI)
        firsts = first[codes[repeats]]
        same = pc.equal(uris.take(pa.array(repeats)), uris.take(pa.array(firsts))).to_numpy(zero_copy_only=False)
        duplicates = int(same.sum())
        for row, owner in zip(repeats[~same].tolist(), firsts[~same].tolist(), strict=True):
            vid, uri, taken = table.column(S.VIDEO_ID)[row].as_py(), uris[row].as_py(), uris[owner].as_py()
            rejected.append(
                rejected_entry(
                    uri,
                    "DuplicateVideoId",
                    f"video_id {vid!r} already belongs to {taken!r}",
                    f"{vid}@{derive_video_id(uri)}",
                )
            )
        table = table.take(pa.array(np.sort(first)))
    if duplicates:
        log.warning("manifest: %d duplicate entries collapsed (each video is processed once)", duplicates)
    return Manifest(table, rejected, duplicates)
