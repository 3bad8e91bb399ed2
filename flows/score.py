"""Scoring flow: one task per input (a table file, or an image folder), then one output and a
summary table artifact.

Each task scores its file into a part file beside the output; the parts are merged into the
output atomically only when every file succeeded, so a failed run writes nothing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.errors import ConfigError, PipelineError
from pipeline.image_score import merge_error_files
from pipeline.outputs import (check_scores_target, make_parents, merge_scored_parts, remove_empty_folders,
                              summary_path, write_atomic)
from pipeline.scoring import score
from pipeline.scoring_report import check_report_target, report_path, summary_markdown, write_scoring_report


@task(cache_policy=NO_CACHE)
def check_bundle(bundle: Path, precision: str = "fp32") -> dict:
    """Load the bundle, verify its file hashes and find the scorer of this precision."""
    loaded = Bundle.load(bundle)
    calibration = loaded.calibration_for(precision)  # the variant's own threshold and expected FPR
    return {"name": loaded.manifest["name"], "version": loaded.manifest["version"], "precision": precision,
            "target_fpr": calibration["target_fpr"], "expected_fpr": calibration["expected_fpr"],
            "modality": loaded.manifest.get("modality", "table")}


# Written into the parts folder when the run fails: tasks that have not started yet skip their
# input, so the flow can wait for every task to end before it removes the folder (a task still
# running after that would recreate the folder and leave its part there).
STOP = "STOP"


@task(cache_policy=NO_CACHE)
def score_file(job: ScoreJob, input_path: Path, part: Path, cwd: str | None = None) -> dict | None:
    """Score one input (table file or image folder) into a part file; None once the run has failed."""
    if (part.parent / STOP).exists():
        return None
    if cwd is not None and not input_path.is_absolute() and os.getcwd() != cwd:
        raise ConfigError(f"{input_path}: a relative path, but the Dask worker runs in {os.getcwd()}, not in {cwd} "
                          f"where vaeguard was started; pass the input as an absolute path, or start the workers "
                          f"in {cwd}")
    single = ScoreJob(bundle=job.bundle, inputs=(input_path,), output=part, device=job.device,
                      batch_size=job.batch_size, threads=job.threads, maps_dir=job.maps_dir,
                      precision=job.precision)
    return score(single).to_dict()


def named_as_given(error: PipelineError, given: dict[str, str]) -> PipelineError:
    """The error with the absolute paths the task was handed written back as the user gave them,
    so that its message reads as with the local task runner."""
    if len(error.args) == 1 and isinstance(error.args[0], str):
        text = error.args[0]
        for absolute in sorted(given, key=len, reverse=True):  # an input inside the bundle folder: longest first
            text = text.replace(absolute, given[absolute])
        error.args = (text,)
    return error


def absolute(path: Path) -> Path:
    """``path`` from the folder this process runs in: a Dask worker started elsewhere (--dask-address)
    would otherwise read another file of that name, or none."""
    return Path(os.path.abspath(path))


@task(cache_policy=NO_CACHE)
def merge_parts(parts: list[tuple[str, Path]], output: Path) -> int:
    """Merge the part files into the output."""
    return merge_scored_parts(parts, output)


@task(cache_policy=NO_CACHE)
def write_report(job: ScoreJob) -> Path:
    """Write OUT.report.html next to the output and link it as an artifact."""
    path = write_scoring_report(job)
    create_link_artifact(key="vaeguard-scoring-report", link=path.resolve().as_uri(), link_text=str(path),
                         description="Scoring report: score histograms, anomaly rate, drift, top anomalies")
    return path


@flow(name="vaeguard-score", log_prints=True)
def score_flow(job: ScoreJob) -> dict:
    # Before any work: the merge at the end would otherwise refuse only after every file scored.
    check_scores_target(job.output, job.inputs, job.bundle)
    if job.report:
        check_report_target(job.output)
    # Tasks may run in worker processes started in another folder: they get absolute paths. The
    # output's `source` column, the summary and error messages keep the paths as given.
    given = {str(absolute(p)): str(p) for p in (job.bundle, *job.inputs) if not p.is_absolute()}
    resolved = dataclasses.replace(job, bundle=absolute(job.bundle), output=absolute(job.output),
                                   maps_dir=None if job.maps_dir is None else absolute(job.maps_dir))
    try:
        return _score_parts(job, resolved, given)
    except PipelineError as exc:
        raise named_as_given(exc, given)


def _score_parts(job: ScoreJob, resolved: ScoreJob, given: dict[str, str]) -> dict:
    bundle = check_bundle(resolved.bundle, job.precision)
    # An image's row names it by its input folder's path, so image inputs stay as given (a worker
    # in another folder says so) and the output reads as with the local runner.
    inputs = job.inputs if bundle["modality"] == "image" else tuple(absolute(p) for p in job.inputs)
    new_folders = make_parents(resolved.output)
    parts_dir = resolved.output.parent / f".{job.output.name}.parts-{uuid.uuid4().hex[:8]}"
    parts_dir.mkdir()
    futures = []
    try:
        parts = [parts_dir / f"{i:05d}.parquet" for i in range(len(job.inputs))]
        futures = [score_file.submit(resolved, path, part, os.getcwd()) for path, part in zip(inputs, parts)]
        files = [future.result() for future in futures]
        merge_parts([(str(p), part) for p, part in zip(job.inputs, parts)], resolved.output)
        merge_error_files(parts, job.output)  # unreadable images of every input, next to the output
    finally:
        try:
            # A failed or interrupted run: tasks not started skip their input, and those running
            # finish their part, before the folder goes (a second Ctrl-C stops the wait).
            (parts_dir / STOP).touch()
            for future in futures:
                future.wait()
        finally:
            shutil.rmtree(parts_dir, ignore_errors=True)
            remove_empty_folders(new_folders)  # a folder this run made stays only with the output in it
    summary = combine_summaries(job, bundle, files)
    create_markdown_artifact(key="vaeguard-scoring-summary", markdown=summary_markdown(job),
                             description="Scores against calibration: anomaly rate and drift")
    if job.report:
        write_report(dataclasses.replace(resolved, inputs=inputs))
        summary["report"] = str(report_path(job.output))
    write_atomic(summary_path(job.output), json.dumps(summary, indent=2))
    create_table_artifact(key="vaeguard-scoring", table=summary["files"],
                          description=f"Scores of {len(job.inputs)} file(s) with bundle {bundle['name']}: "
                                      f"{summary['rows']:,} rows, {summary['anomalies']:,} anomalies "
                                      f"({summary['anomaly_rate']:.3%} against target {bundle['target_fpr']:.3%})")
    return summary


def combine_summaries(job: ScoreJob, bundle: dict, files: list[dict]) -> dict:
    rows = sum(f["rows"] for f in files)
    anomalies = sum(f["anomalies"] for f in files)
    table = [{"file": str(path), "rows": f["rows"], "anomalies": f["anomalies"],
              "anomaly_rate": round(f["anomaly_rate"], 6), "target_fpr": bundle["target_fpr"],
              "skipped": f["skipped"], "auroc": None if f["auroc"] is None else round(f["auroc"], 4),
              "rows_per_second": round(f["rows_per_second"] or 0)}
             for path, f in zip(job.inputs, files)]
    return {"bundle": str(job.bundle), "output": str(job.output), "rows": rows, "anomalies": anomalies,
            "anomaly_rate": anomalies / rows if rows else 0.0, "target_fpr": bundle["target_fpr"],
            "expected_fpr": bundle["expected_fpr"], "files": table}
