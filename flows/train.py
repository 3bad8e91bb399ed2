"""Training flow: one task per step of the training run, then a markdown summary artifact.

Tables run pipeline.workflow's steps (load and validate, split, fit preprocessing, train,
calibrate, export, verify); images run pipeline.image_workflow's (load images, split, train,
calibrate, export, verify). Either way the verified bundle is published last. Tasks pass the
job and the run folder (paths), never data frames, images or models.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from pipeline import image_workflow, workflow
from pipeline.config import ImageTrainJob, TrainJob


def as_task(step):
    """A Prefect task named after the library step it runs; the step's docstring describes it."""
    return task(step, name=step.__name__, cache_policy=NO_CACHE)


@flow(name="vaeguard-train", log_prints=True)
def train_flow(job: TrainJob | ImageTrainJob) -> dict:
    steps = image_workflow.STEPS if isinstance(job, ImageTrainJob) else workflow.STEPS
    run = workflow.RunDir.create(job)
    try:
        facts = {step.__name__: as_task(step)(job, run) for step in steps}
        facts["bundle"] = str(as_task(workflow.publish)(job, run))
    finally:
        run.remove()
    create_markdown_artifact(key="vaeguard-training", markdown=training_markdown(job, facts),
                             description=f"Training summary for bundle {job.name}")
    report = Path(facts["bundle"]) / facts["write_training_report"]["report"]
    create_link_artifact(key="vaeguard-training-report", link=report.resolve().as_uri(), link_text=str(report),
                         description=f"Training report of bundle {job.name}: plots, top anomalies, run facts")
    return facts


def training_markdown(job: TrainJob | ImageTrainJob, facts: dict) -> str:
    cal, trained, verify = facts["calibrate_threshold"], facts["train_model"], facts["verify_bundle"]
    loaded = facts.get("load_images") or facts["load_and_validate"]
    size = f"{loaded['images']:,} images" if "images" in loaded else f"{loaded['rows']:,} rows"
    rows = [
        ("bundle", facts["bundle"]),
        ("data", f"{job.data} ({size})"),
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
