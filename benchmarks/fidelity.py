"""How close vtplatform is to the original VideoTag ops (the golden fixtures), as numbers.

    python benchmarks/fidelity.py

The tests assert these within the golden README's tolerances; this prints the actual distances.
"""

import importlib.util
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "data" / "golden"
sys.path.insert(0, str(ROOT))

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def tsn() -> None:
    import paddle

    from vtplatform.models.tsn import TSNConfig, load_backbone

    spec = importlib.util.spec_from_file_location("make_tsn_weights", GOLDEN / "make_tsn_weights.py")
    rule = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rule)
    with tempfile.NamedTemporaryFile(suffix=".pdparams") as f:
        pickle.dump(dict(rule.make_tsn_weights()), f, protocol=2)  # as fluid 1.8 saved it
        f.flush()
        model, fingerprint = load_backbone(TSNConfig(101), f.name)
    golden = np.load(GOLDEN / "tsn_r101.npz")
    print("TSN ResNet-101, the official 520 fluid-named parameters")
    print(f"  fingerprint equals the golden weights_sha256: {fingerprint == str(golden['weights_sha256'])}")
    with paddle.no_grad():
        for inputs, expected in (("input", "features"), ("input_demo", "features_demo")):
            got = model(paddle.to_tensor(golden[inputs].reshape(-1, 3, 224, 224))).numpy()
            diff = np.abs(got - golden[expected].reshape(2, -1)).max()
            print(
                f"  {expected:<14} max |diff| {diff:.2e} (tolerance 1e-3; max |feature| {np.abs(golden[expected]).max():.1f})"
            )


def preprocessing() -> None:
    from vtplatform.video.reader import ReadOptions, infer_plan, read_frames
    from vtplatform.video.transforms import normalize

    print("preprocessing (300 segments), against VideoTag's OpenCV + Pillow pipeline")
    for name, clip in (("demo", "mmaction2_demo.mp4"), ("data_example", "paddlevideo_example.avi")):
        golden = np.load(GOLDEN / f"preprocess_{name}.npz")
        for decoder in ("decord", "pyav"):
            out = read_frames(str(ROOT / "examples" / "videos" / clip), *infer_plan(300), ReadOptions(decoder=decoder))
            x = normalize(out.frames, MEAN, STD).reshape(300, -1).astype(np.float64)
            print(
                f"  {name:<12} {decoder:<6} indices equal {bool((out.indices == golden['frame_indices']).all())}, "
                f"crops equal {bool((out.frames[golden['keep_positions']] == golden['frames_crop_uint8']).all())}, "
                f"frame_mean max |diff| {np.abs(x.mean(1) - golden['frame_mean']).max():.1e}, "
                f"frame_std {np.abs(x.std(1) - golden['frame_std']).max():.1e}"
            )


if __name__ == "__main__":
    tsn()
    preprocessing()
