"""The training run as a sequence of steps that pass files, not objects.

Each step reads what earlier steps wrote into the run folder and writes its own result there,
returning only a small dict of facts. The Prefect flow runs each step as a task (tasks pass
paths and small values); ``run_training`` runs them in order for the CLI. The run folder
lives inside the output folder, so publishing the finished bundle is an atomic rename, and a
failed run removes it and leaves any existing bundle untouched.
"""

from __future__ import annotations

import json
import shutil
import socket
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.bundle import (CALIBRATION_ROWS, FORMAT, FORMAT_VERSION, MODEL_FILES, check_publish_target,
                             publish_bundle, write_manifest, write_new_manifest)
from pipeline.calibrate import Calibration, calibrate, placeholder_calibration
from pipeline.config import TrainJob
from pipeline.contract import IR_VERSION, OPSET, OUTPUT_NAMES, categorical_input_name, cuda_settings
from pipeline.export import export_decoder, export_encoder, export_scorer, set_metadata, write_calibrated_scorer
from pipeline.metrics import auprc, auroc
from pipeline.model import VAE
from pipeline.outputs import check_location, check_utf8_path, make_parents, remove_empty_folders
from pipeline.precision import TABLE_CHUNK, score_in_chunks
from pipeline.preprocess import Preprocessor, check_training_scale, fit_preprocessor
from pipeline.runtime import create_session, frame_feeds
from pipeline.schema import TableSchema, infer_schema, label_vector, numeric_matrix
from pipeline.scorer_graph import ScorerGraph
from pipeline.splits import Splits, check_enough_rows, split_rows
from pipeline.tables import read_table, read_text_columns, table_format
from pipeline.train import train_vae
from pipeline.verify import verify_export


@dataclass(frozen=True)
class RunDir:
    """Where one training run keeps its intermediate files."""

    root: Path
    made: tuple[Path, ...] = ()  # folders above root that this run created (--out), deepest first

    @classmethod
    def create(cls, job: TrainJob) -> "RunDir":
        # Here, not in publish(): the CLI and the flows (tables and images) all start a run
        # with this, so a target that must not be replaced fails before any data is read.
        check_utf8_path(job.bundle_dir, "--out/--name")
        check_publish_target(job.bundle_dir)
        # A read-only or foreign --out: one line saying so, not "unexpected OSError" on the run folder.
        check_location(job.out_dir, "--out", "directory")
        root = job.out_dir / f".{job.name}.run-{uuid.uuid4().hex[:8]}"
        made = tuple(make_parents(root))
        root.mkdir()
        return cls(root, made)

    rows = property(lambda self: self.root / "rows.parquet")
    schema = property(lambda self: self.root / "schema.json")
    splits = property(lambda self: self.root / "splits.npz")
    preprocessor = property(lambda self: self.root / "preprocessor.json")
    features = property(lambda self: self.root / "features.npz")
    model = property(lambda self: self.root / "model.pt")
    history = property(lambda self: self.root / "history.json")
    calibration = property(lambda self: self.root / "calibration.json")
    scorer = property(lambda self: self.root / "scorer.onnx")  # calibrated on, not yet holding its table
    bundle = property(lambda self: self.root / "bundle")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        remove_empty_folders(list(self.made))  # a published bundle keeps --out; a failed run leaves none


def _source(job: TrainJob) -> str:
    return str(job.data)


def write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, allow_nan=False))


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


# --- steps -------------------------------------------------------------------------------


def load_and_validate(job: TrainJob, run: RunDir) -> dict:
    """Read the table, infer and check the schema, keep the usable columns."""
    frame = read_table(job.data)
    # Before the columns are judged: a short file is refused for its length (all its rows bound the
    # normal ones), not as one whose every column is constant.
    check_enough_rows(len(frame), job.config.calibration, job.config.training, job.label_column is not None,
                      _source(job), counted="rows")
    schema = infer_schema(frame, source=_source(job), config=job.config.preprocess,
                          label_column=job.label_column, id_columns=job.id_columns)
    # Numeric columns stored otherwise (decimals, numbers as text) become floats here, so every
    # later step reads plain numbers from the run's table.
    for name in schema.numeric:
        if not pd.api.types.is_numeric_dtype(frame[name]) or pd.api.types.is_bool_dtype(frame[name]):
            frame[name] = pd.to_numeric(frame[name]).astype("float64")
    numeric_matrix(frame, schema.numeric, _source(job))  # fails early on infinities
    # Categories spelled as written ('007', 'False'), as scoring will read them. A column the CSV
    # reader took as text is that already; one it typed (integers, booleans) lost its spelling, which
    # only the text can give back, so those columns alone are read again. The typed read can't be
    # skipped: the schema's kinds come from pyarrow's inference, the one scoring's reader shares.
    typed = [c for c in schema.categorical if not pd.api.types.is_string_dtype(frame[c])]
    if typed and table_format(Path(job.data)) == "csv":
        frame[typed] = read_text_columns(job.data, typed)
    labels = label_vector(frame, schema.label_column, _source(job)) if schema.label_column else None
    if labels is not None:
        frame[schema.label_column] = labels  # later steps read 0/1, whatever the file spelled
    keep = list(schema.id_columns) + list(schema.feature_columns) + ([schema.label_column] if labels is not None else [])
    frame[keep].reset_index(drop=True).to_parquet(run.rows)
    write_json(run.schema, schema.to_dict())
    return {
        "rows": len(frame),
        "numeric_columns": len(schema.numeric),
        "categorical_columns": len(schema.categorical),
        "dropped_columns": [c for c, _ in schema.dropped],
        "labelled_anomalies": int(labels.sum()) if labels is not None else None,
    }


def split(job: TrainJob, run: RunDir) -> dict:
    """Random train / validation / calibration / test rows; anomalies only ever in test."""
    schema = TableSchema.from_dict(read_json(run.schema))
    frame = pd.read_parquet(run.rows)
    labels = frame[schema.label_column].to_numpy().astype(int) if schema.label_column else None
    splits = split_rows(labels, len(frame), job.config.calibration, job.config.training, _source(job))
    np.savez(run.splits, **vars(splits))
    return splits.sizes()


def load_splits(run: RunDir) -> Splits:
    with np.load(run.splits) as data:
        return Splits(**{k: data[k] for k in data.files})


def fit_preprocessing(job: TrainJob, run: RunDir) -> dict:
    """Fit imputation, scaling and categories on training rows only; featurize every split."""
    schema = TableSchema.from_dict(read_json(run.schema))
    frame = pd.read_parquet(run.rows)
    splits = load_splits(run)
    pre = fit_preprocessor(frame.iloc[splits.train], schema, job.config.preprocess, _source(job))
    check_training_scale(pre, frame, _source(job))
    write_json(run.preprocessor, pre.to_dict())
    np.savez(run.features, **{name: pre.transform_frame(frame.iloc[rows], _source(job))
                              for name, rows in vars(splits).items()})
    return {"features": pre.n_features}


def train_model(job: TrainJob, run: RunDir) -> dict:
    """Train the VAE with early stopping on the validation split."""
    with np.load(run.features) as data:
        train_x, val_x = data["train"], data["val"]
    result = train_vae(train_x, val_x, job.config.model, job.config.training)
    torch.save({"config": result.model.config(), "state_dict": result.model.state_dict()}, run.model)
    facts = {"epochs": len(result.history), "best_epoch": result.best_epoch,
             "seconds": round(result.seconds, 3), "device": result.device,
             "mixed_precision": result.mixed_precision,
             "best_val_loss": result.history[result.best_epoch - 1]["val_loss"]}
    write_json(run.history, {"facts": facts, "epochs": result.history})
    return facts


def load_model(run: RunDir) -> VAE:
    saved = torch.load(run.model, weights_only=True)
    config = saved["config"]
    model = VAE.from_config(config)
    model.load_state_dict(saved["state_dict"])
    return model.eval()


def scorer_scores(session, schema: TableSchema, rows: pd.DataFrame, source: str) -> np.ndarray:
    """The scores a scorer graph's onnxruntime session gives ``rows``, in the chunks `vaeguard export
    --precision` scores the kept calibration rows in."""
    return score_in_chunks(session, frame_feeds(schema, rows, source), TABLE_CHUNK, ["score"])["score"]


def calibrate_threshold(job: TrainJob, run: RunDir) -> dict:
    """Export the scorer, score the calibration rows with it in onnxruntime, set the threshold at
    the target FPR; measure on test rows."""
    schema = TableSchema.from_dict(read_json(run.schema))
    pre = Preprocessor.from_dict(read_json(run.preprocessor))
    frame = pd.read_parquet(run.rows)
    splits = load_splits(run)
    target_fpr = job.config.calibration.target_fpr
    # Calibrated on the scores of the graph every user decides with (onnxruntime on the CPU is the
    # reference), not on PyTorch's, which differ by about 1e-6: the bundle must flag its own
    # calibration rows as calibrated and give each the p-value of its rank.
    graph = ScorerGraph(load_model(run), pre, job.config.model.kl_weight,
                        placeholder_calibration(len(splits.cal), target_fpr)).eval()
    export_scorer(graph, pre, run.scorer)
    session = create_session(run.scorer, "cpu", job.config.training.threads)

    def scores(rows: pd.DataFrame) -> np.ndarray:
        return scorer_scores(session, schema, rows, _source(job))

    calibration = calibrate(scores(frame.iloc[splits.cal]), target_fpr)
    metrics: dict = {}
    if schema.label_column and len(splits.test):
        test = frame.iloc[splits.test]
        test_scores = scores(test)
        labels = test[schema.label_column].to_numpy().astype(int)
        normal = labels == 0
        metrics = {"test_normal_rows": int(normal.sum()), "test_anomaly_rows": int((~normal).sum()),
                   "test_fpr": float((test_scores[normal] > np.float32(calibration.threshold)).mean())}
        # A label column with no anomalies (clean training data) leaves ranking metrics undefined.
        if (~normal).any():
            metrics |= {"auroc": auroc(labels, test_scores), "auprc": auprc(labels, test_scores),
                        "test_recall": float((test_scores[~normal] > np.float32(calibration.threshold)).mean())}
    write_json(run.calibration, {"calibration": calibration.to_dict(), "metrics": metrics})
    return {"threshold": calibration.threshold, "n_calibration": calibration.n, "rank": calibration.rank,
            "expected_fpr": calibration.expected_fpr, **metrics}


def load_scorer_graph(job: TrainJob, run: RunDir) -> tuple[ScorerGraph, Preprocessor, Calibration]:
    pre = Preprocessor.from_dict(read_json(run.preprocessor))
    calibration = Calibration.from_dict(read_json(run.calibration)["calibration"])
    return ScorerGraph(load_model(run), pre, job.config.model.kl_weight, calibration).eval(), pre, calibration


def export_bundle(job: TrainJob, run: RunDir) -> dict:
    """Write encoder.onnx, decoder.onnx, scorer.onnx and manifest.json into the staging folder."""
    graph, pre, calibration = load_scorer_graph(job, run)
    schema = TableSchema.from_dict(read_json(run.schema))
    run.bundle.mkdir(exist_ok=True)
    export_encoder(graph.vae, run.bundle / "encoder.onnx")
    export_decoder(graph.vae, run.bundle / "decoder.onnx")
    write_calibrated_scorer(run.scorer, calibration, run.bundle / "scorer.onnx")
    created = datetime.now(timezone.utc)
    version = created.strftime("%Y%m%dT%H%M%SZ")
    facts = {
        "vaeguard.bundle": job.name, "vaeguard.version": version, "vaeguard.created_at": created.isoformat(),
        "vaeguard.threshold": repr(calibration.threshold), "vaeguard.target_fpr": repr(calibration.target_fpr),
        "vaeguard.n_calibration": str(calibration.n),
        "vaeguard.score": "score = recon + kl_weight * kl; recon = 0.5 * sum(((x - x_hat) / sigma)^2); z = mu",
        "vaeguard.kl_weight": repr(job.config.model.kl_weight),
        "vaeguard.numeric_columns": json.dumps(list(pre.numeric_columns)),
        "vaeguard.categorical_columns": json.dumps(list(pre.categorical_columns)),
        "vaeguard.feature_names": json.dumps(pre.feature_names),
    }
    for name in MODEL_FILES:
        set_metadata(run.bundle / name, facts)
    # The calibration rows as read (features only), so `vaeguard export --precision` can
    # recalibrate a reduced-precision scorer on its own scores.
    rows = pd.read_parquet(run.rows).iloc[load_splits(run).cal]
    rows[list(schema.feature_columns)].reset_index(drop=True).to_parquet(run.bundle / CALIBRATION_ROWS)
    history = read_json(run.history)
    calibrated = read_json(run.calibration)
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "name": job.name, "version": version, "created_at": created.isoformat(),
        "source": {"data": str(job.data), "host": socket.gethostname()},
        "schema": schema.to_dict(),
        "preprocessing": pre.to_dict(),
        "model": {**graph.vae.config(), "beta": job.config.model.beta,
                  "decoder_log_scale": [float(v) for v in graph.vae.decoder.bounded_log_scale().detach()]},
        "score": {
            "kl_weight": job.config.model.kl_weight,
            "definition": "score = recon + kl_weight * kl, with z = mu (no sampling)",
            "recon": "0.5 * sum over preprocessed features j of ((x_j - x_hat_j) / exp(decoder_log_scale_j))^2 "
                     "(Gaussian negative log-likelihood with the decoder's learned per-feature scale, "
                     "row-independent terms dropped)",
            "kl": "0.5 * sum over latent dims of (mu^2 + exp(logvar) - 1 - logvar)",
        },
        "training": history["facts"],
        "calibration": calibrated["calibration"],
        "metrics": calibrated["metrics"],
        "config": job.config.to_dict(),
        "onnx": {
            "opset": OPSET, "ir_version": IR_VERSION, "batch_axis": "batch_size",
            "scorer_inputs": (
                ([{"name": "numeric", "dtype": "float32", "shape": ["batch_size", len(pre.numeric)],
                   "columns": list(pre.numeric_columns), "missing": "NaN"}] if pre.numeric else [])
                + [{"name": categorical_input_name(c), "dtype": "string", "shape": ["batch_size"],
                    "column": c, "missing": ""} for c in pre.categorical_columns]
            ),
            "scorer_outputs": list(OUTPUT_NAMES),
            **cuda_settings(),
        },
    }
    write_new_manifest(run.bundle, manifest)
    return {"bundle_version": version, "files": list(MODEL_FILES)}


def verify_bundle(job: TrainJob, run: RunDir) -> dict:
    """Check the ONNX files, their parity with PyTorch and the scorer's decisions on the calibration rows."""
    graph, _, _ = load_scorer_graph(job, run)
    frame = pd.read_parquet(run.rows)
    splits = load_splits(run)
    with np.load(run.features) as data:
        cal_features = data["cal"]
    return record_verification(run, verify_export(run.bundle, graph, frame.iloc[splits.cal], cal_features))


def record_verification(run: RunDir, report: dict) -> dict:
    """The verification report goes into the staged bundle's manifest."""
    manifest = read_json(run.bundle / "manifest.json")
    manifest["verification"] = report
    write_manifest(run.bundle, manifest)
    return report


def write_training_report(job, run: RunDir) -> dict:
    """Write report.html (plots, top anomalies or images, run facts) into the bundle."""
    from pipeline import training_report  # it reads this module's run files: import late

    return training_report.write_training_report(job, run)


def publish(job: TrainJob, run: RunDir) -> Path:
    """Swap the verified bundle into exported/NAME and clean up the run folder."""
    publish_bundle(run.bundle, job.bundle_dir)
    run.remove()
    return job.bundle_dir


STEPS = (load_and_validate, split, fit_preprocessing, train_model, calibrate_threshold, export_bundle, verify_bundle,
         write_training_report)


def run_steps(job, steps) -> dict:
    """Run steps in order, without Prefect, then publish. Returns the facts each step reported."""
    run = RunDir.create(job)
    facts: dict = {}
    try:
        for step in steps:
            facts[step.__name__] = step(job, run)
        facts["bundle"] = str(publish(job, run))
    finally:
        run.remove()
    return facts


def run_training(job: TrainJob) -> dict:
    return run_steps(job, STEPS)
