"""Training flow: load and validate, split, fit preprocessing, train, calibrate, export, verify, publish.

Each task wraps one step of pipeline.workflow; tasks pass the job and the run folder (paths),
never data frames or models.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import workflow
from pipeline.config import TrainJob

_task = task(cache_policy=NO_CACHE)


@_task
def load_and_validate(job: TrainJob, run: workflow.RunDir) -> dict:
    """Read the table and check its schema."""
    return workflow.load_and_validate(job, run)


@_task
def split(job: TrainJob, run: workflow.RunDir) -> dict:
    """Split rows into train, validation, calibration and test."""
    return workflow.split(job, run)


@_task
def fit_preprocessing(job: TrainJob, run: workflow.RunDir) -> dict:
    """Fit imputation, scaling and categories on training rows."""
    return workflow.fit_preprocessing(job, run)


@_task
def train_model(job: TrainJob, run: workflow.RunDir) -> dict:
    """Train the VAE with early stopping."""
    return workflow.train_model(job, run)


@_task
def calibrate_threshold(job: TrainJob, run: workflow.RunDir) -> dict:
    """Set the threshold on calibration rows; measure on test rows."""
    return workflow.calibrate_threshold(job, run)


@_task
def export_bundle(job: TrainJob, run: workflow.RunDir) -> dict:
    """Write the ONNX graphs and the manifest."""
    return workflow.export_bundle(job, run)


@_task
def verify_bundle(job: TrainJob, run: workflow.RunDir) -> dict:
    """Check ONNX against PyTorch on calibration rows."""
    return workflow.verify_bundle(job, run)


@_task
def publish(job: TrainJob, run: workflow.RunDir) -> str:
    """Move the verified bundle into place."""
    return str(workflow.publish(job, run))


@flow(name="vaeguard-train", log_prints=True)
def train_flow(job: TrainJob) -> dict:
    run = workflow.RunDir.create(job)
    try:
        facts = {"load_and_validate": load_and_validate(job, run)}
        facts["split"] = split(job, run)
        facts["fit_preprocessing"] = fit_preprocessing(job, run)
        facts["train_model"] = train_model(job, run)
        facts["calibrate_threshold"] = calibrate_threshold(job, run)
        facts["export_bundle"] = export_bundle(job, run)
        facts["verify_bundle"] = verify_bundle(job, run)
        facts["bundle"] = publish(job, run)
    finally:
        run.remove()
    create_markdown_artifact(key="vaeguard-training", markdown=training_markdown(job, facts),
                             description=f"Training summary for bundle {job.name}")
    return facts


def training_markdown(job: TrainJob, facts: dict) -> str:
    cal, trained, verify = facts["calibrate_threshold"], facts["train_model"], facts["verify_bundle"]
    rows = [
        ("bundle", facts["bundle"]),
        ("data", f"{job.data} ({facts['load_and_validate']['rows']:,} rows)"),
        ("splits", ", ".join(f"{k} {v:,}" for k, v in facts["split"].items())),
        ("training", f"{trained['epochs']} epochs, best {trained['best_epoch']}, {trained['seconds']:.1f}s on {trained['device']}"),
        ("threshold", f"{cal['threshold']:.6g} at target FPR {job.config.calibration.target_fpr}"),
        ("calibration rows", f"{cal['n_calibration']:,}"),
        ("ONNX max abs score diff", f"{verify['max_abs_diff']['score']:.2e}"),
    ]
    if "auroc" in cal:
        rows += [("held-out AUROC", f"{cal['auroc']:.4f}"), ("held-out AUPRC", f"{cal['auprc']:.4f}")]
    return "\n".join([f"# Bundle `{job.name}`", "", "| fact | value |", "|---|---|",
                      *[f"| {k} | {v} |" for k, v in rows]])
