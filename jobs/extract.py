"""Extract TSN features from a video manifest into a Parquet table (plus dead letters).

    python jobs/extract.py --config configs/tsn.yaml --filelist MANIFEST --save_dir OUT [--weights FILE] [-o SECTION.key=value ...]
    ray job submit --working-dir . -- python jobs/extract.py ...

Exit codes: 0 done (some videos may be dead letters), 1 nothing at all succeeded, 2 bad configuration.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout or a Ray working_dir

from vtplatform import cli


def main() -> int:
    p = cli.parser(__doc__.splitlines()[0])
    p.add_argument(
        "--filelist", required=True, help="list file, directory, glob, or Parquet/CSV table with a uri column"
    )
    p.add_argument("--save_dir", required=True, help="output folder or s3:// prefix")
    p.add_argument("--weights", default=None, help="TSN weights: the official VideoTag file or one of ours")
    p.add_argument(
        "--format", choices=["parquet", "npy"], default=None, help="npy also writes the seed's per-video .npy files"
    )
    p.add_argument("--retry_failed", action="store_true", help="process the dead letters of earlier runs again")
    args = p.parse_args()
    cli.setup_logging(args.log_level)

    from vtplatform.config import load_config
    from vtplatform.extract import run_extract

    config = load_config(args.config, cli.overrides(args, {"format": "output.format"}))
    cli.init_ray()
    summary = run_extract(config, args.filelist, args.save_dir, weights=args.weights, retry_failed=args.retry_failed)
    print(summary.format(), flush=True)
    if summary.submitted + summary.failed_total > 0 and summary.succeeded == 0:
        return cli.EXIT_NOTHING_SUCCEEDED
    return cli.EXIT_OK


if __name__ == "__main__":
    cli.run(main)
