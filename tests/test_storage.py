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
