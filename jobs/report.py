"""Build a static HTML report of a tags OUT: a gallery of the videos, their tags, timelines and thumbnails.

    python jobs/report.py --tags OUT --save_dir OUT/report        # then open OUT/report/index.html
    python jobs/report.py --tags s3://BUCKET/tags --save_dir report -o storage.endpoint_url=http://HOST:9000

The page needs no server and no network: one index.html plus the thumbnails it shows, copied
from OUT/thumbnails. No video is decoded. --config is optional: only its storage section is
read (for s3://; without a config the standard AWS environment applies), e.g. configs/tag.yaml.
Exit codes: 0 done, 2 bad configuration (no tags under --tags, a bad flag).
"""

import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli
from vtplatform.schema import REPORT_DIR


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0], config_required=False)
    p.add_argument("--tags", required=True, help="the OUT folder or s3:// prefix of jobs/tag.py")
    p.add_argument("--save_dir", default=None, help=f"output folder or s3:// prefix (default: TAGS/{REPORT_DIR})")
    p.add_argument("--max_videos", type=int, default=500, help="videos on the page, the first by video id")
    p.add_argument("--max_timeline_labels", type=int, default=5, help="timeline rows per video")
    p.add_argument("--max_window_thumbnails", type=int, default=12, help="window thumbnails per timeline")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.config import load_config
    from vtplatform.report import ReportOptions, build_report

    config = load_config(args.config, args.override)
    options = ReportOptions(
        max_videos=args.max_videos,
        max_timeline_labels=args.max_timeline_labels,
        max_window_thumbnails=args.max_window_thumbnails,
    )
    save_dir = args.save_dir or f"{args.tags.rstrip('/')}/{REPORT_DIR}"
    summary = build_report(args.tags, save_dir, config.storage, options)
    print(json.dumps(dataclasses.asdict(summary), indent=1), flush=True)
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
