"""What a training run leaves besides its checkpoints: TensorBoard scalars, history, curves."""

from __future__ import annotations

import json
import struct
from dataclasses import fields
from pathlib import Path

from vtplatform.models.weights import CheckpointMeta

META_KEYS = {f.name for f in fields(CheckpointMeta)} - {"extra"}  # what every trainer writes


def scalar_tags(blob: bytes) -> set[str]:
    """Scalar tags in a TensorBoard event file (TFRecord framing around Event protos)."""
    from tensorboardX.proto import event_pb2

    tags, pos = set(), 0
    while pos < len(blob):
        (length,) = struct.unpack("<Q", blob[pos : pos + 8])
        event = event_pb2.Event.FromString(blob[pos + 12 : pos + 12 + length])
        tags.update(v.tag for v in event.summary.value)
        pos += 12 + length + 4
    return tags


def run_files(run: Path) -> tuple[set[str], list[dict]]:
    """(TensorBoard scalar tags, history.json) of a local run folder; checks that curves.png is a PNG."""
    events = [p for p in (run / "tensorboard").iterdir() if "tfevents" in p.name]
    assert events, f"no TensorBoard event file in {run}/tensorboard"
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return set().union(*(scalar_tags(p.read_bytes()) for p in events)), json.loads((run / "history.json").read_text())
