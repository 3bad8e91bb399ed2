"""Export verification's comparison rule (pipeline.verify.compare) and its check of the scorer's
decisions on its own calibration inputs (pipeline.verify.own_calibration)."""

from types import SimpleNamespace

import numpy as np
import pytest

from pipeline.calibrate import calibrate, conformal_p_values
from pipeline.errors import ExportError
from pipeline.verify import compare, own_calibration

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


def as_the_graph_scores(calibration, scores: np.ndarray) -> dict[str, np.ndarray]:
    """What scorer.onnx outputs for these scores with this calibration baked in."""
    return {"score": scores, "p_value": conformal_p_values(calibration.scores, scores),
            "is_anomaly": scores > np.float32(calibration.threshold)}


def test_the_scorer_must_give_its_calibration_inputs_the_tables_scores():
    """A table of scores from another graph (PyTorch's, which training used to calibrate on) is no
    table of the scorer's own: a row scored a rounding off gets the p-value of a rank that is not its
    own. The flagged count alone (all the variants' check looked at) missed it unless the threshold's
    own row moved."""
    scores = np.linspace(1.0, 30.0, 199).astype(np.float32)
    cal = calibrate(scores, 0.05)  # rank 10: flags the 9 above the 10th largest
    bundle = SimpleNamespace(calibration=cal)
    assert own_calibration(as_the_graph_scores(cal, scores), bundle) == {
        "rows": 199, "flagged": 9, "rate": 9 / 199, "passed": True}
    off = scores.copy()
    off[100] = np.nextafter(off[100], np.float32(np.inf))  # far from the threshold: nothing else shows it
    with pytest.raises(ExportError, match=r"the fp32 scorer is not consistent with its own calibration \(its scores "
                                          r"of the calibration inputs are not the calibration table's\); the bundle "
                                          r"was not published"):
        own_calibration(as_the_graph_scores(cal, off), bundle)
    off = scores.copy()
    off[-10] = np.nextafter(off[-10], np.float32(np.inf))  # the threshold's own row, rounded up: flagged
    with pytest.raises(ExportError, match="10 calibration inputs flagged, the conformal count is 9"):
        own_calibration(as_the_graph_scores(cal, off), bundle)
