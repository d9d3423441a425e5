"""Decode a TSN video list once into a frame cache (Parquet shards of scaled frames) for fast training.

    python jobs/cache_frames.py --config configs/tsn.yaml --filelist LIST --save_dir CACHE [-o frame_cache.encoding=uint8]
    python jobs/train.py --model_name=TSN --config configs/tsn.yaml -o frame_cache.path=CACHE ...

Exit codes: 0 done (some videos may be dead letters), 1 nothing at all succeeded, 2 bad configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument("--filelist", default=None, help="video list ('path [label]' per line), directory, glob or table")
    p.add_argument("--save_dir", required=True, help="cache folder or s3:// prefix")
    p.add_argument("--retry_failed", action="store_true", help="decode the dead letters of earlier runs again")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.config import ConfigError, load_config
    from vtplatform.frame_cache import run_cache

    config = load_config(args.config, cli.overrides(args, {"filelist": "TRAIN.filelist"}))
    filelist = config.train.filelist
    if not filelist:
        raise ConfigError("no list to cache: pass --filelist or set TRAIN.filelist")
    cli.init_ray()
    summary = run_cache(config, filelist, args.save_dir, retry_failed=args.retry_failed)
    print(summary.format(), flush=True)
    if summary.submitted + summary.failed_total > 0 and summary.succeeded == 0:
        return cli.EXIT_NOTHING_SUCCEEDED
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
