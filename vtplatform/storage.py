"""Where bytes live: local paths, ``file://`` and ``s3://`` URIs, through pyarrow filesystems.

S3-compatible stores are reached through ``storage.endpoint_url`` or the standard
``AWS_ENDPOINT_URL`` variable (pyarrow itself ignores it). Credentials come from the standard
AWS environment and are scrubbed from every message we log or write (``redact``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vtplatform.config import ConfigError, StorageSection

log = logging.getLogger(__name__)

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")
_USERINFO = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]+@")
_AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[A-Z0-9]{16}\b")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def canonical_uri(path_or_uri: str) -> str:
    """``s3://bucket/key`` as given (slashes collapsed); local paths and ``file://`` URIs as an
    absolute, normalised local path."""
    if is_s3(path_or_uri):
        bucket, _, key = path_or_uri[5:].partition("/")
        return "s3://" + bucket + "/" + "/".join(part for part in key.split("/") if part)
    if path_or_uri.startswith("file://"):
        path_or_uri = urlparse(path_or_uri).path
    return os.path.normpath(os.path.abspath(path_or_uri))


def derive_video_id(uri: str) -> str:
    """A stable id from the canonical URI: the readable stem plus 12 hex digits of its sha1, so
    ``a/clip.mp4`` and ``b/clip.mp4`` never collide, and ``.webm`` or dotted names stay whole."""
    canonical = canonical_uri(uri)
    stem = os.path.splitext(os.path.basename(canonical.rstrip("/")))[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._")[:64] or "video"
    return f"{stem}-{hashlib.sha1(canonical.encode()).hexdigest()[:12]}"


def safe_filename(video_id: str) -> str:
    """``video_id`` itself when it is a plain file name; otherwise a readable, collision-free one
    (ids from a manifest table may contain ``/`` or ``..``)."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}", video_id):
        return video_id
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", video_id).strip("._")[:64] or "video"
    return f"{readable}-{hashlib.sha1(video_id.encode()).hexdigest()[:12]}"


def endpoint_url(storage: StorageSection) -> str | None:
    return storage.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def resolve_storage(storage: StorageSection) -> StorageSection:
    """The storage section with the environment's endpoint and region filled in.

    Drivers call this once: Ray workers do not inherit the driver's environment, so the
    resolved values travel to them inside the config."""
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return dataclasses.replace(storage, endpoint_url=endpoint_url(storage), region=region)


def filesystem(uri: str, storage: StorageSection) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path inside it) for a local path, ``file://`` or ``s3://`` URI."""
    if is_s3(uri):
        return s3_filesystem(storage), canonical_uri(uri)[5:]
    if "://" in uri and not uri.startswith("file://"):
        raise ConfigError(f"unsupported URI scheme in {redact(uri)!r}: use a local path, file:// or s3://")
    return pafs.LocalFileSystem(), canonical_uri(uri)


def s3_filesystem(storage: StorageSection) -> pafs.S3FileSystem:
    kwargs: dict = {
        "region": storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    }
    endpoint = endpoint_url(storage)
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        kwargs["endpoint_override"] = parsed.netloc
        kwargs["scheme"] = parsed.scheme
    return pafs.S3FileSystem(**kwargs)


def list_s3(prefix: str, storage: StorageSection) -> Iterator[list[tuple[str, int]]]:
    """Pages of ("bucket/key", size) under ``bucket/prefix``, 1,000 keys a page as S3 returns
    them, so that a prefix of millions of videos is never held as one list of listing objects."""
    import botocore.exceptions
    import botocore.session

    bucket, _, key_prefix = prefix.partition("/")
    key_prefix = key_prefix.rstrip("/") + "/" if key_prefix else ""
    region = storage.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    endpoint = endpoint_url(storage)
    if endpoint and "://" not in endpoint:
        endpoint = f"https://{endpoint}"
    client = botocore.session.get_session().create_client("s3", endpoint_url=endpoint or None, region_name=region)
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix):
            keys = page.get("Contents", ())
            yield [(f"{bucket}/{o['Key']}", int(o["Size"])) for o in keys if not o["Key"].endswith("/")]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        raise OSError(f"cannot list s3://{prefix}: {exc}") from exc


def redact(text: str) -> str:
    """Removes credentials (the AWS secret values from the environment, access key ids, and
    ``user:password@`` in URLs) from a message before it is logged or stored."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    return _AWS_KEY_ID.sub("***", text)


@contextlib.contextmanager
def local_copy(uri: str, storage: StorageSection, chunk_bytes: int = 8 << 20) -> Iterator[str]:
    """Yields a local path for ``uri``: the file itself, or a temporary copy streamed from S3
    (never held in memory whole), removed afterwards."""
    if not is_s3(uri):
        yield canonical_uri(uri)
        return
    fs, path = filesystem(uri, storage)
    suffix = os.path.splitext(path)[1]
    with tempfile.NamedTemporaryFile(suffix=suffix, prefix="vtp-") as tmp:
        with fs.open_input_stream(path) as src:
            while chunk := src.read(chunk_bytes):
                tmp.write(chunk)
        tmp.flush()
        yield tmp.name


def check_writable(fs: pafs.FileSystem, root: str, uri: str) -> None:
    """Fails early, with a clear message, when the output location cannot be written."""
    probe = f"{root}/_vtp_write_probe"
    try:
        write_bytes(b"ok", fs, probe)
        fs.delete_file(probe)
    except OSError as exc:
        raise ConfigError(f"cannot write to {redact(uri)}: {redact(str(exc))}") from exc


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def list_files(fs: pafs.FileSystem, directory: str, suffix: str = "") -> list[str]:
    """Files under ``directory`` (recursively), sorted, skipping ``_``/``.`` names as pyarrow does."""
    if not exists(fs, directory):
        return []
    infos = fs.get_file_info(pafs.FileSelector(directory, recursive=True))
    names = [
        i.path
        for i in infos
        if i.type == pafs.FileType.File and i.path.endswith(suffix) and not i.base_name.startswith(("_", "."))
    ]
    return sorted(names)


def part_name(keys: Sequence[str], prefix: str = "part") -> str:
    """A part file's name from the keys of its rows (video ids): a rewrite of the same rows
    replaces the file instead of adding one."""
    digest = hashlib.sha1("\n".join(sorted(keys)).encode()).hexdigest()[:20]
    return f"{prefix}-{digest}.parquet"


def write_parquet(table: pa.Table, fs: pafs.FileSystem, path: str) -> None:
    """Writes atomically: readers see the whole file or none of it. Local files go through a
    temporary name and a rename; an S3 object only appears once its upload completes. Tensor
    and list columns are written without dictionary encoding (``dictionary_columns``)."""
    options = {"use_dictionary": dictionary_columns(table.schema)}
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _local_tmp(path)
        pq.write_table(table, tmp, filesystem=fs, **options)
        os.replace(tmp, path)
    else:  # object stores have no folders to create
        pq.write_table(table, path, filesystem=fs, **options)


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth dictionary encoding in Parquet: all but tensors and lists. A float16
    feature tensor has few distinct values, so Parquet would dictionary-encode its 600,000
    values a row, and reading them back then runs at about 60 MB/s instead of 300 (a training
    worker streaming the table would wait on it); without it the files are about 6% larger."""
    nested = (pa.types.is_list, pa.types.is_large_list, pa.types.is_fixed_size_list)
    return [
        f.name
        for f in schema
        if not isinstance(f.type, pa.ExtensionType) and not any(check(f.type) for check in nested)
    ]


def _local_tmp(path: str) -> str:
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    return os.path.join(parent, f".tmp-{uuid.uuid4().hex}")


def write_bytes(data: bytes, fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        tmp = _local_tmp(path)
        Path(tmp).write_bytes(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as f:
            f.write(data)


def read_column(fs: pafs.FileSystem, directory: str, column: str) -> pa.ChunkedArray:
    """One column of every Parquet file under ``directory`` (an empty array when there are none)."""
    files = list_files(fs, directory, ".parquet")
    if not files:
        return pa.chunked_array([], type=pa.string())
    chunks = [pq.read_table(f, columns=[column], filesystem=fs).column(column) for f in files]
    return pa.chunked_array([c for chunk in chunks for c in chunk.chunks], type=chunks[0].type)


def remove_tree(fs: pafs.FileSystem, path: str) -> None:
    if isinstance(fs, pafs.LocalFileSystem):
        shutil.rmtree(path, ignore_errors=True)
    elif exists(fs, path):
        fs.delete_dir(path)
