"""Export verification's comparison rule (pipeline.verify.compare)."""

import numpy as np
import pytest

from pipeline.errors import ExportError
from pipeline.verify import compare

SCORE = np.array([86.25, 12.0, 40.0], dtype=np.float32)
FLAGS = np.array([True, False, False])


def pairs(score_error: float = 0.0, recon_error: float = 0.0) -> dict:
    recon = np.array([2.239, 10.0, 1.0], dtype=np.float32)  # a small part of the first row's score
    return {"score": (SCORE * (1 + score_error), SCORE), "recon": (recon + recon_error, recon)}


def test_a_part_of_the_score_is_judged_against_its_rows_score():
    # 3.9e-4 on a recon of 2.24 (1.8e-4 of itself) is float32 cancellation, harmless to a score of 86.
    report = compare(pairs(recon_error=3.9e-4), (FLAGS, FLAGS), SCORE, 60.0, 3, "rows")
    assert report["passed"] and report["max_abs_diff"]["recon"] == pytest.approx(3.9e-4, rel=1e-2)


def test_the_score_itself_must_match_within_tolerance():
    with pytest.raises(ExportError, match="does not match PyTorch"):
        compare(pairs(score_error=1e-3), (FLAGS, FLAGS), SCORE, 60.0, 3, "rows")
    with pytest.raises(ExportError, match="does not match PyTorch"):  # and a part may not drift past the score's tolerance
        compare(pairs(recon_error=0.05), (FLAGS, FLAGS), SCORE, 60.0, 3, "rows")


def test_decisions_may_differ_only_at_the_threshold():
    flipped = np.array([True, True, False])
    with pytest.raises(ExportError, match="decision agreement 66"):
        compare(pairs(), (flipped, FLAGS), SCORE, 60.0, 3, "rows")
    at_threshold = np.array([86.25, 60.0, 40.0], dtype=np.float32)
    report = compare({"score": (at_threshold, at_threshold)}, (flipped, FLAGS), at_threshold, 60.0, 3, "rows")
    assert report["passed"] and report["decision_agreement"] == pytest.approx(2 / 3)
    assert report["differ_at_threshold"] == 1


def test_a_nan_on_one_side_only_fails():
    """Before: |NaN - x| is NaN, which Python's max() over the outputs dropped: an encoder output that
    was NaN in ONNX only passed, and its NaN went into the manifest (which refuses NaN)."""
    mu = np.array([[0.5], [1.0], [-0.2]], dtype=np.float32)
    broken = mu.copy()
    broken[1, 0] = np.nan
    with pytest.raises(ExportError, match=r"'mu': inf"):
        compare(pairs() | {"mu": (broken, mu)}, (FLAGS, FLAGS), SCORE, 60.0, 3, "rows")


def test_the_same_infinity_on_both_sides_matches():
    """Before: a row that both score +inf (float32 overflow inside the network, published as +inf)
    gave inf - inf = NaN and failed verification with `max abs diffs {'score': nan}`."""
    score = np.array([np.inf, 12.0, 40.0], dtype=np.float32)
    report = compare({"score": (score, score), "recon": (score, score)}, (FLAGS, FLAGS), score, 60.0, 3, "rows")
    assert report["passed"] and report["max_abs_diff"] == {"score": 0.0, "recon": 0.0}
    with pytest.raises(ExportError, match=r"'score': inf"):  # +inf against a finite score is no match
        compare({"score": (score, SCORE)}, (FLAGS, FLAGS), SCORE, 60.0, 3, "rows")
