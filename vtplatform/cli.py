"""What every ``jobs/*.py`` entry point shares: flags, logging, Ray start-up, exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable

from vtplatform import faults, storage
from vtplatform.config import ConfigError
from vtplatform.storage import redact

log = logging.getLogger("vtplatform")

EXIT_OK, EXIT_NOTHING_SUCCEEDED, EXIT_CONFIG, EXIT_STORAGE = 0, 1, 2, 3


def parser(description: str, config_required: bool = True) -> argparse.ArgumentParser:
    """The seed's flags (``--config``) plus ``-o SECTION.key=value`` overrides. A job that reads
    little of the config (``config_required=False``) runs on the defaults without one."""
    p = argparse.ArgumentParser(description=description)
    if config_required:
        p.add_argument("--config", required=True, help="YAML config (the seed's files load as they are)")
    else:
        p.add_argument("--config", default=None, help="YAML config (optional: the defaults without one)")
    p.add_argument(
        "-o",
        "--override",
        action="append",
        default=[],
        metavar="SECTION.key=value",
        help="override a config key; repeatable",
    )
    p.add_argument("--log_level", default=os.environ.get("VTP_LOG_LEVEL", "INFO"))
    return p


def overrides(args: argparse.Namespace, flags: dict[str, str] | None = None) -> list[str]:
    """The ``-o`` overrides, then the job's flags that set config values, as overrides too
    (``flags``: argument name -> ``SECTION.key``); a flag given on the command line wins."""
    out = list(args.override)
    for name, key in (flags or {}).items():
        value = getattr(args, name)
        if value is not None:
            out.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    return out


def setup_logging(level: str) -> None:
    """Logs to stderr, every line redacted (botocore's DEBUG lines carry the access key id)."""
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(storage.RedactingFilter())


def init_ray(**kwargs) -> None:
    """Joins the cluster ``RAY_ADDRESS`` names (``ray job submit`` sets it; ``RAY_ADDRESS=auto`` joins a
    ``ray start`` cluster on this machine), or fails within ``JOIN_TIMEOUT_S`` saying why. Without
    ``RAY_ADDRESS`` (or with ``local``) it starts a fresh local Ray, never the stale cluster that
    ``/tmp/ray/ray_current_cluster`` may still name after that cluster has stopped."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address in ("", "local"):
        start_local_ray(**kwargs)
        storage.track_retries()
        return
    check_reachable(address)
    # A GCS that accepts connections but never answers would keep ray.init retrying forever.
    watchdog = threading.Timer(JOIN_TIMEOUT_S, _join_timed_out, args=(address,))
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.init(address=address, **kwargs)
    finally:
        watchdog.cancel()
    storage.track_retries()  # the workers' retried storage requests reach this driver's summary


def start_local_ray(**kwargs):
    """Starts a fresh local Ray (``ray.init(address="local", **kwargs)``), with a dashboard on
    loopback that its own processes know. Ray's helpers that look their cluster up from inside a
    worker otherwise take the one ``/tmp/ray/ray_current_cluster`` names, or any Ray running on the
    machine: Ray Train's placement group cleaner (an actor of every training run) asks that
    cluster's State API each second whether the run's controller lives. A stale one made every
    training run end with a 12 s wait for the cleaner; another live one, which knows no such
    controller, made it remove the running job's placement group, and training waited forever
    for resources. Returns ``ray.init``'s context."""
    import ray

    port = _free_port()
    kwargs = {"include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port, **kwargs}
    # Read before RAY_ADDRESS by the State API; the raylet, hence every worker, inherits it.
    api = {"RAY_API_SERVER_ADDRESS": f"http://{kwargs['dashboard_host']}:{kwargs['dashboard_port']}"}
    saved = {name: os.environ.get(name) for name in api}
    os.environ.update(api)
    try:
        context = ray.init(address="local", **kwargs)  # "local" never reads RAY_ADDRESS
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    if f"http://{context.dashboard_url}" != api["RAY_API_SERVER_ADDRESS"]:  # the port was taken meanwhile
        log.warning("the local Ray's dashboard is at %s, not %s: Ray Train's placement group cleaner "
                    "will not reach it", context.dashboard_url, api["RAY_API_SERVER_ADDRESS"])  # fmt: skip
    return context


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


JOIN_TIMEOUT_S = float(os.environ.get("VTP_RAY_JOIN_TIMEOUT_S", "60"))
CURRENT_CLUSTER_FILE = "/tmp/ray/ray_current_cluster"  # where `ray start --head` records its address


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raises ``ConfigError`` unless a Ray cluster's GCS accepts connections at ``address``."""
    target = address
    if address == "auto":
        try:
            with open(CURRENT_CLUSTER_FILE, encoding="utf-8") as f:
                target = f.read().strip()
        except OSError:
            raise ConfigError(
                "RAY_ADDRESS=auto, but no Ray cluster was started on this machine (`ray start --head`); "
                "unset RAY_ADDRESS to start a local Ray"
            ) from None
    hostport = target.split("://", 1)[-1].rstrip("/")
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"RAY_ADDRESS={address!r} is not HOST:PORT, ray://HOST:PORT or auto")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, int(port)), timeout=timeout_s):
                return
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"RAY_ADDRESS={address} ({target}): no Ray cluster answers there ({exc}). Start it "
                    "(`ray start --head`), point RAY_ADDRESS at a live one, or unset RAY_ADDRESS to start a local Ray"
                ) from None
            time.sleep(0.5)


def _join_timed_out(address: str) -> None:
    log.error(
        "configuration error: could not join the Ray cluster at RAY_ADDRESS=%s within %g s "
        "(VTP_RAY_JOIN_TIMEOUT_S); is it a live Ray head?",
        address,
        JOIN_TIMEOUT_S,
    )
    logging.shutdown()
    os._exit(EXIT_CONFIG)


def use_system_allocator() -> None:
    """Arrow buffers in this process (the driver) come from the C library's malloc, which hands
    freed memory back. Arrow's default allocator (mimalloc) keeps it: a driver that had read and
    compacted 20,000 dead letters held about 40 MB more at its peak. Ray's workers keep the
    default, which is faster for their large buffers."""
    import pyarrow as pa

    pa.set_memory_pool(pa.system_memory_pool())


def run(main: Callable[[], int]) -> None:
    """Runs ``main`` and exits: its code, 2 for a configuration error (one clear line), 3 for
    storage that kept failing past ``storage.retry_*`` (one clear line naming the URI and the
    last error), 130 on Ctrl-C."""
    try:
        faults.check_environment()
        use_system_allocator()
        code = main()
    except ConfigError as exc:
        log.error("configuration error: %s", redact(str(exc)))
        code = EXIT_CONFIG
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        failure = storage.storage_failure(exc)  # also inside the task errors Ray raises
        if failure is None:
            raise
        log.error("storage failed: %s", failure)
        code = EXIT_STORAGE
    finally:
        retried = storage.storage_retries()  # the job's own summary has them too, where it has one
        if any(retried.values()):
            log.info("storage requests retried: %s", storage.format_retries(retried))
        if "ray" in sys.modules:
            import ray

            ray.shutdown()
    sys.exit(code)
