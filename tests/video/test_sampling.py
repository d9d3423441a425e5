import numpy as np
import pytest

from tests.conftest import GOLDEN
from vtplatform.video.sampling import infer_indices


def test_matches_videotag_rule_for_golden_frame_counts():
    golden = np.load(GOLDEN / "sampling_rule.npz")
    for n, expected in zip(golden["num_frames"], golden["indices"], strict=True):
        np.testing.assert_array_equal(infer_indices(int(n), 300), expected, err_msg=f"N={n}")


@pytest.mark.parametrize("n", [1, 7, 299, 300, 301, 1000, 18000])
def test_indices_in_range_and_sorted_when_long(n):
    idx = infer_indices(n, 300)
    assert idx.shape == (300,)
    assert idx.min() >= 0 and idx.max() < n
    if n >= 300:
        assert np.all(np.diff(idx) > 0)  # distinct frames, in order
    else:
        np.testing.assert_array_equal(idx, np.arange(300) % n)  # short videos wrap around


def test_rejects_empty_video():
    with pytest.raises(ValueError):
        infer_indices(0, 300)
