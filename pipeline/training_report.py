"""The training report, exported/NAME/report.html: why the bundle flags what it flags.

Loss curves, the calibration histogram with the threshold, ROC and PR curves when labels exist,
the latent space, and for the top anomalies which features (or pixels) carry the error, plus
the run's facts. Written into the bundle folder before it is published, so a bundle and its
report always go together.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from pipeline.bundle import MANIFEST
from pipeline.calibrate import FPR_RANGE_LEVEL, Calibration, format_fpr_range
from pipeline.config import ImageTrainJob, TrainJob
from pipeline.contract import IMAGE_INPUT
from pipeline.model import error_map
from pipeline.plots import feature_contributions, image_grid, latent_projection, loss_curves, roc_pr_curves, score_histogram
from pipeline.report_html import Section, facts_table, write_report
from pipeline.precision import IMAGE_CHUNK, score_in_chunks
from pipeline.runtime import create_session
from pipeline.schema import TableSchema
from pipeline.scorer_graph import graph_inputs
from pipeline.scoring_report import column_shares, top_rows_table
from pipeline.workflow import RunDir, load_scorer_graph, load_splits, read_json, scorer_scores

TOP_ANOMALIES = 20
REPORT = "report.html"


def run_facts(job: TrainJob | ImageTrainJob, manifest: dict, sizes: dict[str, int]) -> dict:
    training = manifest["training"]
    unit = "images" if manifest.get("modality") == "image" else "rows"
    return {
        "data": job.data, "bundle": job.name, "version": manifest["version"],
        unit: ", ".join(f"{name} {count:,}" for name, count in sizes.items() if count),
        "training time": f"{training['seconds']:.1f}s, {training['epochs']} epochs (best {training['best_epoch']})",
        "device": training["device"],
        "threshold": f"{manifest['calibration']['threshold']:.6g}",
        "target FPR": manifest["calibration"]["target_fpr"],
        "calibration rows": manifest["calibration"]["n_calibration"],
        "model": ", ".join(f"{k} {v}" for k, v in manifest["model"].items() if k != "decoder_log_scale"),
        "config": {section: {k: v for k, v in values.items() if v not in (None, (), [])}
                   for section, values in manifest["config"].items()},
        "versions": ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()),
    }


def _common_sections(job, run: RunDir, manifest: dict, calibration: Calibration) -> list[Section]:
    history = read_json(run.history)["epochs"]
    return [
        Section("Training", "Loss per epoch on the training and validation splits; the dotted line is the "
                "epoch whose weights were kept (early stopping).", figures=[("loss curves", loss_curves(history, manifest["training"]["best_epoch"]))]),
        Section("Calibration", f"Scores of {calibration.n:,} calibration rows the model never trained on. "
                f"Rows above the threshold are flagged; on normal data that happens at the expected rate "
                f"{calibration.expected_fpr:.3%} (target {calibration.target_fpr:.2%}). That rate is an average "
                f"over calibration sets: this bundle's own rate lies in "
                f"{format_fpr_range(calibration.rank, calibration.n)} with {FPR_RANGE_LEVEL:.0%} "
                f"probability, and more calibration rows narrow it.",
                figures=[("calibration scores", score_histogram(calibration.scores, calibration.threshold,
                                                                calibration.target_fpr))]),
    ]


def table_sections(job: TrainJob, run: RunDir) -> list[Section]:
    manifest = read_json(run.bundle / MANIFEST)
    graph, pre, calibration = load_scorer_graph(job, run)
    frame, splits = pd.read_parquet(run.rows), load_splits(run)
    label = manifest["schema"]["label_column"]
    labelled = bool(label) and len(splits.test) and frame[label].iloc[splits.test].nunique() == 2
    rows = frame.iloc[splits.test if labelled else splits.cal]
    with torch.no_grad():
        x = graph.features(*graph_inputs(pre, rows, str(job.data)))
        mu, logvar = graph.vae.encoder(x)
        shares = error_map(x, graph.vae.decoder(mu), graph.vae.decoder.bounded_log_scale()).numpy()
    # The bundle's own scores, as its metrics and threshold are (PyTorch's differ by about 1e-6).
    scores = scorer_scores(create_session(run.bundle / "scorer.onnx", "cpu", job.config.training.threads),
                           TableSchema.from_dict(read_json(run.schema)), rows, str(job.data))
    sections = _common_sections(job, run, manifest, calibration)
    labels = rows[label].to_numpy().astype(int) if labelled else None
    if labelled:
        metrics = manifest["metrics"]
        sections.append(Section("Detection on held-out rows",
                                f"{metrics['test_normal_rows']:,} normal and {metrics['test_anomaly_rows']:,} labelled "
                                f"anomalous rows, none trained or calibrated on.",
                                figures=[("roc and precision-recall", roc_pr_curves(labels, scores))]))
    sections.append(Section("Latent space", "The encoder's mean code of each row, projected on its two principal "
                            "components.", figures=[("latent space", latent_projection(mu.numpy(), scores, labels))]))
    top = np.argsort(-scores, kind="stable")[:TOP_ANOMALIES]
    share = column_shares(shares[top], pre)
    table = top_rows_table(rows.iloc[top], scores[top], share)
    sections.append(Section(
        "Top anomalies", f"The {len(top)} highest-scoring {'held-out' if labelled else 'calibration'} rows: which "
        f"columns carry their reconstruction error (one-hot and missing flags summed into their column).",
        figures=[("feature contributions", feature_contributions(share.to_numpy(), list(share.columns)))],
        tables=[("Top anomalies with their values", table.head(10))]))
    sections.append(Section("Run facts", tables=[("", facts_table(run_facts(job, manifest, splits.sizes())))]))
    return sections


def image_sections(job: ImageTrainJob, run: RunDir) -> list[Section]:
    from pipeline.image_workflow import load_image_graph, load_run_images

    manifest = read_json(run.bundle / MANIFEST)
    calibration = Calibration.from_dict(manifest["calibration"])
    graph, splits = load_image_graph(job, run, calibration), load_splits(run)
    images = np.ascontiguousarray(load_run_images(run)[np.concatenate([splits.cal, splits.val])])
    with torch.no_grad():
        tensor = torch.from_numpy(images)
        _, _, _, maps, reconstruction = graph.components(tensor)
        mu, _ = graph.vae.encoder(tensor)
    # The bundle's own scores, as its threshold is (PyTorch's differ by about 1e-6).
    scores = score_in_chunks(create_session(run.bundle / "scorer.onnx", "cpu", job.config.training.threads),
                             {IMAGE_INPUT: images}, IMAGE_CHUNK, ["score"])["score"]
    top = np.argsort(-scores, kind="stable")[:8]
    sections = _common_sections(job, run, manifest, calibration)
    sections += [
        Section("Latent space", "The encoder's mean code of each calibration and validation image, projected on "
                "its two principal components.", figures=[("latent space", latent_projection(mu.numpy(), scores))]),
        Section("Most anomalous images", "Calibration and validation images with the highest scores: the image, "
                "its reconstruction and where the error sits.",
                figures=[("top images", image_grid(images[top], reconstruction.numpy()[top], maps.numpy()[top],
                                                   [f"score {scores[i]:.4g}" for i in top]))]),
        Section("Run facts", tables=[("", facts_table(run_facts(job, manifest, splits.sizes())))]),
    ]
    return sections


def write_training_report(job: TrainJob | ImageTrainJob, run: RunDir) -> dict:
    sections = image_sections(job, run) if isinstance(job, ImageTrainJob) else table_sections(job, run)
    write_report(run.bundle / REPORT, f"vaeguard training report: {job.name}", sections)
    return {"report": REPORT, "sections": [section.title for section in sections]}
