"""Pipeline stages shared by extraction and tagging: decode (CPU tasks) and TSN (an actor).

Batches are Arrow tables (``schema.CLIP_SCHEMA`` between the two). A video that fails becomes
a row with ``stage``/``error_type``/``message`` set, which later stages pass through untouched
and the writer turns into a dead letter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vtplatform import faults as F
from vtplatform import schema as S
from vtplatform.config import Config, StorageSection
from vtplatform.storage import local_copy, redact
from vtplatform.video.decode import BadVideo, DecodeOptions, sample_clip

log = logging.getLogger(__name__)

DECODE_SECONDS = "decode_seconds"
INFER_SECONDS = "infer_seconds"
CRASHES_BEFORE_DEAD_LETTER = 2


class DecodeLedger:
    """Counts, per video, the decode attempts that started and never finished.

    A decoder that segfaults or hangs (the watchdog then kills its worker), or a worker killed for
    memory, takes its Ray task down, and Ray retries the task. Before each video, a decode task asks
    here how many earlier attempts died on it; at ``CRASHES_BEFORE_DEAD_LETTER`` the video becomes a
    dead letter instead of taking the next attempt, and the job, down with it. One per pipeline,
    created by ``decode_ledger()``.
    """

    def __init__(self) -> None:
        self.open: dict[str, int] = {}
        self.timeouts: dict[str, int] = {}

    def start(self, video_id: str) -> tuple[int, int]:
        died = self.open.get(video_id, 0)
        self.open[video_id] = died + 1
        return died, self.timeouts.get(video_id, 0)

    def timed_out(self, video_id: str) -> None:
        self.timeouts[video_id] = self.timeouts.get(video_id, 0) + 1

    def finish(self, video_id: str) -> None:
        self.open.pop(video_id, None)
        self.timeouts.pop(video_id, None)


def decode_ledger():
    """A ``DecodeLedger`` on the driver's node (the head under ``ray job submit``), so that losing a
    worker node (a spot instance) never takes the ledger, and the job, with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(DecodeLedger).options(num_cpus=0, scheduling_strategy=here).remote()


def decode_options(config: Config) -> DecodeOptions:
    return DecodeOptions(
        num_segments=config.infer.seg_num,
        short_size=config.infer.short_size,
        target_size=config.infer.target_size,
        decoder=config.extract.decoder,
        threads=config.extract.decode_threads,
        chunk_frames=config.extract.chunk_frames,
        decord_max_frames=config.extract.decord_max_frames,
    )


def decode_videos(
    batch: pa.Table,
    options: DecodeOptions,
    storage: StorageSection,
    ledger=None,
    timeout_s: float | None = None,
    faults: tuple[F.DecodeFault, ...] = (),
) -> pa.Table:
    """(video_id, uri) rows -> ``CLIP_SCHEMA`` rows with the sampled crops or the failure.

    With a ``DecodeLedger``, a video whose decoding killed the process twice becomes a dead letter,
    and a watchdog kills the process when one video takes over ``timeout_s`` (a hung decoder
    cannot be interrupted from Python). ``faults``: the driver's ``VTP_FAULT_DECODE`` drill.
    """
    rows = []
    for vid, uri in zip(batch.column(S.VIDEO_ID).to_pylist(), batch.column(S.URI).to_pylist(), strict=True):
        if ledger is None:
            rows.append(_decode_one(vid, uri, options, storage, faults))
            continue
        import ray

        died, timeouts = ray.get(ledger.start.remote(vid))
        if died >= CRASHES_BEFORE_DEAD_LETTER:
            if timeouts:
                error_type = "DecodeTimeout"
                message = f"reading and decoding this video took over {timeout_s} s in {timeouts} of {died} attempts"
            else:
                error_type = "DecoderCrashed"
                message = "a crash in the decoder library, or a worker killed for memory"
            message = f"the process decoding this video died {died} times ({message}); it is not tried again"
            rows.append({S.VIDEO_ID: vid, S.URI: uri} | _failure("decode", error_type, message, time.perf_counter()))
        else:
            with _watchdog(ledger, vid, timeout_s):
                rows.append(_decode_one(vid, uri, options, storage, faults))
        ledger.finish.remote(vid)  # after start in the actor's order; no need to wait
    return pa.Table.from_pylist(rows, schema=S.CLIP_SCHEMA.append(pa.field(DECODE_SECONDS, pa.float32())))


@contextlib.contextmanager
def _watchdog(ledger, video_id: str, timeout_s: float | None):
    if timeout_s is None:
        yield
        return

    def kill() -> None:
        import ray

        log.error("decoding %s took over %s s: killing this worker", video_id, timeout_s)
        ray.get(ledger.timed_out.remote(video_id))
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(timeout_s, kill)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _decode_one(
    video_id: str, uri: str, options: DecodeOptions, storage: StorageSection, faults: tuple[F.DecodeFault, ...]
) -> dict:
    start = time.perf_counter()
    row = {S.VIDEO_ID: video_id, S.URI: uri}
    F.act_on_decode(faults, uri)
    try:
        with local_copy(uri, storage) as path:
            clip = sample_clip(path, options)
    except BadVideo as bad:
        return row | _failure(bad.stage, bad.error_type, bad.message, start)
    except OSError as exc:  # the object store or file system refused the read
        return row | _failure("read", type(exc).__name__, str(exc), start)
    return row | {
        S.FRAMES: clip.frames.tobytes(),
        S.NUM_FRAMES: clip.num_frames,
        S.FRAME_INDICES: clip.indices.tolist(),
        S.FPS: clip.fps,
        S.WIDTH: clip.width,
        S.HEIGHT: clip.height,
        S.DECODER: clip.decoder,
        DECODE_SECONDS: time.perf_counter() - start,
    }


def _failure(stage: str, error_type: str, message: str, start: float) -> dict:
    return {
        S.STAGE: stage,
        S.ERROR_TYPE: error_type,
        S.MESSAGE: redact(message)[:2000],
        DECODE_SECONDS: time.perf_counter() - start,
    }


@dataclass(frozen=True)
class TSNSpec:
    """Everything a TSN actor needs to build its model, decided once by the driver."""

    depth: int
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    weights: str | None
    seed: int
    device: str  # "cpu" or "gpu"
    precision: str  # "float32" or "float16"
    threads: int
    frames_per_forward: int
    num_segments: int
    target_size: int
    out_dtype: str  # dtype of the features handed on


class TSNStage:
    """Loads the TSN backbone once per actor; turns crops into (seg, C) features per video."""

    def __init__(self, spec: TSNSpec, storage: StorageSection):
        from vtplatform.inference import frame_engine
        from vtplatform.models.tsn import TSNConfig, load_backbone

        self.spec = spec
        with local_copy(spec.weights, storage) if spec.weights else contextlib.nullcontext() as weights:
            backbone, self.fingerprint = load_backbone(
                TSNConfig(spec.depth, spec.image_mean, spec.image_std), weights, spec.seed
            )
        self.engine = frame_engine(backbone, spec.device, spec.precision, spec.threads)

    def features(self, frames: np.ndarray) -> np.ndarray:
        """(N, 224, 224, 3) uint8 -> (N, C) float32, ``frames_per_forward`` frames at a time."""
        step = self.spec.frames_per_forward
        return np.concatenate([self.engine(frames[i : i + step]) for i in range(0, len(frames), step)])

    def __call__(self, batch: pa.Table) -> pa.Table:
        start = time.perf_counter()
        size = self.spec.target_size
        frames = batch.column(S.FRAMES).to_pylist()
        ok = [i for i, f in enumerate(frames) if f is not None]
        out: list[bytes | None] = [None] * len(frames)
        if ok:
            stacked = np.concatenate([np.frombuffer(frames[i], np.uint8).reshape(-1, size, size, 3) for i in ok])
            feats = self.features(stacked).astype(self.spec.out_dtype)
            for j, i in enumerate(ok):
                out[i] = feats[j * self.spec.num_segments : (j + 1) * self.spec.num_segments].tobytes()
        elapsed = (time.perf_counter() - start) / max(len(ok), 1)
        table = batch.drop_columns([S.FRAMES]).append_column(
            pa.field(S.FEATURES, pa.large_binary()), pa.array(out, pa.large_binary())
        )
        seconds = [elapsed if f is not None else 0.0 for f in frames]
        return table.append_column(pa.field(INFER_SECONDS, pa.float32()), pa.array(seconds, pa.float32()))
