"""Fault-injection hooks for drills and tests, in one place. Each is inert unless its variable
is set in the driver's environment; the driver reads it once and hands it to the workers that
act on it. A malformed value is a configuration error naming the variable (exit code 2), found
when the job starts, never a hang in a worker.

* ``VTP_FAULT_DECODE=crash:TEXT,hang:TEXT2``: a decode task segfaults on a video whose URI
  contains TEXT, and hangs on one containing TEXT2 (the decode watchdog's drill).
* ``VTP_FAULT_INJECT=RANK:STEP``: the AttentionLSTM training worker of that rank raises once at
  that global step (a Python-level failure; the fault-tolerance tests kill processes instead).
* ``VTP_NIGHTLY_STOP_AFTER=STEP``: the nightly driver SIGKILLs itself right after that step.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass

from vtplatform.config import ConfigError

log = logging.getLogger(__name__)

DECODE_ENV = "VTP_FAULT_DECODE"
TRAIN_ENV = "VTP_FAULT_INJECT"
NIGHTLY_ENV = "VTP_NIGHTLY_STOP_AFTER"
DECODE_KINDS = ("crash", "hang")
NIGHTLY_STEPS = ("extract", "train", "evaluate", "promote", "tag", "segments")


@dataclass(frozen=True)
class DecodeFault:
    kind: str  # crash | hang
    text: str  # in the URI


def decode_faults(value: str | None = None) -> tuple[DecodeFault, ...]:
    """The parsed ``VTP_FAULT_DECODE`` (of the environment when ``value`` is None)."""
    value = os.environ.get(DECODE_ENV, "") if value is None else value
    faults = []
    for item in filter(None, (v.strip() for v in value.split(","))):
        kind, sep, text = item.partition(":")
        if not sep or kind not in DECODE_KINDS or not text:
            raise ConfigError(
                f"{DECODE_ENV}={value!r}: each comma-separated item must be KIND:TEXT with KIND one of "
                f"{list(DECODE_KINDS)} and TEXT part of a video URI, got {item!r}"
            )
        faults.append(DecodeFault(kind, text))
    return tuple(faults)


def train_fault(value: str | None = None) -> tuple[int, int] | None:
    """The parsed ``VTP_FAULT_INJECT``: (rank, global step), or None."""
    value = os.environ.get(TRAIN_ENV, "") if value is None else value
    if not value.strip():
        return None
    rank, sep, step = value.strip().partition(":")
    if not sep or not rank.isdigit() or not step.isdigit():
        raise ConfigError(f"{TRAIN_ENV}={value!r} must be RANK:STEP with two non-negative integers, e.g. 1:5")
    return int(rank), int(step)


def nightly_stop(value: str | None = None) -> str | None:
    """The parsed ``VTP_NIGHTLY_STOP_AFTER``: a nightly step name, or None."""
    value = os.environ.get(NIGHTLY_ENV, "") if value is None else value
    if not value.strip():
        return None
    if value.strip() not in NIGHTLY_STEPS:
        raise ConfigError(f"{NIGHTLY_ENV}={value!r} must be one of {list(NIGHTLY_STEPS)}")
    return value.strip()


def check_environment() -> None:
    """Parses every hook variable that is set; raises ``ConfigError`` for a malformed one."""
    decode_faults()
    train_fault()
    nightly_stop()


def act_on_decode(faults: tuple[DecodeFault, ...], uri: str) -> None:
    """Crashes or hangs this worker process when a fault names ``uri``."""
    for fault in faults:
        if fault.text in uri:
            log.warning("%s: %s on %s", DECODE_ENV, fault.kind, uri)
            if fault.kind == "crash":
                os.kill(os.getpid(), signal.SIGSEGV)
            time.sleep(10**6)


def stop_nightly_after(step: str) -> None:
    """SIGKILLs this process right after ``step`` when ``VTP_NIGHTLY_STOP_AFTER`` names it."""
    if nightly_stop() == step:
        log.warning("%s=%s: killing this process after step %s", NIGHTLY_ENV, step, step)
        os.kill(os.getpid(), signal.SIGKILL)
