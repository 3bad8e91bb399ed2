"""Export verification: the ONNX graphs must compute what the PyTorch model computes, and the
scorer must decide its own calibration inputs as it was calibrated.

Run before a bundle is published. onnx.checker validates each file; then onnxruntime and
PyTorch score the calibration rows (or images) and their outputs are compared. The bundle's
decisions are scorer.onnx's: its threshold and table come from its own scores (pipeline.workflow),
so PyTorch may decide otherwise only for rows whose score lies within the numeric tolerance of
the threshold, where float rounding legitimately decides. scorer.onnx itself, scoring the
calibration inputs as training did, must flag exactly those above the threshold, with the
p-values of their ranks (pipeline.precision.check_consistency).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from pipeline.bundle import MODEL_FILES, Bundle
from pipeline.contract import IMAGE_INPUT, IMAGE_OUTPUT_NAMES, OUTPUT_NAMES
from pipeline.errors import ExportError
from pipeline.precision import IMAGE_CHUNK, TABLE_CHUNK, check_consistency, score_in_chunks
from pipeline.runtime import BundleScorer, create_session, frame_feeds
from pipeline.scorer_graph import ImageScorerGraph, ScorerGraph, graph_inputs

RTOL = 1e-4
ATOL = 1e-4


def check_onnx_files(bundle_dir: Path) -> None:
    for name in MODEL_FILES:
        try:
            onnx.checker.check_model(str(bundle_dir / name), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{bundle_dir / name} failed onnx.checker: {str(exc).splitlines()[0]}") from exc


def _session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


# The score's parts are judged against the score of their row, not their own size. recon sums
# squared residuals divided by learned variances as small as e^-10, so float32 cancellation in
# x - x_hat gives it a large relative error on rows where it is a small part of the score, while
# the score, which decides, stays accurate: on ADBench mammography (SiLU, seed 0) recon differed
# by 1.8e-4 of itself and the score by at most 2.5e-5.
PARTS_OF_SCORE = ("recon", "kl")


def differences(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|a - b| where equal values differ by 0 (the same infinity: a row both score +inf; NaN on both
    sides) and a NaN on one side only by +inf. Plain a - b gives NaN for both, and a NaN drops out
    of a max(): an encoder output NaN in ONNX only passed, and a row both score +inf failed."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    with np.errstate(invalid="ignore"):
        gap = np.abs(a - b)
    return np.where((a == b) | (np.isnan(a) & np.isnan(b)), 0.0, np.where(np.isnan(gap), np.inf, gap))


def compare(pairs: dict[str, tuple[np.ndarray, np.ndarray]], is_anomaly: tuple[np.ndarray, np.ndarray],
            score: np.ndarray, threshold: float, rows: int, what: str) -> dict:
    """Max abs differences of (onnx, torch) pairs, and decision agreement away from the threshold."""
    gaps = {name: differences(a, b) for name, (a, b) in pairs.items()}
    diffs = {name: float(np.max(gap, initial=0.0)) for name, gap in gaps.items()}
    # Largest |a - e| / (ATOL + RTOL |reference|): above 1 means out of tolerance.
    excess = 0.0
    with np.errstate(all="ignore"):
        for name, gap in gaps.items():
            reference = np.abs(np.asarray(score if name in PARTS_OF_SCORE else pairs[name][1], np.float64))
            ratio = np.where(gap == 0, 0.0, gap / (ATOL + RTOL * reference))  # inf / inf is NaN: out of tolerance
            excess = max(excess, float(np.max(np.where(np.isnan(ratio), np.inf, ratio), initial=0.0)))
    agree = is_anomaly[0] == is_anomaly[1]
    near_threshold = np.abs(score - threshold) <= ATOL + RTOL * abs(threshold)
    # The threshold is a score of scorer.onnx; PyTorch scores its row, and any other that close to
    # it, a rounding away on either side. Such differences are counted apart, so a sound bundle does
    # not read as a faulty one.
    report = {"rows": rows, "max_abs_diff": diffs, "decision_agreement": float(agree.mean()),
              "differ_at_threshold": int(np.sum(~agree & near_threshold)),
              "tolerance": {"rtol": RTOL, "atol": ATOL}, "passed": bool(excess <= 1.0 and np.all(agree | near_threshold))}
    if not report["passed"]:
        raise ExportError(
            f"ONNX export does not match PyTorch on {rows} calibration {what}: max abs diffs {diffs}, "
            f"decision agreement {agree.mean():.4%} (tolerance rtol={RTOL}, atol={ATOL}); the bundle was not published"
        )
    return report


def verify_export(bundle_dir: Path, graph: ScorerGraph, rows: pd.DataFrame, features: np.ndarray) -> dict:
    check_onnx_files(bundle_dir)
    bundle = Bundle.load(bundle_dir)
    with torch.no_grad():
        expected = [t.numpy() for t in graph(*graph_inputs(bundle.preprocessor, rows, "calibration rows"))]
        mu, logvar = graph.vae.encoder(torch.from_numpy(features))
        reconstruction = graph.vae.decoder(mu)
    # In the chunks training scored the calibration rows in (pipeline.workflow.calibrate_threshold).
    scorer = BundleScorer(bundle, device="cpu")
    actual = score_in_chunks(scorer.session, frame_feeds(bundle.schema, rows, "calibration rows"), TABLE_CHUNK,
                             OUTPUT_NAMES)
    onnx_mu, onnx_logvar = _session(bundle_dir / "encoder.onnx").run(None, {"features": features})
    (onnx_reconstruction,) = _session(bundle_dir / "decoder.onnx").run(None, {"z": mu.numpy()})
    pairs = {name: (actual[name], value) for name, value in zip(("score", "recon", "kl"), expected)}
    pairs |= {"mu": (onnx_mu, mu.numpy()), "logvar": (onnx_logvar, logvar.numpy()),
              "reconstruction": (onnx_reconstruction, reconstruction.numpy())}
    report = compare(pairs, (actual["is_anomaly"], expected[4]), expected[0], float(graph.threshold), len(rows), "rows")
    return report | {"consistency": own_calibration(actual, bundle)}


def own_calibration(actual: dict[str, np.ndarray], bundle: Bundle) -> dict:
    return check_consistency(actual, bundle.calibration, "fp32", "the bundle was not published")


def verify_image_export(bundle_dir: Path, graph: ImageScorerGraph, images: np.ndarray) -> dict:
    check_onnx_files(bundle_dir)
    with torch.no_grad():
        expected = dict(zip(IMAGE_OUTPUT_NAMES, (t.numpy() for t in graph(torch.from_numpy(images)))))
        mu, logvar = graph.vae.encoder(torch.from_numpy(images))
    bundle = Bundle.load(bundle_dir)
    actual = score_in_chunks(create_session(bundle.scorer_path, "cpu", contents=bundle.scorer_bytes()),
                             {IMAGE_INPUT: images}, IMAGE_CHUNK, IMAGE_OUTPUT_NAMES)
    onnx_mu, onnx_logvar = _session(bundle_dir / "encoder.onnx").run(None, {"images": images})
    (onnx_reconstruction,) = _session(bundle_dir / "decoder.onnx").run(None, {"z": mu.numpy()})
    pairs = {name: (actual[name], expected[name]) for name in ("score", "recon", "kl", "anomaly_map")}
    pairs |= {"mu": (onnx_mu, mu.numpy()), "logvar": (onnx_logvar, logvar.numpy()),
              "reconstruction": (onnx_reconstruction, expected["reconstruction"])}
    report = compare(pairs, (actual["is_anomaly"], expected["is_anomaly"]), expected["score"], float(graph.threshold),
                     len(images), "images")
    return report | {"consistency": own_calibration(actual, bundle)}
