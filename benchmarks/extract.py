"""Extraction benchmarks, each a ratio measured side by side in one run (these machines are noisy).

    python benchmarks/extract.py [--depth 50] [--segments 32] [--videos 12] [--skip a,b,c,d,e,f]

(a) per clip: the CPU seconds (user + system, all threads) of our decode + preprocess of 300
    segments against those of `ffmpeg -threads 1 -i CLIP -f null -` on the same clip (goals:
    <= 1.3x in geometric mean, <= 2x on any clip), best of 3: the bundled real clips (all 72-310
    frames, so every frame is converted to RGB and resized), generated one-minute H.264 clips
    (1800 frames, 300 sampled) and generated clips in other codecs and containers (MPEG-4 Part 2
    with B-frames in AVI, MJPEG, MPEG-2 in TS, 1080p H.264, HEVC, VP9). For each clip: the path
    the reader takes (decoder auto: PyAV's one pass), then decord forced (its seeking, and its
    sequential read of every frame) where it can read the clip, the reader's read of every frame
    (the frame cache's, `iter_all_frames`, every frame converted and cropped), the timeline path (`--segments`: the 300 samples and a 1 frame/s timeline from one decode)
    against the samples alone, and the reader's path with Pillow's full resize then the crop (the
    preprocessing before the compiled crop-only resize, `scale_and_crop(backend="pillow")`: the
    same bytes).
(b) throughput of the Ray Data pipeline (decode tasks -> TSN actor -> writer) against a
    sequential loop that decodes and then infers one video at a time, the seed's way (decode
    every frame into a list, sample, preprocess, run the dygraph model), on the same clips and
    model (goal >= 1.8x on 2 cores). A second baseline, a sequential loop over our own decoder
    and inference engine, separates what pipelining buys from what the engine buys.
(c) peak memory (max RSS of a fresh process) of decoding a 10-minute clip against a 10-second
    one, for our decoders and for the seed's decode-everything loop.
(d) the CPU inference engine: ResNet-101 frames/s and GFLOP/s of dygraph as it comes and of the
    Paddle Inference path the TSN actors use, against numpy's sgemm on the same cores.
(f) where preprocessing's time goes, per frame size: Pillow's bilinear resize to 341x256 (what
    VideoTag's scale is), its `box=` resize of only the crop and how many of the crop's values that
    gets wrong (it is not exact), the compiled crop-only resize the reader uses
    (`video/resample.py`) and how many values it gets wrong (none: it is exact), and PyAV's
    conversion to RGB with a converter per frame (`to_ndarray(format="rgb24")`) against one reused
    converter on one thread. Then the compiled resize's start-up in a fresh process: compiling it
    (an empty numba cache) and loading it from numba's cache.
(e) `jobs/tag.py` over the bundled clips with and without `--segments 10` (1 frame/s): the run
    summary's `stage_seconds` (decode, preprocess) of each, and the ratio of the decode stage's
    (goal <= 1.15x), with a small TSN and AttentionLSTM (decode does not depend on them).
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

CLIPS = [
    "mmaction2_demo.mp4",
    "mmaction2_test.mp4",
    "mmaction2_test.avi",
    "mmaction2_test_video_structuralize.mp4",
    "paddlevideo_example.avi",
    "paddlevideo_eivideo_example.mp4",
    "decord_flipping_a_pancake.mkv",
    "mmaction2_demo_skeleton_1080p.mp4",
]
EXAMPLES = ROOT / "examples" / "videos"


def ffmpeg_binary() -> str:
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg  # the `bench` extra

    return imageio_ffmpeg.get_ffmpeg_exe()


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def cpu_of(fn, repeats: int = 3) -> float:
    """Best CPU seconds (user + system of every thread of this process) of ``fn()``."""
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return min(times)


def child_cpu_of(cmd: list[str], repeats: int = 3) -> float:
    """Best CPU seconds (user + system) of a child process running ``cmd``."""
    import resource

    times = []
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(cmd, check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        times.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return min(times)


def long_clips(workdir: Path) -> list[Path]:
    """One-minute H.264 clips (1800 frames at 30 fps), where sampling skips most frames."""
    from clips import write_noise_clip

    sizes = {"340x256": (340, 256), "640x360": (640, 360), "1280x720": (1280, 720)}
    return [
        write_noise_clip(workdir / f"generated_1min_{name}.mp4", 1800, w, h, fps=30) for name, (w, h) in sizes.items()
    ]


# Codecs and containers the tests do not decode at these sizes: (file, codec, size, frames, pix_fmt, options).
CODEC_CLIPS = [
    ("mpeg4_bframes_640x360.avi", "mpeg4", (640, 360), 250, "yuv420p", {"bf": "2", "b": "2M"}),
    ("mjpeg_640x360.avi", "mjpeg", (640, 360), 250, "yuvj420p", {"b": "8M"}),
    ("mpeg2_720x576.ts", "mpeg2video", (720, 576), 250, "yuv420p", {"bf": "2", "b": "4M"}),
    ("h264_1920x1080.mp4", "libx264", (1920, 1080), 250, "yuv420p", {"preset": "veryfast"}),
    (
        "hevc_1280x720.mp4",
        "libx265",
        (1280, 720),
        250,
        "yuv420p",
        {"preset": "ultrafast", "x265-params": "log-level=none"},
    ),
    ("vp9_640x360.webm", "libvpx-vp9", (640, 360), 250, "yuv420p", {"deadline": "realtime", "cpu-used": "8"}),
    ("h264_1min_1920x1080.mp4", "libx264", (1920, 1080), 1500, "yuv420p", {"preset": "ultrafast"}),
]


def codec_clips(workdir: Path) -> list[Path]:
    """10-second clips (and a one-minute 1080p one) of smoothly moving shapes over a gradient."""
    from clips import write_clip

    made = []
    for name, codec, (w, h), frames, pix_fmt, options in CODEC_CLIPS:
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) * 127 // (w + h))], -1).astype(np.uint8)

        def gen(base=base, w=w, h=h, frames=frames):
            for i in range(frames):
                f = np.roll(base, (i * 2, i * 5), (0, 1)).copy()
                x0, y0 = (i * 7) % (w - w // 4), (i * 3) % (h - h // 4)
                f[y0 : y0 + h // 4, x0 : x0 + w // 4] = (255 - i % 256, i % 256, 128)
                yield f

        made.append(write_clip(workdir / name, gen(), w, h, 25, codec, pix_fmt, options))
    return made


def bench_decode(clips: list[Path]) -> None:
    from vtplatform.video.reader import (
        BadVideo,
        ReadOptions,
        infer_plan,
        iter_all_frames,
        read_frames,
        read_frames_and_timeline,
    )
    from vtplatform.video.sampling import infer_indices
    from vtplatform.video.transforms import scale_and_crop

    ffmpeg = ffmpeg_binary()
    plan = infer_plan(300)
    pillow_plan = (lambda n: infer_indices(n, 300)), functools.partial(scale_and_crop, backend="pillow")
    paths = {
        "auto": ReadOptions(threads=1),
        "decord": ReadOptions(decoder="decord", threads=1),
    }

    def sampled(clip: Path, options: ReadOptions, plan=plan):
        return read_frames(str(clip), *plan, options)

    def timeline(clip: Path) -> None:
        info, frames = read_frames_and_timeline(str(clip), *plan, 1.0, paths["auto"])
        for _ in frames:
            pass
        assert info.sampled is not None

    def every_frame(clip: Path, options: ReadOptions) -> None:
        _, frames = iter_all_frames(str(clip), plan[1], options)
        for _ in frames:
            pass

    print("\n(a) CPU seconds (user+system, all threads) of decode + preprocess of 300 segments, best of 3,")
    print("    against `ffmpeg -threads 1 -i CLIP -f null -` (its process's CPU seconds) on the same clip")
    print(f"    ffmpeg: {ffmpeg}")
    print(
        f"    {'clip':<40} {'frames':>6} {'path':<12} {'ours':>7} {'ffmpeg':>7} {'ratio':>6}"
        f" | {'decord':>6} {'dec-seq':>7} {'all':>6} | {'+timeline':>9} {'ratio':>6} {'vs alone':>8}"
        f" | {'pillow':>6} {'ratio':>6}"
    )
    ratios, timeline_ratios, pillow_ratios, worst = [], [], [], ("", 0.0)
    for clip in clips:
        theirs = child_cpu_of([ffmpeg, "-v", "error", "-threads", "1", "-i", str(clip), "-f", "null", "-"])
        first = sampled(clip, paths["auto"])
        ours = cpu_of(lambda c=clip: sampled(c, paths["auto"]))
        forced = {}
        try:
            forced["decord"] = f"{cpu_of(lambda c=clip: sampled(c, paths['decord'])) / theirs:5.2f}x"
        except BadVideo:
            forced["decord"] = "   -  "
        for name in ("decord", "auto"):
            try:
                seconds = cpu_of(lambda c=clip, o=paths[name]: every_frame(c, o), repeats=1)
                forced[f"all-{name}"] = f"{seconds / theirs:5.2f}x"
            except BadVideo:
                forced[f"all-{name}"] = "   -  "
        with_timeline = cpu_of(lambda c=clip: timeline(c))
        with_pillow = cpu_of(lambda c=clip: sampled(c, paths["auto"], pillow_plan))
        ratios.append(ours / theirs)
        timeline_ratios.append(with_timeline / theirs)
        pillow_ratios.append(with_pillow / theirs)
        worst = max(worst, (clip.name, ours / theirs), key=lambda x: x[1])
        print(
            f"    {clip.name:<40} {first.num_frames:>6} {first.decoder:<12} {ours:>7.3f} {theirs:>7.3f}"
            f" {ours / theirs:>5.2f}x | {forced['decord']:>6} {forced['all-decord']:>7} {forced['all-auto']:>6}"
            f" | {with_timeline:>9.3f} {with_timeline / theirs:>5.2f}x {with_timeline / ours:>7.2f}x"
            f" | {with_pillow:>6.3f} {with_pillow / theirs:>5.2f}x"
        )
    print(
        f"    geometric mean ratio {np.exp(np.mean(np.log(ratios))):.2f}x (goal <= 1.3x), worst {worst[1]:.2f}x"
        f" on {worst[0]} (goal <= 2x); with the timeline: {np.exp(np.mean(np.log(timeline_ratios))):.2f}x;"
        f" with Pillow's full resize: {np.exp(np.mean(np.log(pillow_ratios))):.2f}x"
    )


def seed_way_features(path: str, model, segments: int) -> np.ndarray:
    """The seed's loop for one video: decode every frame into a list, sample, preprocess, infer in dygraph."""
    import av
    import paddle

    from vtplatform.video.sampling import infer_indices
    from vtplatform.video.transforms import normalize, scale_and_crop

    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]  # the whole video in RAM
    crops = np.stack([scale_and_crop(frames[i]) for i in infer_indices(len(frames), segments)])
    x = normalize(crops, model.config.image_mean, model.config.image_std)
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy()


def bench_pipeline(clips: list[Path], depth: int, segments: int, videos: int, workdir: Path) -> None:
    import ray

    from vtplatform.config import load_config
    from vtplatform.extract import run_extract
    from vtplatform.inference import frame_engine
    from vtplatform.models.tsn import TSNConfig, load_backbone
    from vtplatform.video.reader import ReadOptions, infer_plan, read_frames

    paths = []
    for i in range(videos):  # distinct files, so every one is a separate video
        src = clips[i % len(clips)]
        dst = workdir / "lib" / f"{i:03d}_{src.name}"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
        paths.append(dst)
    (workdir / "m.list").write_text("\n".join(map(str, paths)) + "\n")
    print(f"\n(b) {videos} videos, ResNet-{depth}, {segments} segments, 2 CPU cores")

    model, _ = load_backbone(TSNConfig(depth), None)
    seed_way_features(str(paths[0]), model, segments)  # warm-up
    start = time.perf_counter()
    for p in paths:
        seed_way_features(str(p), model, segments)
    seed_time = time.perf_counter() - start

    engine = frame_engine(model, "cpu", "float32", threads=os.cpu_count() or 2)
    plan = infer_plan(segments)
    start = time.perf_counter()
    for p in paths:
        engine(read_frames(str(p), *plan, ReadOptions()).frames)
    ours_sequential = time.perf_counter() - start

    overrides = [
        f"MODEL.num_layers={depth}",
        f"INFER.seg_num={segments}",
        "resources.use_gpu=false",
        "resources.tsn_cpus=1",
    ]
    overrides += [
        f"resources.tsn_threads={os.cpu_count() or 2}",
        "resources.tsn_batch_size=1",
        "resources.tsn_frames_per_forward=32",
    ]
    config = load_config(ROOT / "configs" / "tsn.yaml", overrides)
    ray.init(num_cpus=os.cpu_count() or 2, include_dashboard=False, log_to_driver=False)
    try:
        start = time.perf_counter()
        summary = run_extract(config, str(workdir / "m.list"), str(workdir / "out"))
        pipeline = time.perf_counter() - start
    finally:
        ray.shutdown()
    assert summary.succeeded == videos, summary.format()
    print(f"    seed's way (decode all, dygraph), sequential {seed_time:7.1f} s  {videos / seed_time:.3f} videos/s")
    print(
        f"    our decoder + Paddle Inference, sequential   {ours_sequential:7.1f} s  {videos / ours_sequential:.3f} videos/s"
    )
    print(f"    Ray Data pipeline (incl. actor start-up)     {pipeline:7.1f} s  {videos / pipeline:.3f} videos/s")
    print(
        f"    pipeline vs seed's way: {seed_time / pipeline:.2f}x (goal >= 1.8x); vs our sequential loop: {ours_sequential / pipeline:.2f}x"
    )


PEAK = """
import sys
sys.path.insert(0, {root!r})
sys.path.insert(0, {bench!r})
mode, path = sys.argv[1], sys.argv[2]
if mode == "seed":
    import av
    with av.open(path) as c:
        frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
else:
    from vtplatform.video.reader import ReadOptions, infer_plan, read_frames
    read_frames(path, *infer_plan(300), ReadOptions(decoder=mode))
# VmHWM is this process's own peak (ru_maxrss would carry the parent's peak across fork+exec)
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
"""


def bench_memory(workdir: Path) -> None:
    from clips import write_noise_clip

    print("\n(c) peak RSS (VmHWM) of a fresh process decoding a clip (340x256, 30 fps, H.264)")
    lengths = {"10 s": 300, "1 min": 1800, "10 min": 18000}
    made = {name: write_noise_clip(workdir / f"{n}.mp4", n, 340, 256, fps=30) for name, n in lengths.items()}
    code = PEAK.format(root=str(ROOT), bench=str(ROOT / "benchmarks"))

    def peak(mode: str, path: Path) -> int:
        return int(subprocess.check_output([sys.executable, "-c", code, mode, str(path)], text=True).split()[-1])

    labels = {"auto": "ours (default)", "pyav": "ours (PyAV only)", "decord": "decord forced"}
    for mode, label in labels.items():
        short, long = peak(mode, made["10 s"]), peak(mode, made["10 min"])
        print(f"    {label:<17} 10 s: {short:5d} MB   10 min: {long:5d} MB   ratio {long / short:.2f}x")
    short, minute = peak("seed", made["10 s"]), peak("seed", made["1 min"])
    print(
        f"    seed's loop      10 s: {short:5d} MB    1 min: {minute:5d} MB   ratio {minute / short:.2f}x (10 min would need ~{18000 * 340 * 256 * 3 >> 20} MB)"
    )


RESNET101_GFLOP = 7.8 * 2  # multiply-adds per 224x224 frame, counted as 2 FLOPs


def bench_engine(frames: int = 16) -> None:
    from vtplatform.inference import frame_engine
    from vtplatform.models.tsn import TSNConfig, load_backbone

    threads = os.cpu_count() or 2
    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    a @ a
    sgemm = best_of(lambda: a @ a)
    sgemm_gflops = 2 * 2048**3 / sgemm / 1e9
    model, _ = load_backbone(TSNConfig(101), None)
    batch = np.random.default_rng(1).integers(0, 256, (frames, 224, 224, 3), dtype=np.uint8)
    print(f"\n(d) ResNet-101 on {threads} CPU threads, {frames} frames per call, best of 3")
    print(f"    numpy sgemm 2048^3: {sgemm_gflops:.0f} GFLOP/s")
    for runtime in ("dygraph", "auto"):
        engine = frame_engine(model, "cpu", "float32", threads=threads, runtime=runtime)
        engine(batch[:2])
        seconds = best_of(lambda e=engine: e(batch)) / frames
        name = "dygraph as it comes" if runtime == "dygraph" else "Paddle Inference + oneDNN"
        gflops = RESNET101_GFLOP / seconds
        print(
            f"    {name:<26} {seconds:.3f} s/frame  {gflops:5.0f} GFLOP/s  ({gflops / sgemm_gflops:.2f} of sgemm; FLOPs = 2 x multiply-adds)"
        )


def bench_preprocess(repeats: int = 50) -> None:
    import av
    from av.video.reformatter import VideoReformatter
    from PIL import Image

    from vtplatform.video.transforms import scale_and_crop

    def ms(fn) -> float:
        fn()
        start = time.process_time()
        for _ in range(repeats):
            fn()
        return (time.process_time() - start) / repeats * 1e3

    print("\n(f) per frame, CPU ms: Pillow's resize to 341x256; its box= resize of the 224x224 crop (values off by")
    print(
        "    one against the full resize's crop); ours, the compiled crop-only resize the reader uses (values off: none);"
    )
    print("    PyAV's yuv420p -> rgb24 with a new converter per frame, and one reused")
    print(
        f"    {'frame':>9} {'resize':>7} {'box':>7} {'box off':>8} {'ours':>7} {'ours off':>8}"
        f" {'new conv':>9} {'reused':>7}"
    )
    rng = np.random.default_rng(0)
    for w, h in [(320, 240), (426, 240), (640, 360), (1280, 720), (1920, 1080)]:
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(rgb)
        full = ms(lambda im=image: im.resize((341, 256), Image.BILINEAR))
        box = (58 * w / 341, 16 * h / 256, 282 * w / 341, 240 * h / 256)
        cropped = ms(lambda im=image, b=box: im.resize((224, 224), Image.BILINEAR, box=b))
        want = np.asarray(image.resize((341, 256), Image.BILINEAR))[16:240, 58:282]
        got = np.asarray(image.resize((224, 224), Image.BILINEAR, box=box))
        ours = ms(lambda x=rgb: scale_and_crop(x))
        exact = scale_and_crop(rgb)
        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
        # to_ndarray(format=...) on each new decoded frame builds that frame's own converter: so does this
        fresh = ms(lambda f=frame: VideoReformatter().reformat(f, format="rgb24").to_ndarray())
        converter = VideoReformatter()
        reused = ms(lambda f=frame, c=converter: c.reformat(f, format="rgb24", threads=1).to_ndarray())
        print(
            f"    {w:>4}x{h:<4} {full:>7.2f} {cropped:>7.2f} {(want != got).mean():>7.3%} {ours:>7.2f}"
            f" {(want != exact).mean():>7.3%} {fresh:>9.2f} {reused:>7.2f}"
        )
    code = "import time; from vtplatform.video.resample import _kernels; _kernels(required=True); print(time.process_time())"
    with tempfile.TemporaryDirectory(prefix="vtp-numba-") as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
        runs = [float(subprocess.check_output([sys.executable, "-c", code], env=env, text=True)) for _ in range(2)]
    print(
        f"    the compiled resize in a fresh process, CPU s to import it and have it ready: {runs[0]:.2f} compiling"
        f" it (empty numba cache), {runs[1]:.2f} loading it from numba's cache"
    )


def bench_segments(workdir: Path, repeats: int) -> None:
    """jobs/tag.py over the bundled clips without and with --segments 10 (1 frame/s): stage_seconds."""
    import glob
    import json

    from vtplatform.models import weights as W
    from vtplatform.models.attention_lstm import AttentionLSTMConfig, build_model, fluid_name_map

    classes = 20
    model = build_model(AttentionLSTMConfig(512, 16, 8, 32, 16, classes), seed=7)
    W.save_state(model, fluid_name_map(model), workdir / "lstm.pdparams")
    (workdir / "labels.txt").write_text("\n".join(f"tag{i:02d}" for i in range(classes)) + "\n")
    (workdir / "bundled.list").write_text("\n".join(str(EXAMPLES / c) for c in CLIPS) + "\n")
    small = ["MODEL.num_layers=18", "MODEL.feature_dims=[512]", "MODEL.embedding_size=16", "MODEL.lstm_size=8"]
    small += ["MODEL.fc1_size=32", "MODEL.fc2_size=16", f"MODEL.num_classes={classes}", "tag.timeline_fps=1.0"]
    small += [f"tag.label_file={workdir / 'labels.txt'}"]
    print(
        f"\n(e) jobs/tag.py over the {len(CLIPS)} bundled clips (300 segments, ResNet-18): stage_seconds, {repeats} runs each"
    )
    seconds: dict[str, list[dict]] = {"without": [], "with --segments 10": []}
    for run in range(repeats):
        for name in seconds:
            out = workdir / f"tag-{run}-{name.split()[0]}"
            cmd = [sys.executable, str(ROOT / "jobs" / "tag.py"), "--config", str(ROOT / "configs" / "tag.yaml")]
            cmd += ["--filelist", str(workdir / "bundled.list"), "--save_dir", str(out)]
            cmd += ["--lstm_weights", str(workdir / "lstm.pdparams"), *(a for o in small for a in ("-o", o))]
            if name != "without":
                cmd += ["--segments", "10"]
            subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT, env={**os.environ, "RAY_ADDRESS": "local"})
            summary = json.loads(Path(sorted(glob.glob(str(out / "runs" / "*.json")))[-1]).read_text())
            seconds[name].append(summary["stage_seconds"])
            stages = ", ".join(f"{k} {v:.2f} s" for k, v in summary["stage_seconds"].items())
            print(f"    run {run + 1} {name:<20} {stages}")
    best = {name: min(s["decode"] for s in runs) for name, runs in seconds.items()}
    ratio = best["with --segments 10"] / best["without"]
    print(
        f"    decode stage, best of {repeats}: {best['without']:.2f} s without, {best['with --segments 10']:.2f} s with"
        f" --segments 10: {ratio:.2f}x (goal <= 1.15x)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=50)
    p.add_argument("--segments", type=int, default=32)
    p.add_argument("--videos", type=int, default=12)
    p.add_argument("--skip", default="", help="comma-separated parts to skip: a,b,c,d,e,f")
    p.add_argument("--repeats", type=int, default=2, help="(e): runs of each tag job")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    skip = set(filter(None, args.skip.split(",")))
    clips = [EXAMPLES / c for c in CLIPS]
    with tempfile.TemporaryDirectory(prefix="vtp-bench-") as tmp:
        if "a" not in skip:
            bench_decode(clips + long_clips(Path(tmp)) + codec_clips(Path(tmp)))
        if "b" not in skip:
            bench_pipeline(clips, args.depth, args.segments, args.videos, Path(tmp))
        if "c" not in skip:
            bench_memory(Path(tmp))
        if "d" not in skip:
            bench_engine()
        if "e" not in skip:
            bench_segments(Path(tmp), args.repeats)
        if "f" not in skip:
            bench_preprocess()


if __name__ == "__main__":
    main()
