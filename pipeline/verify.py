"""Export verification: the ONNX graphs must compute what the PyTorch model computes.

Run before a bundle is published. onnx.checker validates each file; then onnxruntime and
PyTorch score the calibration rows and their outputs are compared. Decisions may differ only
for rows whose score lies within the numeric tolerance of the threshold, where float rounding
legitimately decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import torch

from pipeline.bundle import Bundle
from pipeline.errors import ExportError
from pipeline.runtime import BundleScorer
from pipeline.scorer_graph import ScorerGraph, graph_inputs

RTOL = 1e-4
ATOL = 1e-4


def _max_rel_excess(actual: np.ndarray, expected: np.ndarray) -> float:
    """Largest |a - e| / (ATOL + RTOL |e|): above 1 means out of tolerance."""
    return float(np.max(np.abs(actual - expected) / (ATOL + RTOL * np.abs(expected)), initial=0.0))


def verify_export(bundle_dir: Path, graph: ScorerGraph, rows: pd.DataFrame, features: np.ndarray) -> dict:
    for name in ("encoder.onnx", "decoder.onnx", "scorer.onnx"):
        try:
            onnx.checker.check_model(str(bundle_dir / name), full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"{bundle_dir / name} failed onnx.checker: {str(exc).splitlines()[0]}") from exc

    pre = Bundle.load(bundle_dir).preprocessor
    with torch.no_grad():
        expected = [t.numpy() for t in graph(*graph_inputs(pre, rows, "calibration rows"))]
        x = torch.from_numpy(features)
        mu, logvar = graph.vae.encoder(x)
        reconstruction = graph.vae.decoder(mu)
    actual = BundleScorer(Bundle.load(bundle_dir), device="cpu").score_frame(rows, "calibration rows")

    encoder = ort.InferenceSession(str(bundle_dir / "encoder.onnx"), providers=["CPUExecutionProvider"])
    decoder = ort.InferenceSession(str(bundle_dir / "decoder.onnx"), providers=["CPUExecutionProvider"])
    onnx_mu, onnx_logvar = encoder.run(None, {"features": features})
    (onnx_reconstruction,) = decoder.run(None, {"z": mu.numpy()})

    diffs = {
        "score": float(np.max(np.abs(actual["score"].to_numpy() - expected[0]), initial=0.0)),
        "recon": float(np.max(np.abs(actual["recon"].to_numpy() - expected[1]), initial=0.0)),
        "kl": float(np.max(np.abs(actual["kl"].to_numpy() - expected[2]), initial=0.0)),
        "mu": float(np.max(np.abs(onnx_mu - mu.numpy()), initial=0.0)),
        "logvar": float(np.max(np.abs(onnx_logvar - logvar.numpy()), initial=0.0)),
        "reconstruction": float(np.max(np.abs(onnx_reconstruction - reconstruction.numpy()), initial=0.0)),
    }
    excess = max(
        _max_rel_excess(actual["score"].to_numpy(), expected[0]),
        _max_rel_excess(actual["recon"].to_numpy(), expected[1]),
        _max_rel_excess(actual["kl"].to_numpy(), expected[2]),
        _max_rel_excess(onnx_mu, mu.numpy()),
        _max_rel_excess(onnx_logvar, logvar.numpy()),
        _max_rel_excess(onnx_reconstruction, reconstruction.numpy()),
    )
    agree = actual["is_anomaly"].to_numpy() == expected[4]
    threshold = float(graph.threshold)
    near_threshold = np.abs(expected[0] - threshold) <= ATOL + RTOL * abs(threshold)
    report = {
        "rows": int(len(rows)),
        "max_abs_diff": diffs,
        "decision_agreement": float(agree.mean()),
        "tolerance": {"rtol": RTOL, "atol": ATOL},
        "passed": bool(excess <= 1.0 and np.all(agree | near_threshold)),
    }
    if not report["passed"]:
        raise ExportError(
            f"ONNX export does not match PyTorch on {len(rows)} calibration rows: max abs diffs {diffs}, "
            f"decision agreement {agree.mean():.4%} (tolerance rtol={RTOL}, atol={ATOL}); the bundle was not published"
        )
    return report
