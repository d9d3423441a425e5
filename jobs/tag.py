"""Tag a video library: decode -> TSN -> AttentionLSTM -> a tags table, in one Ray Data pipeline.

    python jobs/tag.py --config configs/tag.yaml --filelist LIBRARY --save_dir OUT \
        [--tsn_weights W --lstm_weights W2 | --model_dir CHAMPION] [--format json,hub]
        [--segments SECONDS [--stride SECONDS]] [--thumbnails]
    python jobs/tag.py --config configs/tag.yaml --features OUT/features [--timeline OUT/timeline --segments S] \
        --save_dir TAGS --model_dir REGISTRY          # from the stores: no video is opened
    ray job submit --working-dir . -- python jobs/tag.py ...

--segments also tags windows of that many seconds along each video (segments/, spans/; see
README "Where in the video"); --thumbnails writes the JPEGs jobs/report.py shows.
--model_dir takes a registry kept by jobs/nightly.py (its champion) or an AttentionLSTM run or
checkpoint folder. Exit codes: 0 done (some videos may be dead letters), 1 nothing at all
succeeded, 2 bad configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--filelist", default=None, help="list file, directory, glob, or Parquet/CSV table with a uri column"
    )
    p.add_argument("--features", default=None, help="tag the rows of this feature table instead of videos")
    p.add_argument("--timeline", default=None, help="tag windows (--segments) from this timeline table")
    p.add_argument("--save_dir", required=True, help="output folder or s3:// prefix")
    p.add_argument("--tsn_weights", default=None, help="TSN weights (the official VideoTag file or ours)")
    p.add_argument(
        "--lstm_weights", default=None, help="AttentionLSTM weights: official file, checkpoint or run folder"
    )
    p.add_argument("--model_dir", default=None, help="a model registry (its champion) or an AttentionLSTM run folder")
    p.add_argument(
        "--format", default="", help="extra outputs, comma-separated: json (the seed's per-video files), hub"
    )
    p.add_argument("--label_file", default=None, help="class names (sets tag.label_file)")
    p.add_argument(
        "--segments", type=float, default=None, help="also tag windows of this many seconds (tag.segment_seconds)"
    )
    p.add_argument(
        "--stride", type=float, default=None, help="seconds between window starts (tag.segment_stride_seconds)"
    )
    p.add_argument(
        "--thumbnails",
        action="store_const",
        const=True,
        default=None,
        help="write a small JPEG per video and per window, for jobs/report.py (tag.thumbnails)",
    )
    p.add_argument("--retry_failed", action="store_true", help="process the dead letters of earlier runs again")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.champions import resolve_model_dir
    from vtplatform.config import ConfigError, load_config
    from vtplatform.tag import run_tag, run_tag_stores

    flags = {
        "label_file": "tag.label_file",
        "segments": "tag.segment_seconds",
        "stride": "tag.segment_stride_seconds",
        "thumbnails": "tag.thumbnails",
    }
    config = load_config(args.config, cli.overrides(args, flags))
    tsn, lstm = args.tsn_weights, args.lstm_weights
    if args.model_dir:
        if lstm:
            raise ConfigError("give either --model_dir or --lstm_weights, not both")
        champion_tsn, lstm = resolve_model_dir(args.model_dir, config.storage)
        tsn = tsn or champion_tsn
    if not lstm:
        raise ConfigError("tagging needs AttentionLSTM weights: --lstm_weights or --model_dir")
    stores = args.features or args.timeline
    if bool(args.filelist) == bool(stores):
        raise ConfigError("give --filelist (videos) or --features/--timeline (stored tables), not both or neither")
    cli.init_ray()
    formats = tuple(f for f in args.format.split(",") if f)
    if stores:
        summary = run_tag_stores(config, args.save_dir, lstm, args.features, args.timeline, formats, args.retry_failed)
    else:
        summary = run_tag(config, args.filelist, args.save_dir, lstm, tsn, formats, args.retry_failed)
    print(summary.format(), flush=True)
    if summary.submitted + summary.failed_total > 0 and summary.succeeded == 0:
        return cli.EXIT_NOTHING_SUCCEEDED
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
