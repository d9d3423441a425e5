from vtplatform.storage import canonical_uri, derive_video_id, redact, safe_filename


def test_canonical_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert canonical_uri("a/../b/c.mp4") == str(tmp_path / "b" / "c.mp4")
    assert canonical_uri(f"file://{tmp_path}/x.mp4") == str(tmp_path / "x.mp4")
    assert canonical_uri("s3://bucket//dir///x.mp4") == "s3://bucket/dir/x.mp4"


def test_video_ids_are_stable_unique_and_readable(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a, b = derive_video_id("a/clip.mp4"), derive_video_id("b/clip.mp4")
    assert a != b and a.startswith("clip-") and b.startswith("clip-")
    assert derive_video_id("a/clip.mp4") == a == derive_video_id(str(tmp_path / "a" / "clip.mp4"))
    assert derive_video_id("s3://bkt/x/clip.webm").startswith("clip-")  # .webm is not 4 characters
    assert derive_video_id("s3://bkt/x/my.clip.v2.mp4").startswith("my.clip.v2-")
    assert derive_video_id("s3://bkt/x/clip.mp4") != derive_video_id("s3://bkt/y/clip.mp4")
    weird = derive_video_id("s3://bkt/视频 (1).mp4")
    assert all(ch.isalnum() or ch in "._-" for ch in weird)


def test_redact_removes_credentials(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3tValue123")
    text = "failed http://user:pw@host:9000/b with s3cr3tValue123 and AKIAABCDEFGHIJKLMNOP"
    out = redact(text)
    for secret in ("s3cr3tValue123", "user:pw", "AKIAABCDEFGHIJKLMNOP"):
        assert secret not in out
    assert "host:9000/b" in out


def test_safe_filename_keeps_plain_ids_and_defuses_paths():
    assert safe_filename("clip-0123abcd") == "clip-0123abcd"
    for vid in ("../../etc/passwd", "a/b", ".hidden", ""):
        name = safe_filename(vid)
        assert "/" not in name and not name.startswith(".") and name
    assert safe_filename("a/b") != safe_filename("a_b/")


# --- S3 under faults (issue 22): the retry policy, whole objects, whole reads ------------------------

import hashlib  # noqa: E402
import os  # noqa: E402
import pickle  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.fs as pafs  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import pytest  # noqa: E402

from tests.conftest import FAKE_KEY_ID, FAKE_SECRET  # noqa: E402
from tests.faulty_s3 import FaultyS3  # noqa: E402
from vtplatform import storage as st  # noqa: E402
from vtplatform.config import ConfigError, StorageSection  # noqa: E402


@pytest.fixture
def proxy(moto_endpoint, tmp_path):
    """A proxy of its own for the test, no faults and no latency until the test sets them."""
    p = FaultyS3.start(moto_endpoint, tmp_path / "proxy.log", seed=7, slowdown=0, reset=0, latency_ms=(0, 0))
    try:
        yield p
    finally:
        p.stop()


def _clean(moto_endpoint: str) -> pafs.S3FileSystem:
    return pafs.S3FileSystem(endpoint_override=moto_endpoint.split("://")[1], scheme="http", region="us-east-1")


def _put(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)


def _storage(proxy: FaultyS3, **policy) -> StorageSection:
    return StorageSection(endpoint_url=proxy.endpoint, **policy)


def _error_of(fn):
    try:
        fn()
    except Exception as exc:
        return exc
    raise AssertionError("no error")


def test_real_store_errors_are_told_apart(proxy, moto_endpoint, s3_bucket):
    """What pyarrow's and botocore's S3 clients raise, one try each: throttling, 5xx and resets are
    worth another try; a missing key or bucket is not."""
    _put(_clean(moto_endpoint), f"{s3_bucket}/a.bin", b"abc")
    raw = pafs.S3FileSystem(  # pyarrow's own client, one try per request
        endpoint_override=proxy.endpoint.split("://")[1], scheme="http", region="us-east-1",
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )  # fmt: skip
    client = st.boto_client(_storage(proxy))
    head = lambda: raw.get_file_info(f"{s3_bucket}/a.bin")  # noqa: E731
    put = lambda: client.put_object(Bucket=s3_bucket, Key="b.bin", Body=b"x")  # noqa: E731
    for fault, reason in (("slowdown", "throttled"), ("internal", "server"), ("reset", "connection")):
        proxy.control({fault: 1.0})
        for request in (head, put):
            assert st.transient_reason(_error_of(request)) == reason, (fault, request)
        proxy.control({fault: 0.0})
    proxy.control({"short": 1.0})  # a ranged GET answered with half its bytes: pyarrow pads them out
    assert raw.open_input_file(f"{s3_bucket}/a.bin").read_at(3, 0) != b"abc"  # which is why reads are ours
    ours = st.s3_filesystem(_storage(proxy, retry_attempts=2))
    with pytest.raises(st.StorageError, match="Truncated: a ranged answer of 1 bytes without its Content-Range"):
        ours.open_input_file(f"{s3_bucket}/a.bin")  # opening reads the object's last bytes (all 3 here)
    proxy.control({"short": 0.0})
    big = os.urandom(st.TAIL_BYTES + 4000)
    _put(_clean(moto_endpoint), f"{s3_bucket}/big.bin", big)
    opened = ours.open_input_file(f"{s3_bucket}/big.bin")
    proxy.control({"short": 1.0})  # a read before the last bytes is a request of its own
    with pytest.raises(st.StorageError, match="Truncated: got 500 of 1000 bytes at offset 10 of"):
        opened.read_at(1000, 10)
    assert opened.read_at(st.TAIL_BYTES, 4000) == big[4000:]  # the last bytes: no request, nothing cut
    proxy.control({"short": 0.0})
    assert opened.read_at(1000, 10) == big[10:1010]
    missing = _error_of(lambda: raw.open_input_file(f"{s3_bucket}/nope.bin"))
    assert isinstance(missing, FileNotFoundError) and st.transient_reason(missing) is None
    no_bucket = _error_of(lambda: client.put_object(Bucket="no-such-bucket-vtp", Key="k", Body=b"x"))
    assert st.transient_reason(no_bucket) is None
    assert st.transient_reason(ValueError("a bug of ours")) is None
    assert st.transient_reason(st.StorageError("given up", "s3://b/k")) is None  # never retried twice over


def test_backoff_is_full_jitter_under_a_cap():
    storage = StorageSection(retry_base_s=0.1, retry_max_s=2.0)
    for retry, cap in ((1, 0.1), (2, 0.2), (3, 0.4), (5, 1.6), (6, 2.0), (30, 2.0)):
        waits = np.array([st.backoff_s(storage, retry) for _ in range(2000)])
        assert waits.min() >= 0 and waits.max() <= cap
        assert waits.min() < 0.05 * cap and waits.max() > 0.95 * cap  # spread over the whole range
        assert abs(waits.mean() - cap / 2) < 0.05 * cap


def test_the_policy_stops_at_its_attempts_and_at_its_deadline(proxy, moto_endpoint, s3_bucket):
    """Every try is a real request (the proxy's log has each); the error names the URI, the tries
    and the last error, and no credential."""
    proxy.control({"slowdown": 1.0})
    storage = _storage(proxy, retry_attempts=4, retry_base_s=0.01, retry_max_s=0.02)
    fs = st.s3_filesystem(storage)
    mark = proxy.mark()
    with pytest.raises(st.StorageError) as caught:
        st.write_bytes(b"x", fs, f"{s3_bucket}/k.bin")
    assert [e["method"] for e in proxy.entries(mark)] == ["PUT"] * 4
    text = str(caught.value)
    assert f"s3://{s3_bucket}/k.bin" in text and "failed 4 times" in text and "SlowDown" in text
    assert FAKE_SECRET not in text and FAKE_KEY_ID not in text
    assert caught.value.uri == f"s3://{s3_bucket}/k.bin"
    assert pickle.loads(pickle.dumps(caught.value)).uri == caught.value.uri  # crosses Ray processes whole

    storage = _storage(proxy, retry_attempts=1000, retry_base_s=0.05, retry_max_s=0.1, retry_deadline_s=1.5)
    start = time.monotonic()
    with pytest.raises(st.StorageError, match=r"storage\.retry_deadline_s=1\.5"):
        st.s3_filesystem(storage).get_file_info(f"{s3_bucket}/k.bin")
    assert 1.0 < time.monotonic() - start < 3.0


def test_whole_objects_and_whole_reads_through_throttling_resets_and_short_answers(
    proxy, moto_endpoint, s3_bucket, monkeypatch
):
    """30% throttled, 10% reset after the store did the work, 10% 500s, 20% of ranged reads short:
    a multipart upload, a one-PUT upload, a Parquet table, a local copy and a listing all come out
    whole and equal to what was written, and every retry is counted."""
    monkeypatch.setattr(st, "UPLOAD_PART_BYTES", 5 << 20)  # S3's smallest part: 12 MB go up in 3 parts
    big = os.urandom(12 << 20)
    table = pa.table({"a": np.arange(200_000), "b": np.random.default_rng(0).random(200_000)})
    proxy.control({"slowdown": 0.3, "reset": 0.1, "internal": 0.1, "short": 0.2})
    storage = _storage(proxy, retry_base_s=0.01, retry_max_s=0.05, retry_attempts=30)
    fs, root = st.filesystem(f"s3://{s3_bucket}/out", storage)
    before = st.storage_retries()
    st.write_bytes(big, fs, f"{root}/big.bin")
    st.write_bytes(b"small", fs, f"{root}/small.bin")
    st.write_parquet(table, fs, f"{root}/t/part-0.parquet")
    clean = _clean(moto_endpoint)
    assert clean.open_input_file(f"{root}/big.bin").read() == big
    assert clean.open_input_file(f"{root}/small.bin").read() == b"small"
    with st.local_copy(f"s3://{root}/big.bin", storage) as path, open(path, "rb") as copy:
        assert hashlib.sha256(copy.read()).digest() == hashlib.sha256(big).digest()
    assert pq.read_table(f"{root}/t", filesystem=fs).equals(table)
    assert st.list_files(fs, root) == [f"{root}/big.bin", f"{root}/small.bin", f"{root}/t/part-0.parquet"]
    counts = proxy.control()["counts"]
    assert min(counts["slowdown"], counts["reset"], counts["internal"], counts["short"]) > 0, counts
    retried = st.retries_since(before)
    assert {"throttled", "connection", "server", "truncated"} <= set(retried), retried
    faults = counts["slowdown"] + counts["reset"] + counts["internal"] + counts["short"]
    assert sum(n for k, n in retried.items() if k != "gave_up") == faults  # each fault retried once


def test_a_completion_whose_answer_was_lost_is_not_redone(proxy, moto_endpoint, s3_bucket, monkeypatch):
    """The store completes a multipart upload but the answer never arrives: the retry completes it
    again (moto, and S3 for a while) or finds no such upload (S3 later: then the object carrying
    these parts' ETag is the proof that it is done). Either way the object is the whole upload."""
    monkeypatch.setattr(st, "UPLOAD_PART_BYTES", 5 << 20)
    big = os.urandom(6 << 20)
    proxy.control({"reset": 1.0, "match": f"POST /{s3_bucket}/done.bin?uploadId=", "limit": 1})
    fs = st.s3_filesystem(_storage(proxy))
    st.write_bytes(big, fs, f"{s3_bucket}/done.bin")
    completions = [e for e in proxy.entries() if e["method"] == "POST" and "uploadId=" in e["path"]]
    assert [(e["fault"], e["status"]) for e in completions] in ([("reset", 200), (None, s)] for s in (200, 404))
    assert _clean(moto_endpoint).open_input_file(f"{s3_bucket}/done.bin").read() == big


def test_an_unfinished_upload_leaves_no_object(proxy, moto_endpoint, s3_bucket):
    """An upload that fails past the policy, or a writer that dies before closing its file,
    leaves nothing that a reader could take for the whole object."""
    proxy.control({"slowdown": 1.0, "match": "PUT "})
    fs = st.s3_filesystem(_storage(proxy, retry_attempts=2, retry_base_s=0.0, retry_max_s=0.0))
    with pytest.raises(st.StorageError):
        st.write_parquet(pa.table({"a": [1, 2, 3]}), fs, f"{s3_bucket}/x/part-0.parquet")
    stream = fs.open_output_stream(f"{s3_bucket}/x/half.bin")
    stream.write(b"half of it")
    del stream  # never closed
    assert _clean(moto_endpoint).get_file_info(pafs.FileSelector(f"{s3_bucket}/x", allow_not_found=True)) == []


def test_listing_retries_each_page_on_its_own(proxy, moto_endpoint, s3_bucket, monkeypatch):
    """250 keys in pages of 100 (S3's are 1,000); with half the requests throttled every key comes
    back once, and a failed page is asked again on its own, never from the first page."""
    import concurrent.futures

    monkeypatch.setattr(st, "LIST_PAGE_KEYS", 100)
    clean = _clean(moto_endpoint)
    keys = [f"lib/{i % 7}/clip {i:04d}.mp4" for i in range(250)]
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda k: _put(clean, f"{s3_bucket}/{k}", b"v"), keys))
    proxy.control({"slowdown": 0.5})
    storage = _storage(proxy, retry_base_s=0.01, retry_max_s=0.05, retry_attempts=40)
    mark = proxy.mark()
    pages = list(st.list_s3(f"{s3_bucket}/lib", storage))
    assert [len(p) for p in pages] == [100, 100, 50]
    assert sorted(k for page in pages for k, _ in page) == sorted(f"{s3_bucket}/{k}" for k in keys)
    asked = [e for e in proxy.entries(mark) if e["method"] == "GET"]
    firsts = [e for e in asked if "continuation-token" not in e["path"]]
    assert sum(e["fault"] is None for e in firsts) == 1 and len(asked) > 3  # retried, page by page
    assert len(asked) == 3 + sum(e["fault"] is not None for e in asked)
    infos = st.s3_filesystem(storage).get_file_info(pafs.FileSelector(f"{s3_bucket}/lib", recursive=True))
    assert sorted(i.path for i in infos if i.type == pafs.FileType.File) == sorted(f"{s3_bucket}/{k}" for k in keys)
    assert sorted(i.path for i in infos if i.type == pafs.FileType.Directory) == [
        f"{s3_bucket}/lib/{d}" for d in range(7)
    ]
    top = st.s3_filesystem(storage).get_file_info(pafs.FileSelector(f"{s3_bucket}/lib"))
    assert sorted((i.base_name, i.type) for i in top) == [(str(d), pafs.FileType.Directory) for d in range(7)]


def test_the_filesystem_answers_as_pyarrows_does_through_faults(proxy, moto_endpoint, s3_bucket):
    """File info, folders, copies, moves and deletes, with 30% throttled and 10% reset: the same
    answers pyarrow's own S3 client gives without faults."""
    clean = _clean(moto_endpoint)
    for key in ("d/a.bin", "d/sub/b.bin", "d/sub/c.bin", "e/x.bin"):
        _put(clean, f"{s3_bucket}/{key}", key.encode())
    proxy.control({"slowdown": 0.3, "reset": 0.1})
    fs = st.s3_filesystem(_storage(proxy, retry_base_s=0.01, retry_max_s=0.05, retry_attempts=40))
    paths = [s3_bucket, f"{s3_bucket}/d", f"{s3_bucket}/d/a.bin", f"{s3_bucket}/d/sub", f"{s3_bucket}/nope"]
    ours = [(i.path, i.type, i.size if i.type == pafs.FileType.File else None) for i in fs.get_file_info(paths)]
    theirs = [(i.path, i.type, i.size if i.type == pafs.FileType.File else None) for i in clean.get_file_info(paths)]
    assert ours == theirs
    assert fs.get_file_info("no-such-bucket-vtp").type == pafs.FileType.NotFound
    assert s3_bucket in [i.path for i in fs.get_file_info(pafs.FileSelector("/"))]
    fs.copy_file(f"{s3_bucket}/d/a.bin", f"{s3_bucket}/e/a2.bin")
    fs.move(f"{s3_bucket}/e/x.bin", f"{s3_bucket}/e/y.bin")
    fs.create_dir(f"{s3_bucket}/f", recursive=True)
    assert fs.get_file_info(f"{s3_bucket}/f").type == pafs.FileType.Directory
    fs.delete_dir(f"{s3_bucket}/d/sub")
    fs.delete_file(f"{s3_bucket}/d/a.bin")
    left = sorted(i.path for i in clean.get_file_info(pafs.FileSelector(s3_bucket, recursive=True)))
    assert left == [f"{s3_bucket}/{k}" for k in ("e", "e/a2.bin", "e/y.bin", "f")]
    assert clean.open_input_file(f"{s3_bucket}/e/a2.bin").read() == b"d/a.bin"
    fs.delete_dir_contents(f"{s3_bucket}/e")
    assert [i.path for i in clean.get_file_info(pafs.FileSelector(s3_bucket, recursive=True))] == [f"{s3_bucket}/f"]
    with pytest.raises(FileNotFoundError):
        fs.open_input_file(f"{s3_bucket}/e/a2.bin")
    with pytest.raises(FileNotFoundError):
        fs.delete_dir(f"{s3_bucket}/nope")
    counts = proxy.control()["counts"]
    assert counts["slowdown"] > 0 and counts["reset"] > 0


def test_a_parquet_part_is_read_with_its_footer_in_the_opening_request(proxy, s3_bucket):
    """Opening an object is one GET of its last ``TAIL_BYTES``, which also gives its size and
    ETag: no HEAD, the footer comes with it, and a small part is read in that one request."""
    fs = st.s3_filesystem(_storage(proxy))
    small = pa.table({"video_id": [f"v{i}" for i in range(50)], "x": np.arange(50, dtype=np.float32)})
    big = pa.table({"video_id": ["a", "b"], "features": [np.random.default_rng(0).random(40_000).tolist()] * 2})
    for name, table in (("small", small), ("big", big)):
        pq.write_table(table, f"{s3_bucket}/{name}.parquet", filesystem=fs)
    for name, table, requests in (("small", small, ["GET"]), ("big", big, ["GET", "GET"])):
        mark = proxy.mark()
        with fs.open_input_file(f"{s3_bucket}/{name}.parquet") as f:
            assert pq.ParquetFile(f).read().equals(table)
        asked = proxy.entries(mark)
        assert [e["method"] for e in asked] == requests, [(e["method"], e["range"]) for e in asked]
        assert asked[0]["range"] == f"bytes=-{st.TAIL_BYTES}"
        if name == "big":  # the column chunks the tail did not hold
            assert asked[1]["range"].startswith("bytes=4-")
    assert fs.open_input_file(f"{s3_bucket}/big.parquet").size() == fs.get_file_info(f"{s3_bucket}/big.parquet").size
    st.write_bytes(b"", fs, f"{s3_bucket}/empty.bin")  # no last bytes: the whole (empty) object, or 416 and a HEAD
    mark = proxy.mark()
    with fs.open_input_file(f"{s3_bucket}/empty.bin") as f:
        assert (f.size(), f.read()) == (0, b"")
    assert [(e["method"], e["status"]) for e in proxy.entries(mark)] in ([("GET", 200)], [("GET", 416), ("HEAD", 200)])


def test_the_filesystem_travels_to_other_processes_and_threads(proxy, moto_endpoint, s3_bucket):
    """Ray Train pickles the storage filesystem to its workers and copies files on many threads."""
    proxy.control({"slowdown": 0.2, "reset": 0.05})
    storage = _storage(proxy, retry_base_s=0.01, retry_max_s=0.05, retry_attempts=30)
    fs = pickle.loads(pickle.dumps(st.s3_filesystem(storage)))
    assert fs.equals(st.s3_filesystem(storage))
    blobs = {f"{s3_bucket}/ckpt/f{i}.bin": os.urandom(100_000 + i) for i in range(16)}
    threads = [threading.Thread(target=st.write_bytes, args=(b, fs, p)) for p, b in blobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    clean = _clean(moto_endpoint)
    assert all(clean.open_input_file(p).read() == b for p, b in blobs.items())


def test_storage_policy_is_validated():
    with pytest.raises(ConfigError, match=r"storage\.retry_attempts must be > 0"):
        StorageSection(retry_attempts=0)
    with pytest.raises(ConfigError, match=r"storage\.retry_max_s"):
        StorageSection(retry_base_s=1.0, retry_max_s=0.5)
    with pytest.raises(ConfigError, match=r"storage\.retry_deadline_s must be > 0"):
        StorageSection(retry_deadline_s=0)
