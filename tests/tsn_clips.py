"""Labelled test clips for TSN training: the class is the colour cast of a noisy, moving texture."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.clips import write_clip

TINTS = np.array([[70, -35, -35], [-35, 70, -35], [-35, -35, 70], [50, 50, -60]], np.int16)
# Every phase's frame sizes for training on these clips: 32-pixel crops of a 36-pixel short side keep
# the colour that tells the classes apart, and a ResNet-18 step costs 0.3x of 56-pixel crops'.
SMALL_FRAMES = [
    f"{phase}.{size}" for phase in ("TRAIN", "VALID", "TEST", "INFER") for size in ("short_size=36", "target_size=32")
]


def class_frames(label: int, num_frames: int, width: int, height: int, seed: int) -> list[np.ndarray]:
    """Grey noise blobs drifting sideways, brightness varying per clip, tinted by the class colour."""
    rng = np.random.default_rng(seed)
    base = rng.integers(40, 216, (height // 8 + 1, width // 8 + 2, 1), dtype=np.int16)
    big = np.kron(base, np.ones((8, 8, 1), np.int16))
    brightness = int(rng.integers(-30, 31))
    frames = []
    for i in range(num_frames):
        shifted = np.roll(big, i * 2, axis=1)[:height, :width]
        rgb = np.clip(shifted + TINTS[label] + brightness, 0, 255).astype(np.uint8)
        frames.append(np.ascontiguousarray(np.broadcast_to(rgb, (height, width, 3))))
    return frames


def write_class_clips(
    folder: Path,
    per_class: int,
    num_classes: int = 3,
    num_frames: int = 12,
    width: int = 96,
    height: int = 72,
    seed: int = 0,
) -> list[tuple[Path, int]]:
    """``per_class`` clips of each class; returns (path, label) pairs, classes interleaved."""
    out = []
    for i in range(per_class):
        for label in range(num_classes):
            path = Path(folder) / f"c{label}_{i:03d}.mp4"
            clip_seed = seed * 100003 + label * 1009 + i
            write_clip(
                path,
                class_frames(label, num_frames, width, height, clip_seed),
                width,
                height,
                codec="libx264",
                options={"preset": "ultrafast", "crf": "18"},
            )
            out.append((path, label))
    return out


def write_list(path: Path, items: list[tuple[Path, int]]) -> Path:
    Path(path).write_text("".join(f"{p} {label}\n" for p, label in items))
    return Path(path)
