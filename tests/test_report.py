"""jobs/report.py: the static HTML report of a tags OUT, checked in a real headless Chromium
(``tests/browser.py``): what it renders, the tag filter (typed, and from the URL), that names
are escaped, that it loads nothing from the network, and that its screenshot is a picture."""

from __future__ import annotations

import io
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
from PIL import Image

from tests.browser import Browser, require_cjk_font
from tests.conftest import ROOT, run_job
from vtplatform import schema as S
from vtplatform import storage as st

SCRIPT_NAME = "<script>window.__pwned=1</script>"
IMG_NAME = '<img src=x onerror="window.__pwned=2">'
BETA = "dir/beta <b>clip</b>"  # not a plain file name: its thumbnails go by st.safe_filename

# video_id -> (uri, top-k names, probs, labels, windows as (start, end), spans as (name, start, end, max))
LIBRARY = {
    "alpha": (
        "/lib/alpha.mp4",
        ["cooking", "dog", "kitchen"],
        [0.92, 0.71, 0.30],
        ["cooking", "dog"],
        [(0, 10), (10, 20), (20, 30), (30, 40)],
        [("cooking", 0, 30, 0.9), ("dog", 10, 20, 0.7), ("dog", 30, 40, 0.6)],
    ),
    BETA: (
        's3://bucket/lib/beta "clip".mp4',
        [SCRIPT_NAME, "dog", "surfing"],
        [0.81, 0.40, 0.77],
        [SCRIPT_NAME, "surfing"],
        [(0, 8), (8, 16), (16, 20)],
        [("surfing", 0, 16, 0.8), (SCRIPT_NAME, 8, 20, 0.55), (IMG_NAME, 0, 4, 0.51)],
    ),
    "gamma": ("/lib/gamma.mp4", ["cat", "sofa"], [0.66, 0.2], ["cat"], [], []),  # no segments, no thumbnail
}
SPANS = sum(len(v[5]) for v in LIBRARY.values())
WINDOWS = sum(len(v[4]) for v in LIBRARY.values())


def _jpeg(seed: int) -> bytes:
    """A small, colourful JPEG (a gradient), different for every seed."""
    y, x = np.mgrid[0:90, 0:160]
    rgb = np.stack([(x * 1.6 + seed * 40) % 256, (y * 2.8 + seed * 90) % 256, (x + y + seed * 70) % 256], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(rgb.astype(np.uint8)).save(buf, "JPEG", quality=85)
    return buf.getvalue()


def write_tags_out(fs: pafs.FileSystem, root: str) -> None:
    """A tags OUT as jobs/tag.py --segments --thumbnails writes it (gamma has no thumbnail)."""
    tags, segments, spans = [], [], []
    ids = {
        n: k for k, n in enumerate(sorted({n for v in LIBRARY.values() for n in [*v[1], *v[3], *(s[0] for s in v[5])]}))
    }
    for i, (video_id, (uri, names, probs, labels, windows, video_spans)) in enumerate(LIBRARY.items()):
        tags.append(
            {
                S.VIDEO_ID: video_id,
                S.URI: uri,
                S.CLASS_IDS: [ids[n] for n in names],
                S.CLASS_NAMES: names,
                S.PROBS: probs,
                S.LABELS: [ids[n] for n in labels],
                S.LABEL_NAMES: labels,
            }
        )
        safe = st.safe_filename(video_id)
        if windows:
            st.write_bytes(_jpeg(i), fs, f"{root}/{S.THUMBNAILS_DIR}/{safe}.jpg")
        for w, (start, end) in enumerate(windows):
            segments.append(
                {
                    S.VIDEO_ID: video_id,
                    S.URI: uri,
                    S.WINDOW: w,
                    S.START_S: float(start),
                    S.END_S: float(end),
                    S.CLASS_IDS: [ids[names[0]]],
                    S.CLASS_NAMES: [names[0]],
                    S.PROBS: [probs[0]],
                }
            )
            st.write_bytes(_jpeg(10 * i + w + 1), fs, f"{root}/{S.THUMBNAILS_DIR}/{safe}/{w:05d}.jpg")
        for name, start, end, top in video_spans:
            spans.append(
                {
                    S.VIDEO_ID: video_id,
                    S.CLASS_ID: ids[name],
                    S.NAME: name,
                    S.START_S: float(start),
                    S.END_S: float(end),
                    S.MAX_PROB: top,
                    S.MEAN_PROB: top - 0.05,
                }
            )
    # two tag files, as several writers leave them
    st.write_parquet(pa.Table.from_pylist(tags[:2], schema=S.TAG_SCHEMA), fs, f"{root}/{S.TAGS_DIR}/part-0.parquet")
    st.write_parquet(pa.Table.from_pylist(tags[2:], schema=S.TAG_SCHEMA), fs, f"{root}/{S.TAGS_DIR}/part-1.parquet")
    st.write_parquet(
        pa.Table.from_pylist(segments, schema=S.SEGMENT_SCHEMA), fs, f"{root}/{S.SEGMENTS_DIR}/part-0.parquet"
    )
    st.write_parquet(pa.Table.from_pylist(spans, schema=S.SPAN_SCHEMA), fs, f"{root}/{S.SPANS_DIR}/part-0.parquet")


def _report(tmp_path, *flags: str):
    out = tmp_path / "out"
    write_tags_out(pafs.LocalFileSystem(), str(out))
    proc = run_job("report.py", "--tags", str(out), "--save_dir", str(out / S.REPORT_DIR), *flags, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out / S.REPORT_DIR, json.loads(proc.stdout)


VISIBLE = "(sel) => [...document.querySelectorAll(sel)].filter((e) => e.getClientRects().length > 0)"


def _visible(b: Browser, testid: str, attribute: str) -> list[str]:
    return b.eval(f"({VISIBLE})('[data-testid=\"{testid}\"]').map((e) => e.getAttribute('{attribute}'))")


def test_report_renders_filters_and_escapes_in_a_real_browser(tmp_path):
    report, summary = _report(tmp_path)
    assert summary["shown"] == summary["videos"] == 3 and summary["timelines"] == 2
    assert summary["spans"] == SPANS and summary["thumbnails"] == 2 + WINDOWS and summary["missing_thumbnails"] == 1
    page = (report / "index.html").read_text(encoding="utf-8")
    # nothing from the network: no http(s) or protocol-relative src/href, no CDN
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page, re.I)
    assert SCRIPT_NAME not in page and IMG_NAME not in page  # only escaped
    url = (report / "index.html").as_uri()

    with Browser(tmp_path / "chromium-profile") as b:
        b.open(url)
        assert _visible(b, "video-card", "data-video-id") == ["alpha", BETA, "gamma"]
        assert len(_visible(b, "span", "data-name")) == SPANS
        assert len(_visible(b, "window", "title")) == WINDOWS
        assert len(_visible(b, "no-thumbnail", "class")) == 1
        # every image loaded, from the report's own folder
        # lazy images load after the load event: wait for them, as a person looking at the page would
        b.wait_until("[...document.images].every((i) => i.complete && i.naturalWidth > 0)")
        images = b.eval("[...document.images].map((i) => [i.complete && i.naturalWidth > 0, i.src])")
        assert len(images) == 2 + WINDOWS and all(ok for ok, _ in images), images
        assert all(src.startswith(report.as_uri() + "/thumbnails/") for _, src in images)
        requested = b.requested_urls()  # what Chromium's network layer saw: the page and its images
        assert len(requested) >= 1 + len(images) and all(u.startswith("file://") for u in requested), requested
        # names are text, not markup
        assert b.eval("window.__pwned") is None and b.eval("document.scripts.length") == 1
        beta_text = b.eval(f"document.querySelector('[data-video-id=\"{json.dumps(BETA)[1:-1]}\"]').textContent")
        assert SCRIPT_NAME in beta_text and IMG_NAME in beta_text and BETA in beta_text

        png = b.screenshot()
        (tmp_path / "report.png").write_bytes(png)  # the picture, kept with the test's files
        image = Image.open(io.BytesIO(png)).convert("RGB")
        assert image.width >= 1000 and image.height >= 400
        pixels = np.asarray(image)
        colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
        assert colours > 500 and pixels.std() > 10, (colours, pixels.std())

        # the filter, typed: videos with the tag anywhere (labels, top-k, spans), only its spans
        b.type("#tag-filter", "dog")
        assert _visible(b, "video-card", "data-video-id") == ["alpha", BETA]
        assert _visible(b, "span", "data-name") == ["dog", "dog"]
        assert b.eval("document.getElementById('shown-count').textContent").startswith("2 of 3 videos")
        b.type("#tag-filter", "SURF")  # case-insensitive, part of a name
        assert _visible(b, "video-card", "data-video-id") == [BETA]
        assert _visible(b, "span", "data-name") == ["surfing"]
        b.type("#tag-filter", "<script")
        assert _visible(b, "video-card", "data-video-id") == [BETA]
        assert _visible(b, "span", "data-name") == [SCRIPT_NAME]
        b.type("#tag-filter", "no such tag")
        assert _visible(b, "video-card", "data-video-id") == [] and _visible(b, "span", "data-name") == []
        b.type("#tag-filter", "")
        assert len(_visible(b, "video-card", "data-video-id")) == 3 and len(_visible(b, "span", "data-name")) == SPANS

        # the filter from the URL at load, as a link to the page would carry it
        b.open(url + "?tag=Cooking")
        assert _visible(b, "video-card", "data-video-id") == ["alpha"]
        assert _visible(b, "span", "data-name") == ["cooking"]
        b.open(url + "#tag=cat")  # another document than ?tag=..., so a fresh load
        assert _visible(b, "video-card", "data-video-id") == ["gamma"] and _visible(b, "span", "data-name") == []
        assert b.eval("document.getElementById('tag-filter').value") == "cat"


def _count(page: str, testid: str) -> int:
    """Elements with that test hook in the page's HTML (not the script's selectors)."""
    return len(re.findall(rf'<[a-z]+ [^>]*data-testid="{testid}"', page))


def test_report_caps_the_gallery_and_says_so(tmp_path):
    report, summary = _report(tmp_path, "--max_videos", "2", "--max_timeline_labels", "1")
    assert summary["videos"] == 3 and summary["shown"] == 2
    page = (report / "index.html").read_text(encoding="utf-8")
    assert _count(page, "video-card") == 2 and "gamma" not in page
    assert 'data-testid="cap-note"' in page and "first 2 of 3 videos" in page
    # one timeline row per video: its most confident label
    assert re.findall(r'data-testid="span-row" data-name="([^"]*)"', page) == ["cooking", "surfing"]
    assert "2 more labels with spans not shown" in page


def test_report_reads_s3_and_fails_clearly_without_tags(tmp_path, moto_endpoint, s3_bucket):
    fs = pafs.S3FileSystem(endpoint_override=moto_endpoint.split("://")[1], scheme="http", region="us-east-1")
    write_tags_out(fs, f"{s3_bucket}/out")
    save = tmp_path / "report"
    endpoint = f"storage.endpoint_url={moto_endpoint}"
    proc = run_job("report.py", "--tags", f"s3://{s3_bucket}/out", "--save_dir", str(save), "-o", endpoint)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["shown"] == 3
    page = (save / "index.html").read_text(encoding="utf-8")
    assert _count(page, "video-card") == 3 and _count(page, "span") == SPANS
    copied = sorted(p.relative_to(save).as_posix() for p in (save / S.THUMBNAILS_DIR).rglob("*.jpg"))
    assert len(copied) == 2 + WINDOWS and "thumbnails/alpha/00003.jpg" in copied

    proc = run_job("report.py", "--tags", f"s3://{s3_bucket}/nothing", "--save_dir", str(save), "-o", endpoint)
    assert proc.returncode == 2 and "no tags under" in proc.stderr and "jobs/tag.py" in proc.stderr


# --- classes told apart by id: tags without names, and names that repeat ---------------------

LABEL_3396 = ROOT / "configs" / "labels" / "label_3396.txt"
# video_id -> (top-k ids, probs, label ids, spans as (class id, start, end, max)); windows of 10 s to 40 s
BY_ID = {
    "v1": ([3, 7, 1], [0.9, 0.6, 0.2], [3, 7], [(3, 0, 20, 0.9), (7, 10, 30, 0.7), (7, 30, 40, 0.55)]),
    "v2": ([7, 2], [0.8, 0.1], [7], [(7, 0, 40, 0.8)]),
}


def _names_that_repeat() -> tuple[list[str], str, list[int]]:
    """label_3396.txt's names, one that two classes share, and those two ids."""
    names = LABEL_3396.read_text(encoding="utf-8").splitlines()
    ids = {}
    for i, name in enumerate(names):
        ids.setdefault(name, []).append(i)
    assert ids["猫"] == [2014, 2835]  # the shipped file gives two classes one name
    return names, "猫", ids["猫"]


def _write_by_id(root, names: list[str] | None) -> None:
    """A tags OUT of ``BY_ID`` as jobs/tag.py --segments writes it: with ``names`` (a label file),
    or without (no --label_file: every name column null)."""
    fs = pafs.LocalFileSystem()
    named = (lambda ids: [names[i] for i in ids]) if names else (lambda ids: None)
    tags, segments, spans = [], [], []
    for video_id, (top, probs, labels, video_spans) in BY_ID.items():
        tags.append(
            {S.VIDEO_ID: video_id, S.URI: f"/lib/{video_id}.mp4", S.CLASS_IDS: top, S.CLASS_NAMES: named(top),
             S.PROBS: probs, S.LABELS: labels, S.LABEL_NAMES: named(labels)}
        )  # fmt: skip
        for w in range(4):
            segments.append(
                {S.VIDEO_ID: video_id, S.URI: f"/lib/{video_id}.mp4", S.WINDOW: w, S.START_S: 10.0 * w,
                 S.END_S: 10.0 * w + 10, S.CLASS_IDS: top[:1], S.CLASS_NAMES: named(top[:1]), S.PROBS: probs[:1]}
            )  # fmt: skip
        for class_id, start, end, top_p in video_spans:
            spans.append(
                {S.VIDEO_ID: video_id, S.CLASS_ID: class_id, S.NAME: names[class_id] if names else None,
                 S.START_S: float(start), S.END_S: float(end), S.MAX_PROB: top_p, S.MEAN_PROB: top_p - 0.05}
            )  # fmt: skip
    st.write_parquet(pa.Table.from_pylist(tags, schema=S.TAG_SCHEMA), fs, f"{root}/{S.TAGS_DIR}/part-0.parquet")
    st.write_parquet(
        pa.Table.from_pylist(segments, schema=S.SEGMENT_SCHEMA), fs, f"{root}/{S.SEGMENTS_DIR}/part-0.parquet"
    )
    st.write_parquet(pa.Table.from_pylist(spans, schema=S.SPAN_SCHEMA), fs, f"{root}/{S.SPANS_DIR}/part-0.parquet")


def _rows(b: Browser, video_id: str, testid: str) -> list[tuple[str, str]]:
    """(data-name, data-class-id) of a card's visible elements with that test hook."""
    return [
        tuple(x)
        for x in b.eval(
            f'({VISIBLE})(\'[data-video-id="{video_id}"] [data-testid="{testid}"]\')'
            ".map((e) => [e.getAttribute('data-name'), e.getAttribute('data-class-id')])"
        )
    ]


def test_report_tells_classes_apart_by_id_without_names_and_with_repeated_names(tmp_path):
    """Tags made without --label_file (names null) and with label_3396.txt, where classes 2014
    and 2835 are both 猫: every class keeps its own bars, chips and timeline row, labelled by
    its id where the name is missing or shared, the filter finds them, and the Chinese names
    are drawn with a CJK font (not as boxes)."""
    require_cjk_font()
    names, shared, (cat_a, cat_b) = _names_that_repeat()
    pages = {}
    for kind, label_names in (("unnamed", None), ("label_3396", names)):
        out = tmp_path / kind
        if label_names:  # two classes of one name in the same video, and a name of its own
            BY_ID["v3"] = (
                [cat_a, cat_b, 0],
                [0.85, 0.75, 0.3],
                [cat_a, cat_b],
                [(cat_a, 0, 20, 0.85), (cat_b, 10, 40, 0.75)],
            )
        try:
            _write_by_id(out, label_names)
        finally:
            BY_ID.pop("v3", None)
        proc = run_job("report.py", "--tags", str(out), "--save_dir", str(out / S.REPORT_DIR), timeout=120)
        assert proc.returncode == 0, proc.stderr
        pages[kind] = (out / S.REPORT_DIR / "index.html").as_uri()

    with Browser(tmp_path / "chromium-profile") as b:
        b.open(pages["unnamed"])
        assert _rows(b, "v1", "tag") == [("class 3", "3"), ("class 7", "7"), ("class 1", "1")]
        widths = b.eval(f"({VISIBLE})('[data-video-id=\"v1\"] .bar span').map((e) => e.getBoundingClientRect().width)")
        assert len(widths) == 3 and widths[0] > widths[1] > widths[2] > 0, widths  # the bars are drawn, in order
        assert _rows(b, "v1", "label") == [("class 3", "3"), ("class 7", "7")]
        assert _rows(b, "v1", "span-row") == [("class 3", "3"), ("class 7", "7")]  # one row per class, not one unnamed
        assert [r[1] for r in _rows(b, "v1", "span")] == ["3", "7", "7"]
        assert _rows(b, "v2", "span-row") == [("class 7", "7")]
        b.type("#tag-filter", "class 7")
        assert _visible(b, "video-card", "data-video-id") == ["v1", "v2"]
        assert _rows(b, "v1", "span-row") == [("class 7", "7")]
        b.type("#tag-filter", "class 3")
        assert _visible(b, "video-card", "data-video-id") == ["v1"]
        b.open(pages["unnamed"] + "?tag=class%202")
        assert _visible(b, "video-card", "data-video-id") == ["v2"]

        b.open(pages["label_3396"])
        a, c = f"{shared} #{cat_a}", f"{shared} #{cat_b}"
        assert _rows(b, "v3", "tag") == [(a, str(cat_a)), (c, str(cat_b)), (names[0], "0")]
        assert _rows(b, "v3", "label") == [(a, str(cat_a)), (c, str(cat_b))]
        assert _rows(b, "v3", "span-row") == [(a, str(cat_a)), (c, str(cat_b))]  # two rows, not one merged 猫
        assert _rows(b, "v1", "tag")[0] == (names[3], "3")  # a name that no other class has is shown as it is
        b.type("#tag-filter", shared)
        assert _visible(b, "video-card", "data-video-id") == ["v3"]
        assert _rows(b, "v3", "span-row") == [(a, str(cat_a)), (c, str(cat_b))]
        b.type("#tag-filter", f"#{cat_b}")
        assert _rows(b, "v3", "span-row") == [(c, str(cat_b))]
        b.type("#tag-filter", "")
        # the Chinese names are drawn with a font that has their glyphs; the page names such fonts
        family = b.eval("getComputedStyle(document.querySelector('[data-testid=\"tag\"] .name')).fontFamily")
        assert '"Noto Sans CJK SC"' in family and '"Microsoft YaHei"' in family, family
        fonts = b.fonts('[data-video-id="v3"] [data-testid="tag"] .name')
        cjk = {family: n for family, n in fonts.items() if "CJK" in family}
        assert sum(cjk.values()) == 1, fonts  # 猫: one glyph, from Noto Sans CJK
        png = b.screenshot()
        (tmp_path / "report_label_3396.png").write_bytes(png)
