"""The tags report: one static ``index.html`` and the small JPEGs it shows, built from the OUT
of ``jobs/tag.py`` (local or ``s3://``) without decoding any video.

    python jobs/report.py --tags OUT --save_dir OUT/report     # then open OUT/report/index.html

The page is rendered here, as HTML with every name and URI escaped; a few lines of inline
JavaScript filter it by tag name (the ``#tag-filter`` input, or ``index.html#tag=NAME`` /
``?tag=NAME`` at load). It loads nothing from the network and needs no server: the thumbnails
are copied from ``OUT/thumbnails`` into the report's own ``thumbnails`` folder, under the same
names (``<video>.jpg`` and ``<video>/<window>.jpg``).

What it shows, per video (the first ``max_videos`` by video id): its thumbnail or a placeholder,
its labels (the classes at or above the tagging threshold) and its top-k as probability bars;
with segments (``jobs/tag.py --segments``), a timeline over the video's duration (the latest
end of its windows) with one row per label that has spans (the ``max_timeline_labels`` most
confident), and up to ``max_window_thumbnails`` window thumbnails along it.

Classes are told apart by their ids, never by their names: tags made without ``--label_file``
have no names, and a label file may give two classes one name (``label_3396.txt`` does). A class
shows as its name, as ``class 17`` without one, and as ``猫 #2014`` where the report holds
another class of the same name. The tag filter matches these labels. The page names fonts for
Chinese, Japanese and Korean names (Noto Sans CJK, as Debian's ``fonts-noto-cjk`` installs it,
and the usual macOS and Windows ones) after the Latin ones.

Test hooks: ``data-testid`` = ``video-card``, ``tag``, ``label``, ``timeline``, ``span-row``,
``span``, ``window``, ``no-thumbnail``, ``cap-note``, ``shown-count``; ``id="tag-filter"``;
``data-name`` (the label shown) and ``data-class-id`` on tags, labels, span rows and spans.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import datetime
import html
import json
import logging
from urllib.parse import quote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from vtplatform import schema as S
from vtplatform import storage as st
from vtplatform.config import ConfigError, StorageSection

log = logging.getLogger(__name__)

COPY_THREADS = 8  # thumbnails copied at once (S3 round trips overlap)


@dataclasses.dataclass(frozen=True)
class ReportOptions:
    max_videos: int = 500  # cards on the page: the first by video id
    bars: int = 5  # top-k probability bars shown open; the rest fold under "more"
    max_timeline_labels: int = 5  # timeline rows per video: its labels with spans, most confident first
    max_window_thumbnails: int = 12  # window thumbnails per timeline, spread evenly over the windows


@dataclasses.dataclass
class ReportSummary:
    index: str  # where the page is
    videos: int  # in the tags
    shown: int  # on the page
    timelines: int  # shown videos with segments
    spans: int  # span boxes on the page
    thumbnails: int  # JPEGs copied into the report
    missing_thumbnails: int  # thumbnails the page would show that the tags OUT lacks


@dataclasses.dataclass(frozen=True)
class _Class:
    id: int | None  # the class id: what tells classes apart
    label: str  # what the page shows: the name, or the id where the name is missing or repeated

    @property
    def attrs(self) -> str:
        """Its test hooks: ``data-name`` and ``data-class-id``."""
        return f'data-name="{_e(self.label)}" data-class-id="{"" if self.id is None else self.id}"'


@dataclasses.dataclass
class _Span:
    cls: _Class
    start_s: float
    end_s: float
    max_prob: float
    mean_prob: float


@dataclasses.dataclass
class _Window:
    window: int
    start_s: float
    end_s: float
    top: str  # its best class and probability, for the tooltip
    thumbnail: str | None = None  # relative to the report, once copied


@dataclasses.dataclass
class _Video:
    video_id: str
    uri: str
    top: list[tuple[_Class, float]]  # the top-k, best first
    labels: list[_Class]  # at or above the tagging threshold
    windows: list[_Window] = dataclasses.field(default_factory=list)
    spans: list[_Span] = dataclasses.field(default_factory=list)
    thumbnail: str | None = None

    @property
    def duration_s(self) -> float:
        ends = [w.end_s for w in self.windows] or [s.end_s for s in self.spans]
        return max(ends, default=0.0)

    def timeline_rows(self, limit: int) -> tuple[list[tuple[_Class, list[_Span]]], int]:
        """Its classes with spans, most confident first (at most ``limit``), and how many more there are."""
        by_class: dict[_Class, list[_Span]] = collections.defaultdict(list)
        for span in self.spans:
            by_class[span.cls].append(span)
        ranked = sorted(by_class.items(), key=lambda kv: (-max(s.max_prob for s in kv[1]), kv[0].label))
        return [(cls, sorted(spans, key=lambda s: s.start_s)) for cls, spans in ranked[:limit]], max(
            0, len(ranked) - limit
        )

    def names(self) -> list[str]:
        """What the tag filter matches: the labels, the top-k and the span classes, as shown."""
        return sorted(
            {*(c.label for c in self.labels), *(c.label for c, _ in self.top), *(s.cls.label for s in self.spans)}
        )


class _Classes:
    """Labels for the classes a report shows: the name where it names one class, else the id."""

    def __init__(self, pairs: list[tuple[int | None, str | None]]):
        ids_by_name: dict[str, set[int | None]] = collections.defaultdict(set)
        for class_id, name in pairs:
            if name:
                ids_by_name[name].add(class_id)
        self._repeated = {name for name, ids in ids_by_name.items() if len(ids) > 1}

    def __call__(self, class_id: int | None, name: str | None) -> _Class:
        if not name:
            return _Class(class_id, f"class {class_id}" if class_id is not None else "class ?")
        return _Class(class_id, f"{name} #{class_id}" if name in self._repeated else name)


def build_report(
    tags_uri: str, save_dir: str, storage: StorageSection, options: ReportOptions | None = None
) -> ReportSummary:
    options = options or ReportOptions()
    if options.max_videos < 1:
        raise ConfigError(f"--max_videos must be at least 1, not {options.max_videos}")
    if options.max_timeline_labels < 0 or options.max_window_thumbnails < 0:
        raise ConfigError("--max_timeline_labels and --max_window_thumbnails cannot be negative")
    fs, root = st.filesystem(tags_uri, storage)
    root = root.rstrip("/")
    tag_files = st.list_files(fs, f"{root}/{S.TAGS_DIR}", ".parquet")
    if not tag_files:
        raise ConfigError(f"no tags under {st.redact(tags_uri)}/{S.TAGS_DIR}: --tags is the OUT folder of jobs/tag.py")
    ids = pc.unique(st.read_column(fs, f"{root}/{S.TAGS_DIR}", S.VIDEO_ID).drop_null())
    chosen = pc.take(ids, pc.sort_indices(ids)).slice(0, options.max_videos)
    videos = _read_videos(fs, root, tag_files, chosen)
    out_fs, out_root = st.filesystem(save_dir, storage)
    out_root = out_root.rstrip("/")
    copied, missing = _copy_thumbnails(fs, root, out_fs, out_root, videos, options)
    page = render(videos, total=len(ids), source=st.redact(tags_uri), options=options)
    index = f"{out_root}/{S.INDEX_FILE}"
    st.write_bytes(page.encode("utf-8"), out_fs, index)
    shown_spans = sum(len(spans) for v in videos for _, spans in v.timeline_rows(options.max_timeline_labels)[0])
    summary = ReportSummary(
        index=f"{save_dir.rstrip('/')}/{S.INDEX_FILE}",
        videos=len(ids),
        shown=len(videos),
        timelines=sum(1 for v in videos if v.windows or v.spans),
        spans=shown_spans,
        thumbnails=copied,
        missing_thumbnails=missing,
    )
    log.info("report of %d of %d videos written to %s", summary.shown, summary.videos, st.redact(summary.index))
    return summary


def _read(fs: pafs.FileSystem, files: list[str], columns: list[str], ids: pa.Array) -> pa.Table | None:
    """The rows of the chosen videos from a folder's Parquet files (None when there are no files)."""
    if not files:
        return None
    dataset = ds.dataset(files, filesystem=fs, format="parquet")
    return dataset.to_table(columns=columns, filter=pc.field(S.VIDEO_ID).isin(ids))


def _pairs(ids: list | None, names: list | None) -> list[tuple[int | None, str | None]]:
    """(class id, name or None) for each class of a row; names are null without a label file."""
    ids = list(ids or [])
    names = list(names or [])
    return [(class_id, names[i] if i < len(names) else None) for i, class_id in enumerate(ids)]


def _read_videos(fs: pafs.FileSystem, root: str, tag_files: list[str], ids: pa.Array) -> list[_Video]:
    columns = [S.VIDEO_ID, S.URI, S.CLASS_IDS, S.CLASS_NAMES, S.PROBS, S.LABELS, S.LABEL_NAMES]
    tags: dict[str, dict] = {}
    for row in _read(fs, tag_files, columns, ids).to_pylist():
        tags.setdefault(row[S.VIDEO_ID], row)  # a video tagged twice: its first row
    segment_columns = [S.VIDEO_ID, S.WINDOW, S.START_S, S.END_S, S.CLASS_IDS, S.CLASS_NAMES, S.PROBS]
    segments = _read(fs, st.list_files(fs, f"{root}/{S.SEGMENTS_DIR}", ".parquet"), segment_columns, ids)
    segment_rows = segments.to_pylist() if segments is not None else []
    span_columns = [S.VIDEO_ID, S.CLASS_ID, S.NAME, S.START_S, S.END_S, S.MAX_PROB, S.MEAN_PROB]
    spans = _read(fs, st.list_files(fs, f"{root}/{S.SPANS_DIR}", ".parquet"), span_columns, ids)
    span_rows = spans.to_pylist() if spans is not None else []

    pairs = [p for r in tags.values() for p in _pairs(r[S.CLASS_IDS], r[S.CLASS_NAMES])]
    pairs += [p for r in tags.values() for p in _pairs(r[S.LABELS], r[S.LABEL_NAMES])]
    pairs += [p for r in segment_rows for p in _pairs(r[S.CLASS_IDS], r[S.CLASS_NAMES])]
    pairs += [(r[S.CLASS_ID], r[S.NAME]) for r in span_rows]
    classes = _Classes(pairs)

    videos: dict[str, _Video] = {}
    for video_id, row in tags.items():
        probs = [float(p or 0.0) for p in row[S.PROBS] or []]
        videos[video_id] = _Video(
            video_id=video_id,
            uri=st.redact(row[S.URI] or ""),
            top=[
                (classes(*pair), p)
                for pair, p in zip(_pairs(row[S.CLASS_IDS], row[S.CLASS_NAMES]), probs, strict=False)
            ],
            labels=[classes(*pair) for pair in _pairs(row[S.LABELS], row[S.LABEL_NAMES])],
        )
    for row in segment_rows:
        pairs, probs = _pairs(row[S.CLASS_IDS], row[S.CLASS_NAMES]), row[S.PROBS] or []
        top = f"{classes(*pairs[0]).label} {probs[0]:.2f}" if pairs and probs else ""
        videos[row[S.VIDEO_ID]].windows.append(_Window(row[S.WINDOW], row[S.START_S], row[S.END_S], top))
    for row in span_rows:
        videos[row[S.VIDEO_ID]].spans.append(
            _Span(
                classes(row[S.CLASS_ID], row[S.NAME]),
                row[S.START_S],
                row[S.END_S],
                row[S.MAX_PROB] or 0.0,
                row[S.MEAN_PROB] or 0.0,
            )
        )
    for video in videos.values():
        video.windows.sort(key=lambda w: w.window)
    return sorted(videos.values(), key=lambda v: v.video_id)


def _spread(windows: list[_Window], k: int) -> list[_Window]:
    """At most ``k`` windows, evenly spread, the first and the last included."""
    if len(windows) <= k:
        return windows
    if k == 1:
        return windows[:1]
    return [windows[round(i * (len(windows) - 1) / (k - 1))] for i in range(k)]


def _copy_thumbnails(
    fs: pafs.FileSystem,
    root: str,
    out_fs: pafs.FileSystem,
    out_root: str,
    videos: list[_Video],
    options: ReportOptions,
) -> tuple[int, int]:
    """Copies each shown video's thumbnail and its shown windows' thumbnails, byte for byte; sets
    the relative paths of those that exist. Returns (copied, missing)."""
    jobs: list[tuple[str, _Video | _Window]] = []  # (relative path, the video or window that shows it)
    for video in videos:
        safe = st.safe_filename(video.video_id)
        jobs.append((f"{S.THUMBNAILS_DIR}/{safe}.jpg", video))
        jobs.extend(
            (f"{S.THUMBNAILS_DIR}/{safe}/{w.window:05d}.jpg", w)
            for w in _spread(video.windows, options.max_window_thumbnails)
        )

    def copy(relative: str) -> bool:
        try:
            with fs.open_input_stream(f"{root}/{relative}") as src:
                data = src.read()
        except FileNotFoundError:
            return False
        st.write_bytes(data, out_fs, f"{out_root}/{relative}")
        return True

    with concurrent.futures.ThreadPoolExecutor(COPY_THREADS) as pool:
        found = list(pool.map(copy, [relative for relative, _ in jobs]))
    for (relative, owner), ok in zip(jobs, found, strict=True):
        if ok:
            owner.thumbnail = relative
    return sum(found), len(found) - sum(found)


# -- the page -----------------------------------------------------------------------------------


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _clock(seconds: float) -> str:
    seconds = max(0, round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _pct(value: float) -> str:
    return f"{min(100.0, max(0.0, value * 100)):.2f}%"


def render(videos: list[_Video], total: int, source: str, options: ReportOptions) -> str:
    names = sorted({n for v in videos for n in v.names() if n})
    cap = (
        f'<p class="note" data-testid="cap-note">Showing the first {len(videos):,} of {total:,} videos, '
        f"sorted by video id (<code>--max_videos {options.max_videos}</code>).</p>"
        if len(videos) < total
        else ""
    )
    cards = "\n".join(_card(v, options) for v in videos) or '<p class="note">No videos in these tags.</p>'
    generated = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return _PAGE.format(
        title=_e(f"Video tags: {len(videos):,} videos"),
        style=_STYLE,
        script=_SCRIPT,
        source=_e(source),
        generated=_e(generated),
        cap=cap,
        options="".join(f'<option value="{_e(n)}"></option>' for n in names),
        shown=f"{len(videos)} of {len(videos)} videos",
        cards=cards,
    )


def _card(video: _Video, options: ReportOptions) -> str:
    if video.thumbnail:
        thumb = f'<img class="thumb" src="{_e(quote(video.thumbnail))}" alt="" loading="lazy">'
    else:
        thumb = '<div class="thumb placeholder" data-testid="no-thumbnail">no thumbnail</div>'
    labels = set(video.labels)
    chips = "".join(f'<li class="chip" data-testid="label" {c.attrs}>{_e(c.label)}</li>' for c in video.labels)
    bars = [
        f'<li class="tag{" label" if c in labels else ""}" data-testid="tag" {c.attrs}>'
        f'<span class="name" title="{_e(c.label)}">{_e(c.label)}</span>'
        f'<span class="bar"><span style="width:{_pct(prob)}"></span></span><span class="p">{prob:.2f}</span></li>'
        for c, prob in video.top
    ]
    more = (
        f'<details><summary>{len(bars) - options.bars} more</summary><ul class="tags">{"".join(bars[options.bars :])}</ul></details>'
        if len(bars) > options.bars
        else ""
    )
    return (
        f'<article class="card" data-testid="video-card" data-video-id="{_e(video.video_id)}" '
        f'data-tags="{_e(json.dumps(video.names()))}">'
        f'<div class="head">{thumb}<div class="info">'
        f'<h2 title="{_e(video.video_id)}">{_e(video.video_id)}</h2>'
        f'<p class="uri" title="{_e(video.uri)}">{_e(video.uri)}</p>'
        f'<ul class="chips">{chips or "<li class=none>no label above the threshold</li>"}</ul>'
        f'<ul class="tags">{"".join(bars[: options.bars])}</ul>{more}</div></div>'
        f"{_timeline(video, options)}</article>"
    )


def _timeline(video: _Video, options: ReportOptions) -> str:
    duration = video.duration_s
    if not (video.windows or video.spans) or duration <= 0:
        return ""
    rows, hidden = video.timeline_rows(options.max_timeline_labels)
    lines = []
    for cls, spans in rows:
        boxes = "".join(
            f'<span class="span" data-testid="span" {cls.attrs} '
            f'style="left:{_pct(s.start_s / duration)};width:{_pct((s.end_s - s.start_s) / duration)};'
            f'opacity:{0.35 + 0.65 * min(1.0, max(0.0, s.max_prob)):.2f}" '
            f'title="{_e(cls.label)}: {_clock(s.start_s)}–{_clock(s.end_s)}, max {s.max_prob:.2f}, '
            f'mean {s.mean_prob:.2f}"></span>'
            for s in spans
        )
        lines.append(
            f'<div class="row" data-testid="span-row" {cls.attrs}>'
            f'<span class="rname" title="{_e(cls.label)}">{_e(cls.label)}</span><div class="track">{boxes}</div></div>'
        )
    if not rows:
        lines.append('<p class="note">no spans</p>')
    if hidden:
        lines.append(f'<p class="note">{hidden} more labels with spans not shown</p>')
    shown = _spread(video.windows, options.max_window_thumbnails)
    frames = "".join(
        f'<figure data-testid="window" title="{_e(f"window {w.window}: {_clock(w.start_s)}–{_clock(w.end_s)} {w.top}")}">'
        + (
            f'<img src="{_e(quote(w.thumbnail))}" alt="" loading="lazy">'
            if w.thumbnail
            else '<div class="placeholder"></div>'
        )
        + f"<figcaption>{_clock(w.start_s)}</figcaption></figure>"
        for w in shown
    )
    return (
        f'<section class="timeline" data-testid="timeline" data-duration="{duration:.3f}">'
        f'<div class="axis"><span>0:00</span><span>{len(video.windows)} windows</span><span>{_clock(duration)}</span></div>'
        f'{"".join(lines)}<div class="windows">{frames}</div></section>'
    )


_STYLE = """
:root { --fg:#1d2330; --muted:#667085; --bg:#f4f5f8; --card:#fff; --accent:#2f6fde; --label:#1a9a5b;
  /* Latin first, then fonts with Chinese, Japanese and Korean glyphs: label_3396.txt's names are Chinese */
  --font: system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "Noto Sans CJK SC", "Source Han Sans SC",
    "PingFang SC", "Hiragino Sans GB", "Microsoft YaHei", "WenQuanYi Micro Hei", sans-serif; }
* { box-sizing: border-box; }
[hidden] { display: none !important; }
body { margin: 0; font: 14px/1.4 var(--font); color: var(--fg); background: var(--bg); }
header { position: sticky; top: 0; z-index: 2; background: #fff; border-bottom: 1px solid #dde1ea; padding: 12px 20px; }
h1 { margin: 0 0 4px; font-size: 20px; }
.meta, .note { color: var(--muted); margin: 2px 0; }
.controls { display: flex; gap: 8px; align-items: center; margin-top: 8px; flex-wrap: wrap; }
#tag-filter { font: inherit; padding: 5px 8px; width: 280px; border: 1px solid #b8c0d0; border-radius: 6px; }
button { font: inherit; padding: 5px 10px; border: 1px solid #b8c0d0; border-radius: 6px; background: #fff; cursor: pointer; }
#shown-count { color: var(--muted); }
main { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 16px; padding: 16px 20px; }
.card { background: var(--card); border-radius: 10px; box-shadow: 0 1px 3px rgba(16,24,40,.12); padding: 12px; min-width: 0; }
.head { display: flex; gap: 12px; }
.thumb { width: 192px; height: 108px; object-fit: cover; border-radius: 6px; flex: none; background: #d9dde6; }
.placeholder { display: flex; align-items: center; justify-content: center; color: var(--muted); font-size: 12px; background: repeating-linear-gradient(45deg, #e4e7ee, #e4e7ee 8px, #eef0f5 8px, #eef0f5 16px); }
.info { min-width: 0; flex: 1; }
h2 { font-size: 15px; margin: 0; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.uri { color: var(--muted); font-size: 12px; margin: 0 0 6px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
ul { list-style: none; margin: 0; padding: 0; }
.chips { display: flex; flex-wrap: wrap; gap: 4px; margin-bottom: 6px; }
.chip { background: #e3f5eb; color: #11643c; border-radius: 10px; padding: 1px 8px; font-size: 12px; }
.chips .none { color: var(--muted); font-size: 12px; }
.tag { display: grid; grid-template-columns: 140px 1fr 36px; gap: 6px; align-items: center; font-size: 12px; }
.tag .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tag.label .name { font-weight: 600; }
.bar { height: 8px; background: #edf0f5; border-radius: 4px; overflow: hidden; }
.bar span { display: block; height: 100%; background: var(--accent); }
.tag.label .bar span { background: var(--label); }
.p { text-align: right; color: var(--muted); font-variant-numeric: tabular-nums; }
details summary { cursor: pointer; color: var(--muted); font-size: 12px; }
.timeline { margin-top: 10px; border-top: 1px solid #eceff4; padding-top: 8px; }
.axis { display: flex; justify-content: space-between; color: var(--muted); font-size: 11px; margin-left: 126px; }
.row { display: flex; align-items: center; gap: 6px; margin: 3px 0; }
.rname { width: 120px; flex: none; font-size: 12px; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.track { position: relative; flex: 1; height: 14px; background: #eef1f6; border-radius: 3px; }
.span { position: absolute; top: 0; bottom: 0; min-width: 2px; background: #e8792b; border-radius: 3px; }
.windows { display: flex; gap: 4px; margin: 6px 0 0 126px; overflow-x: auto; }
.windows figure { margin: 0; flex: 0 0 auto; text-align: center; font-size: 10px; color: var(--muted); }
.windows img, .windows .placeholder { width: 64px; height: 36px; object-fit: cover; border-radius: 3px; display: block; }
"""

# The filter: a video stays when one of its names (labels, top-k, spans) contains the query,
# case-insensitively; within it, only the span rows whose label contains the query stay.
_SCRIPT = """
(function () {
  var input = document.getElementById("tag-filter");
  var count = document.getElementById("shown-count");
  var cards = Array.prototype.slice.call(document.querySelectorAll('[data-testid="video-card"]'));
  function has(name, q) { return name.toLowerCase().indexOf(q) !== -1; }
  function apply(raw) {
    var q = (raw || "").trim().toLowerCase(), shown = 0;
    cards.forEach(function (card) {
      var names = JSON.parse(card.getAttribute("data-tags"));
      var hit = !q || names.some(function (n) { return has(n, q); });
      card.hidden = !hit;
      if (hit) shown++;
      card.querySelectorAll('[data-testid="span-row"]').forEach(function (row) {
        row.hidden = !!q && !has(row.getAttribute("data-name"), q);
      });
    });
    count.textContent = shown + " of " + cards.length + " videos" + (q ? " with a tag matching \\u201c" + raw.trim() + "\\u201d" : "");
  }
  function fromUrl() {
    var hash = new URLSearchParams(location.hash.replace(/^#/, ""));
    return hash.get("tag") || new URLSearchParams(location.search).get("tag") || "";
  }
  function remember(value) {
    try { history.replaceState(null, "", value ? "#tag=" + encodeURIComponent(value) : location.pathname + location.search); }
    catch (e) { /* some browsers refuse it on file:// pages; the filter works without */ }
  }
  input.addEventListener("input", function () { apply(input.value); remember(input.value); });
  document.getElementById("clear-filter").addEventListener("click", function () { input.value = ""; apply(""); remember(""); });
  window.addEventListener("hashchange", function () { input.value = fromUrl(); apply(input.value); });
  input.value = fromUrl();
  apply(input.value);
})();
"""

_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{style}</style>
</head>
<body>
<header>
<h1>Video tags</h1>
<p class="meta">From <code>{source}</code>, {generated}.</p>
{cap}
<div class="controls">
<label for="tag-filter">Filter by tag</label>
<input id="tag-filter" type="search" list="tag-names" placeholder="a tag name" autocomplete="off">
<datalist id="tag-names">{options}</datalist>
<button id="clear-filter" type="button">Clear</button>
<span id="shown-count" data-testid="shown-count">{shown}</span>
</div>
</header>
<main id="gallery">
{cards}
</main>
<script>{script}</script>
</body>
</html>
"""
