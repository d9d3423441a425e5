"""TSN fine-tuning from videos against fine-tuning from the frame cache, side by side in one run.

    python benchmarks/train_tsn.py [--videos 24] [--depth 18] [--encoding jpeg] [--batch 4] [--workers 1] [--videos_per_task 4]

On the same clips (the bundled real videos, 240p to 1080p, copied under distinct names), the
same model and the same seed:

(a) the cache build (jobs/cache_frames.py's ``run_cache``): a one-off cost, in seconds and MiB;
(b) the data pipeline alone: one epoch of training samples streamed by Ray Data CPU tasks
    (sample, decode, scale, random crop, flip) with no model, best of 2 runs each: samples/s
    from the videos against samples/s from the cache. This is the rate a GPU would be fed;
(c) one training epoch through Ray Train (``run_train``, no validation), best of 2: the epoch
    time from the videos against the epoch time from the cache, and the ratio. On CPU the model's
    own compute shares the cores with decoding, so (c) is bounded by the model; (b) is the
    ceiling a fast accelerator would see.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EXAMPLES = ROOT / "examples" / "videos"
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


def make_list(folder: Path, count: int, classes: int) -> Path:
    lines = []
    for i in range(count):
        src = EXAMPLES / CLIPS[i % len(CLIPS)]
        dst = folder / f"v{i:03d}{src.suffix}"
        shutil.copyfile(src, dst)
        lines.append(f"{dst} {i % classes}\n")
    path = folder / "train.list"
    path.write_text("".join(lines))
    return path


def config_for(args, filelist: Path, cache: Path | None):
    from vtplatform.config import load_config

    overrides = [
        f"MODEL.num_layers={args.depth}",
        "MODEL.num_classes=4",
        f"TRAIN.filelist={filelist}",
        "VALID.filelist=None",
        f"TRAIN.batch_size={args.batch * args.workers}",
        "TRAIN.epoch=1",
        f"TRAIN.target_size={args.target}",
        f"resources.train_workers={args.workers}",
        "train_run.log_interval=1000",
        f"frame_cache.encoding={args.encoding}",
        f"resources.decode_batch_size={args.videos_per_task}",
    ]
    if cache is not None:
        overrides.append(f"frame_cache.path={cache}")
    return load_config(ROOT / "configs" / "tsn.yaml", overrides)


def stream_rate(config, seed: int = 0) -> tuple[float, int]:
    """Samples per second of one epoch of training samples, no model."""
    from vtplatform.frame_cache import open_cache
    from vtplatform.train.tsn import LoadResources, stream
    from vtplatform.tsn_data import attach_cache, clip_spec, read_list, train_samples

    entries = read_list(config.train.filelist, config).entries
    cache = None
    if config.frame_cache.path:
        cache, index = open_cache(config.frame_cache.path, config.storage)
        entries, _ = attach_cache(entries, index)
    batch = config.train.batch_size
    plan = train_samples(entries, range(1), seed, 0, 1, batch)
    res = config.resources
    load = LoadResources(res.decode_cpus, res.decode_concurrency, res.decode_batch_size, res.decode_max_retries)
    start, samples = time.perf_counter(), 0
    for b in stream(plan, clip_spec(config, "train", seed, cache), load, batch):
        samples += b.num_rows
    return samples / (time.perf_counter() - start), samples


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=24)
    p.add_argument("--depth", type=int, default=18)
    p.add_argument("--target", type=int, default=224)
    p.add_argument("--batch", type=int, default=4, help="videos per step per worker")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--encoding", choices=["jpeg", "uint8"], default="jpeg")
    p.add_argument("--videos_per_task", type=int, default=4, help="resources.decode_batch_size: samples per load task")
    args = p.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import logging

    import ray

    logging.basicConfig(level="WARNING")
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ray.data.DataContext.get_current().enable_progress_bars = False
    from vtplatform import schema as S
    from vtplatform.frame_cache import run_cache
    from vtplatform.train.tsn import run_train

    ray.init(num_cpus=max(4, 2 * (os.cpu_count() or 2)), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory(prefix="vtp-bench-tsn-") as tmp:
            work = Path(tmp)
            (work / "videos").mkdir()
            filelist = make_list(work / "videos", args.videos, 4)
            print(f"{args.videos} videos ({len(CLIPS)} real clips, 240p-1080p), ResNet-{args.depth} at {args.target}, "
                  f"{args.workers} worker(s) x {args.batch} videos per step, {args.videos_per_task} samples per load task, "
                  f"{os.cpu_count()} CPU cores")  # fmt: skip

            cache_dir = work / "cache"
            start = time.perf_counter()
            summary = run_cache(config_for(args, filelist, None), str(filelist), str(cache_dir))
            build = time.perf_counter() - start
            print(f"\n(a) cache build: {build:.1f} s for {summary.succeeded} videos, {summary.counts[S.CACHED_FRAMES]} frames, "
                  f"{summary.counts[S.CACHED_BYTES] / 2**20:.0f} MiB ({args.encoding}); a one-off cost")  # fmt: skip

            video_cfg, cache_cfg = config_for(args, filelist, None), config_for(args, filelist, cache_dir)
            rates = {"video": [], "cache": []}
            for _ in range(2):
                rates["video"].append(stream_rate(video_cfg)[0])
                rates["cache"].append(stream_rate(cache_cfg)[0])
            v, c = max(rates["video"]), max(rates["cache"])
            print("\n(b) training samples streamed by Ray Data, no model (best of 2)")
            print(f"    from videos  {v:8.1f} samples/s")
            print(f"    from cache   {c:8.1f} samples/s")
            print(f"    ratio        {c / v:8.2f}x  (cache / video)")

            epochs: dict[str, tuple[float, float]] = {}
            for attempt in range(2):  # alternating, best of 2: this machine's load drifts
                for name, cfg in (("video", video_cfg), ("cache", cache_cfg)):
                    start = time.perf_counter()
                    result = run_train(cfg, str(work / f"runs-{name}-{attempt}"))
                    took = (result.metrics["epoch_seconds"], time.perf_counter() - start)
                    epochs[name] = min(epochs.get(name, took), took)
            print("\n(c) one training epoch on Ray Train, best of 2 (epoch loop time; wall time with start-up)")
            print(f"    from videos  {epochs['video'][0]:8.1f} s  ({epochs['video'][1]:.1f} s)")
            print(f"    from cache   {epochs['cache'][0]:8.1f} s  ({epochs['cache'][1]:.1f} s)")
            print(f"    ratio        {epochs['video'][0] / epochs['cache'][0]:8.2f}x  (video epoch / cache epoch)")
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
