"""Scoring flow: one task per input (a table file, or an image folder), then one output and a
summary table artifact.

Each task scores its file into a part file beside the output; the parts are merged into the
output atomically only when every file succeeded, so a failed run writes nothing.
"""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path

from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.image_score import merge_error_files
from pipeline.outputs import (check_not_an_input, check_output_location, check_outside_bundle, make_parents,
                              merge_scored_parts, remove_empty_folders, summary_path, write_atomic)
from pipeline.scoring import score
from pipeline.scoring_report import check_report_target, summary_markdown, write_scoring_report


@task(cache_policy=NO_CACHE)
def check_bundle(bundle: Path, precision: str = "fp32") -> dict:
    """Load the bundle, verify its file hashes and find the scorer of this precision."""
    loaded = Bundle.load(bundle)
    calibration = loaded.calibration_for(precision)  # the variant's own threshold and expected FPR
    return {"name": loaded.manifest["name"], "version": loaded.manifest["version"], "precision": precision,
            "target_fpr": calibration["target_fpr"], "expected_fpr": calibration["expected_fpr"]}


@task(cache_policy=NO_CACHE)
def score_file(job: ScoreJob, input_path: Path, part: Path) -> dict:
    """Score one input (table file or image folder) into a part file."""
    single = ScoreJob(bundle=job.bundle, inputs=(input_path,), output=part, device=job.device,
                      batch_size=job.batch_size, threads=job.threads, maps_dir=job.maps_dir,
                      precision=job.precision)
    return score(single).to_dict()


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
    check_output_location(job.output)
    check_not_an_input(job.output, job.inputs)
    check_outside_bundle(job.output, job.bundle, "--output")
    if job.report:
        check_report_target(job.output)
    bundle = check_bundle(job.bundle, job.precision)
    new_folders = make_parents(job.output)
    parts_dir = job.output.parent / f".{job.output.name}.parts-{uuid.uuid4().hex[:8]}"
    parts_dir.mkdir()
    try:
        parts = [parts_dir / f"{i:05d}.parquet" for i in range(len(job.inputs))]
        futures = [score_file.submit(job, path, part) for path, part in zip(job.inputs, parts)]
        files = [future.result() for future in futures]
        merge_parts([(str(p), part) for p, part in zip(job.inputs, parts)], job.output)
        merge_error_files(parts, job.output)  # unreadable images of every input, next to the output
    finally:
        shutil.rmtree(parts_dir, ignore_errors=True)
        remove_empty_folders(new_folders)  # a folder this run made stays only with the output in it
    summary = combine_summaries(job, bundle, files)
    create_markdown_artifact(key="vaeguard-scoring-summary", markdown=summary_markdown(job),
                             description="Scores against calibration: anomaly rate and drift")
    if job.report:
        summary["report"] = str(write_report(job))
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
