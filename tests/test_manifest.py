import hashlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import SEED
from vtplatform import schema as S
from vtplatform.config import ConfigError, StorageSection
from vtplatform.manifest import parse_list_line, read_manifest

STORAGE = StorageSection()


def _ids(manifest):
    return manifest.entries.column(S.URI).to_pylist()


def test_seed_list_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    m = read_manifest(str(SEED / "lists" / "TsnExtractor.list"), STORAGE)
    assert _ids(m) == [str(tmp_path / f"data/mp4/{i}.mp4") for i in range(1, 6)]  # relative to the working dir
    m = read_manifest(str(SEED / "lists" / "dataset__attention_lstm__train.list.example"), STORAGE)
    assert m.entries.column(S.LABELS).to_pylist() == [[0, 3, 4], [1], [2], [3, 4], [4]]  # trailing spaces allowed


def test_malformed_lines_duplicates_and_schemes(tmp_path):
    lst = tmp_path / "videos.list"
    lst.write_bytes(
        b"# a comment\n"
        b"/v/a.mp4\n"
        b"\n"
        b"/v/a.mp4\n"  # exact duplicate
        b"/v/b.mp4 notalabel\n"  # not a label: one path with a space in it
        b"/v/c.mp4 -1\n"  # -1 is not a label either
        b"http://example.com/d.mp4\n"
        b"/v/\xff\xfe.mp4\n"
        b"/v/nul\x00.mp4 2\n"
        b"s3://bucket-only\n"
        b"/v/e.mp4 3\r\n"
    )
    m = read_manifest(str(lst), STORAGE)
    assert _ids(m) == ["/v/a.mp4", "/v/b.mp4 notalabel", "/v/c.mp4 -1", "/v/e.mp4"]
    assert m.entries.column(S.LABELS).to_pylist() == [[], [], [], [3]]
    assert m.duplicates == 1
    kinds = sorted(r[S.ERROR_TYPE] for r in m.rejected)
    assert kinds == [
        "ManifestParseError",
        "ManifestParseError",
        "UnsupportedURI",
        "UnsupportedURI",
    ]
    messages = " ".join(r[S.MESSAGE] for r in m.rejected)
    assert "line 8 is not valid UTF-8" in messages and "line 9: line contains a NUL byte" in messages
    assert all(r[S.STAGE] == "manifest" and "line" in r[S.MESSAGE] for r in m.rejected)
    assert len({r[S.VIDEO_ID] for r in m.rejected}) == 4


def test_directory_and_glob(tmp_path):
    for rel in ["x/a.mp4", "x/b.MKV", "x/sub/c.webm", "x/notes.txt", "y/d.mp4"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"0")
    assert _ids(read_manifest(str(tmp_path / "x"), STORAGE)) == [
        str(tmp_path / p) for p in ["x/a.mp4", "x/b.MKV", "x/sub/c.webm"]
    ]
    assert _ids(read_manifest(str(tmp_path / "*" / "*.mp4"), STORAGE)) == [
        str(tmp_path / "x/a.mp4"),
        str(tmp_path / "y/d.mp4"),
    ]


def test_tables_with_uri_video_id_and_labels(tmp_path):
    table = pa.table(
        {
            "uri": ["/v/a.mp4", "/v/b.mp4", None, "/v/c.mp4"],
            "video_id": ["A", "B", "C", "A"],
            "labels": [[1, 2], [3], [], [4]],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    m = read_manifest(str(tmp_path / "m.parquet"), STORAGE)
    assert m.entries.column(S.VIDEO_ID).to_pylist() == ["A", "B"]
    assert {r[S.ERROR_TYPE] for r in m.rejected} == {
        "ManifestParseError",
        "DuplicateVideoId",
    }  # empty uri; A claimed twice
    (tmp_path / "m.csv").write_text("uri,labels\n/v/a.mp4,1 2\n/v/b.mp4,\n/v/c.mp4,x\n")
    m = read_manifest(str(tmp_path / "m.csv"), STORAGE)
    assert m.entries.column(S.LABELS).to_pylist() == [[1, 2], []]
    assert [r[S.ERROR_TYPE] for r in m.rejected] == ["ManifestParseError"]
    pq.write_table(pa.table({"path": ["/v/a.mp4"]}), tmp_path / "nouri.parquet")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        read_manifest(str(tmp_path / "nouri.parquet"), STORAGE)


def test_missing_or_empty_manifest(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        read_manifest(str(tmp_path / "nope.list"), STORAGE)
    (tmp_path / "empty.list").write_text("\n# nothing\n")
    with pytest.raises(ConfigError, match="lists no videos"):
        read_manifest(str(tmp_path / "empty.list"), STORAGE)


def test_parse_list_line():
    assert parse_list_line("a.mp4 1 2") == ("a.mp4", [1, 2])
    assert parse_list_line("/lib/видео 测试 clip.mp4") == ("/lib/видео 测试 clip.mp4", [])
    assert parse_list_line("/lib/a  b.mp4 3 7") == ("/lib/a  b.mp4", [3, 7])  # the double space is kept
    assert parse_list_line("/lib/clip -1") == ("/lib/clip -1", [])  # -1 is not a label
    assert parse_list_line("/lib/2019 12") == ("/lib/2019", [12])  # a trailing number is a label
    assert parse_list_line("\t/lib/tab\there.mp4\t4 \t5  \r") == ("/lib/tab\there.mp4", [4, 5])
    assert parse_list_line("a.mp4 b") == ("a.mp4 b", [])
    assert parse_list_line("a 1 b 2") == ("a 1 b", [2])  # only the trailing integers are labels
    assert parse_list_line("12 3 4") == ("12", [3, 4])  # all integers: the first is the path
    assert parse_list_line("007") == ("007", [])
    assert parse_list_line("x.mp4 007") == ("x.mp4", [7])
    with pytest.raises(ValueError, match="NUL"):
        parse_list_line("a\x00.mp4 1")
    with pytest.raises(ValueError, match="empty"):
        parse_list_line(" \t ")


def test_real_files_with_spaces_tabs_and_unicode_in_their_names(tmp_path):
    lib = tmp_path / "lib"
    lib.mkdir()
    names = ["видео 测试 clip.mp4", "a  b.mp4", "tab\there.mp4", "take -1"]
    for i, name in enumerate(names):
        (lib / name).write_bytes(f"video {i}".encode())
    lst = tmp_path / "videos.list"
    lines = [f"{lib / names[0]}", f"{lib / names[1]} 3 7", f"{lib / names[2]}\t5", f"{lib / names[3]} 4"]
    lst.write_text("\n".join(lines) + "\n", encoding="utf-8")
    m = read_manifest(str(lst), STORAGE)
    uris = _ids(m)
    assert uris == [str(lib / n) for n in names]
    assert [Path(u).read_bytes() for u in uris] == [f"video {i}".encode() for i in range(4)]  # the real files
    assert m.entries.column(S.LABELS).to_pylist() == [[], [3, 7], [5], [4]]
    readable = ["clip", "a_b", "tab_here", "take_-1"]  # the ASCII part of each stem
    expected_ids = [f"{r}-{hashlib.sha1(u.encode()).hexdigest()[:12]}" for r, u in zip(readable, uris, strict=True)]
    assert m.entries.column(S.VIDEO_ID).to_pylist() == expected_ids
    assert not m.rejected
