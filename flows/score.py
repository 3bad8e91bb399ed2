"""Scoring flow: one task per input (a table file, or an image folder), then one output and a
summary table artifact.

Each task scores its file into a part file beside the output; the parts are merged, and the
merged file renamed into place with its summary, only when every file succeeded, so a failed run
writes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from prefect import flow, task
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from flows.dask_runner import stop_tasks
from pipeline.bundle import Bundle
from pipeline.calibrate import stored_fpr_range
from pipeline.config import ScoreJob
from pipeline.errors import ConfigError, PipelineError
from pipeline.batch_score import label_metrics_of, required_columns, score_files
from pipeline.image_score import (check_side_files, errors_path, read_error_files, remove_staging_folder,
                                  stage_drawn_maps, stage_errors, staging_folder)
from pipeline.outputs import (StagedOutputs, check_not_an_input, check_scores_target, make_parents, merge_scored_parts,
                              missing_parents, remove_empty_folders, stage_report_removal, summary_path)
from pipeline.schema import check_id_names, scored_labels
from pipeline.scoring import check_maps_wanted, score
from pipeline.scoring_report import check_report_target, summary_markdown, write_scoring_report
from pipeline.signals import stopped_after_commit
from pipeline.tables import iter_batches, read_columns
from pipeline.unseen import (MissingCounts, UnseenCounts, file_entries, missing_counts_of, missing_entries,
                             missing_file_entries, training_missing_shares, unseen_counts_of, unseen_entries,
                             warn_unseen)

log = logging.getLogger("vaeguard")


@task(cache_policy=NO_CACHE)
def check_bundle(bundle: Path, precision: str = "fp32", inputs: tuple[Path, ...] = ()) -> dict:
    """Load the bundle, verify its file hashes, find the scorer of this precision and check each
    table input's header against the bundle's columns."""
    loaded = Bundle.load(bundle)
    calibration = loaded.calibration_for(precision)  # the variant's own threshold and expected FPR
    modality = loaded.manifest.get("modality", "table")
    if modality == "table":
        check_id_names(loaded.schema.id_columns, str(loaded.path), several_inputs=len(inputs) > 1, bundle=loaded.name)
        # As single-process scoring does before any work (headers only, no rows): otherwise a file
        # without a column the bundle needs fails only when its task runs, after the others have
        # been scored for nothing. Each task warns of its file's extra columns as it scores it.
        for path in inputs:
            required_columns(loaded, path, warn=False)
    return {"name": loaded.manifest["name"], "version": loaded.manifest["version"], "precision": precision,
            "target_fpr": calibration["target_fpr"], "expected_fpr": calibration["expected_fpr"],
            "fpr_range": stored_fpr_range(calibration), "modality": modality,
            "label_column": loaded.schema.label_column if modality == "table" else None,
            # The merged summary judges the run's unseen values by the categorical columns' statistics.
            "categorical": loaded.preprocessor.categorical if modality == "table" else (),
            # ... and its blank numeric values by training's share of them.
            "numeric": loaded.preprocessor.numeric if modality == "table" else (),
            "numeric_missing": training_missing_shares(loaded) if modality == "table" else {}}


# In the parts folder while the run wants parts; removed when it fails or is stopped. Tasks not
# started yet then skip their input, and one running removes what it wrote when it ends: a stopped
# run on a cluster named by --dask-address removes its folder without waiting for the tasks running
# there, whose writers may even create the folder again. So its absence, not a STOP file in a folder
# that may be gone, is what says the run is over.
RUNNING = "RUNNING"


def run_wants(part: Path) -> bool:
    return (part.parent / RUNNING).exists()


def discard_part(part: Path, maps: Path | None = None) -> None:
    """Remove what a task wrote for a run that is over (the part and the files named after it: its
    summary, labels, unreadable images; the maps it drew), and the parts folder and the maps'
    staging folder once they are empty."""
    for path in part.parent.glob(f"{part.stem}.*"):
        path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):  # the flow's to remove, or another task's files are still in it
        part.parent.rmdir()
    if maps is not None:
        shutil.rmtree(maps, ignore_errors=True)
        with contextlib.suppress(OSError):
            maps.parent.rmdir()


def part_maps(staging: Path, part: Path) -> Path:
    """The folder a task draws its input's maps in: one per part, inside the run's staging folder."""
    return staging / part.stem


@task(cache_policy=NO_CACHE)
def score_file(job: ScoreJob, input_path: Path, part: Path, cwd: str | None = None,
               label_column: str | None = None, modality: str = "table") -> dict | None:
    """Score one input (table file or image folder) into a part file; None once the run is over.

    ``job.maps_dir`` is the run's staging folder for maps (the flow moves them in with the scores),
    in which the input's maps go to a folder of their own (part_maps). The summary's ``warnings``
    are the ones scoring it logged, for the flow to log (log_warnings); if it fails, they go with
    its error instead (warnings_of).
    """
    if not run_wants(part):
        return None
    if cwd is not None and not input_path.is_absolute() and os.getcwd() != cwd:
        raise ConfigError(f"{input_path}: a relative path, but the Dask worker runs in {os.getcwd()}, not in {cwd} "
                          f"where vaeguard was started; pass the input as an absolute path, or start the workers "
                          f"in {cwd}")
    maps = None if job.maps_dir is None else part_maps(job.maps_dir, part)
    single = ScoreJob(bundle=job.bundle, inputs=(input_path,), output=part, device=job.device,
                      batch_size=job.batch_size, threads=job.threads, maps_dir=maps, precision=job.precision)
    try:
        with held_warnings() as warnings:
            # A table's unseen categories warn once for the run, from the merged counts (combine_summaries).
            summary = (score_files(single, warn=False) if modality == "table" else score(single)).to_dict()
            if label_column and label_column in read_columns(input_path, used=[label_column]):
                save_labels(input_path, label_column, part, job.batch_size)
    except Exception:
        if run_wants(part):
            raise
        # The run is over, and no one waits for this error (often the folder removed under the writer).
    if not run_wants(part):
        discard_part(part, maps)
        return None
    return {**summary, "warnings": warnings}


class _HeldWarnings(logging.Filter):
    """Holds the warnings of the threads that asked (held_warnings) instead of passing them on.

    One filter for the logger's life: filters added and removed per task, from several threads,
    raced (the logger walks its list of filters without a copy), and a warning slipped through."""

    def __init__(self) -> None:
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        held = getattr(self.local, "held", None)
        if held is None or record.levelno != logging.WARNING:
            return True
        held.append(record.getMessage())
        return False


_HOLDER = _HeldWarnings()
log.addFilter(_HOLDER)


@contextlib.contextmanager
def held_warnings() -> Iterator[list[str]]:
    """The warnings this thread logs to the "vaeguard" logger meanwhile, collected instead of shown.

    A task in a Dask worker would show them on the worker's console: each worker's own "CUDA is
    not active", and the absolute paths the task was handed. The flow logs each once instead.
    Where the block fails, they go with its error (warnings_of), which Dask pickles back to the flow:
    a block around this one gets them instead, as it would have had this one not held them.
    """
    held: list[str] = []
    outer = getattr(_HOLDER.local, "held", None)  # a block around this one holds again after it
    _HOLDER.local.held = held
    try:
        yield held
    except BaseException as exc:
        if outer is not None:
            outer.extend(held)
        else:
            exc.held_warnings = [*warnings_of(exc), *held]
        raise
    finally:
        _HOLDER.local.held = outer


def warnings_of(error: BaseException) -> list[str]:
    """The warnings held (held_warnings) while the task that failed with ``error`` ran."""
    return getattr(error, "held_warnings", [])


def log_warnings(warnings: list[str], given: dict[str, str], logged: set[str]) -> None:
    """Log each of a task's warnings, with paths as given, unless an earlier task's said the same."""
    for text in (as_given(w, given) for w in warnings):
        if text not in logged:
            logged.add(text)
            log.warning("%s", text)


def labels_path(part: Path) -> Path:
    return part.with_suffix(".labels.npz")


def save_labels(input_path: Path, label_column: str, part: Path, batch_size: int) -> None:
    """The input's labels beside its part's scores, row for row, for the run's AUROC over every input.

    Read again from the input (only its label column): the scoring keeps no rows, and a task
    returns small values, not arrays of every row.
    """
    labels, rows = [], 0
    for batch in iter_batches(input_path, [], [label_column], [], batch_size):  # as text, as score() reads it
        labels.append(scored_labels(batch.column(0), label_column, str(input_path), rows))
        rows += batch.num_rows
    scores = pq.read_table(part, columns=["score"]).column("score").to_numpy()
    np.savez(labels_path(part), label=np.concatenate(labels), score=scores)


def as_given(text: str, given: dict[str, str]) -> str:
    """``text`` with the absolute paths the tasks were handed written back as the user gave them,
    so that it reads as with the local task runner."""
    for absolute in sorted(given, key=len, reverse=True):  # an input inside the bundle folder: longest first
        text = text.replace(absolute, given[absolute])
    return text


def named_as_given(error: PipelineError, given: dict[str, str]) -> PipelineError:
    """The error with its message's paths as given (as_given)."""
    if len(error.args) == 1 and isinstance(error.args[0], str):
        error.args = (as_given(error.args[0], given),)
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
    bundle = check_bundle(resolved.bundle, job.precision, job.inputs)
    check_maps_wanted(job, bundle["modality"])
    # An image's row names it by its input folder's path, so image inputs stay as given (a worker
    # in another folder says so) and the output reads as with the local runner.
    inputs = job.inputs if bundle["modality"] == "image" else tuple(absolute(p) for p in job.inputs)
    if bundle["modality"] == "image":
        # Before any task: each checks its own input's side files too, but only here is --report known
        # (its figures inside an input folder would be scored as images by the next run), and a
        # folder holding the bundle would fail only once the folders before it were scored.
        check_side_files(job)
    new_folders = make_parents(resolved.output)
    # The tasks draw an image run's maps into a hidden folder inside the maps folder, and the maps move
    # in with the scores, as in a plain run: a run that fails or is stopped leaves the maps folder as it was.
    maps_staging = None
    if bundle["modality"] == "image" and resolved.maps_dir is not None:
        maps_staging = staging_folder(resolved.maps_dir)
    map_folders = [] if maps_staging is None else missing_parents(maps_staging)
    parts_dir = resolved.output.parent / f".{job.output.name}.parts-{uuid.uuid4().hex[:8]}"
    parts_dir.mkdir()
    (parts_dir / RUNNING).touch()
    futures = []
    interrupted = False
    # The scores, the images' errors file and their summary become real together, or the earlier ones
    # stay as they were (StagedOutputs), and an earlier report goes with them; a signal in the steps
    # after (the report) says they were kept.
    staged = StagedOutputs()
    stage_report_removal(staged, resolved.output)
    with staged, stopped_after_commit(lambda: staged.committed):
        try:
            parts = [parts_dir / f"{i:05d}.parquet" for i in range(len(job.inputs))]
            if maps_staging is not None:
                # Made before any task: a task that made it, or removed it empty after drawing no maps,
                # would race with the others.
                maps_staging.mkdir(parents=True)
            tasks_job = dataclasses.replace(resolved, maps_dir=maps_staging)
            started = time.perf_counter()
            futures = [score_file.submit(tasks_job, path, part, os.getcwd(), bundle["label_column"],
                                         bundle["modality"]) for path, part in zip(inputs, parts)]
            files, logged = [], set()
            for future in futures:  # in input order, each file's warnings as its result comes
                try:
                    files.append(future.result())
                except Exception as exc:
                    log_warnings(warnings_of(exc), given, logged)  # before its error, as the plain run says them
                    raise
                log_warnings(files[-1]["warnings"], given, logged)
            # Merged beside the parts, not into place: the merge reads and writes every row (5 s for 10M
            # rows to CSV here), too long to hold a signal over. The commit renames it into place.
            named = [(str(p), part) for p, part in zip(job.inputs, parts)]
            merged = parts_dir / f"merged{resolved.output.suffix}"  # no part's name, whatever the output's
            merge_parts(named, merged)
            labelled = label_metrics(parts)  # before the parts folder goes
            check_not_an_input(resolved.output, [source for source, _ in named])  # as merging into place did
            seconds = time.perf_counter() - started
            summary = combine_summaries(job, bundle, files, seconds, labelled)
            if maps_staging is not None:  # before the scores, as a plain run stages them
                stage_drawn_maps(staged, [part_maps(maps_staging, part) for part in parts], resolved.maps_dir)
            staged.add(merged, resolved.output)
            if bundle["modality"] == "image":
                # Only an image run's: a table run leaves that name alone, as the plain run does (it may
                # even be one of the table inputs, which check_side_files checks for images only).
                errors = read_error_files(parts)  # unreadable images of every input
                stage_errors(staged, errors, resolved.output)
                summary["errors_file"] = str(errors_path(job.output)) if errors else None
            # Before the commit, as the plain run warns.
            warn_unseen(summary["unseen_categories"], summary["missing_numeric"])
            staged.text(summary_path(resolved.output), json.dumps(summary, indent=2, allow_nan=False))
            staged.commit()
        except BaseException as exc:
            # Ctrl-C, SIGTERM; one held over the commit comes when every task is done
            interrupted = not isinstance(exc, Exception) and not staged.committed
            raise
        finally:
            try:
                # A failed or interrupted run: tasks not started skip their input, and the flow waits for
                # those running before the folder goes (a second Ctrl-C stops the wait). When interrupted,
                # Dask's tasks are stopped instead (stop_tasks); any still running on a cluster named by
                # --dask-address removes its part itself when it ends.
                (parts_dir / RUNNING).unlink(missing_ok=True)
                if not (interrupted and futures and stop_tasks(futures)):
                    for future in futures:
                        future.wait()
            finally:
                shutil.rmtree(parts_dir, ignore_errors=True)
                if maps_staging is not None:
                    remove_staging_folder(maps_staging, map_folders)
                remove_empty_folders(new_folders)  # a folder this run made stays only with the output in it
        create_markdown_artifact(key="vaeguard-scoring-summary", markdown=summary_markdown(job),
                                 description="Scores against calibration: anomaly rate and drift")
        if job.report:
            write_report(dataclasses.replace(resolved, inputs=inputs))
        # One flat row per file: the nested unseen counts are in the summary file, not in a table cell.
        create_table_artifact(key="vaeguard-scoring",
                              table=[{k: v for k, v in f.items() if k not in ("unseen_categories", "missing_numeric")}
                                     for f in summary["files"]],
                              description=f"Scores of {len(job.inputs)} file(s) with bundle {bundle['name']}: "
                                          f"{summary['rows']:,} rows, {summary['anomalies']:,} anomalies "
                                          f"({summary['anomaly_rate']:.3%} against target {bundle['target_fpr']:.3%})")
    return summary


def label_metrics(parts: list[Path]) -> tuple[float | None, float | None]:
    """AUROC and AUPRC over every labelled row of every input, as single-process scoring computes
    them: rows with no label left out, and only when both classes occur."""
    found = [np.load(labels_path(part)) for part in parts if labels_path(part).exists()]
    if not found:
        return None, None
    return label_metrics_of(np.concatenate([f["label"] for f in found]), np.concatenate([f["score"] for f in found]))


def combine_summaries(job: ScoreJob, bundle: dict, files: list[dict], seconds: float,
                      labelled: tuple[float | None, float | None]) -> dict:
    """The fields of single-process scoring's summary (pipeline.batch_score.ScoreSummary.to_dict),
    each file's entry with the rate, skipped images, AUROC and speed of its task besides."""
    rows = sum(f["rows"] for f in files)
    anomalies = sum(f["anomalies"] for f in files)
    categorical = bundle["categorical"]
    # A task scores one file: its run's counts are that file's own.
    per_file = [(str(path), {name: unseen_counts_of(entry) for name, entry in f["unseen_categories"].items()})
                for path, f in zip(job.inputs, files)]
    numeric = bundle["numeric"]
    blank_per_file = [(str(path), {name: missing_counts_of(entry) for name, entry in f["missing_numeric"].items()})
                      for path, f in zip(job.inputs, files)]
    table = [{"input": str(path), "rows": f["rows"], "anomalies": f["anomalies"],
              "anomaly_rate": round(f["anomaly_rate"], 6), "target_fpr": bundle["target_fpr"],
              "skipped": f["skipped"], "auroc": None if f["auroc"] is None else round(f["auroc"], 4),
              "rows_per_second": round(f["rows_per_second"] or 0),
              "unseen_categories": file_entries(categorical, counts),
              "missing_numeric": missing_file_entries(numeric, blanks)}
             for (path, counts), (_, blanks), f in zip(per_file, blank_per_file, files)]
    # Each worker picks its device (auto: CUDA where it has it); one list says if they differed.
    device = ", ".join(sorted({f["device"] for f in files}))
    unseen: dict[str, UnseenCounts] = {}
    for _, counts in per_file:
        for name, tally in counts.items():
            unseen.setdefault(name, UnseenCounts()).add(tally)
    blank: dict[str, MissingCounts] = {}
    for _, counts in blank_per_file:
        for name, tally in counts.items():
            blank.setdefault(name, MissingCounts()).add(tally)
    where = f"{job.inputs[0]}: " if len(job.inputs) == 1 else ""
    return {"bundle": str(job.bundle), "output": str(job.output), "device": device,
            "target_fpr": bundle["target_fpr"], "expected_fpr": bundle["expected_fpr"],
            "fpr_range": bundle["fpr_range"], "rows": rows, "anomalies": anomalies, "seconds": seconds,
            "files": table, "auroc": labelled[0], "auprc": labelled[1], "skipped": sum(f["skipped"] for f in files),
            "unseen_categories": unseen_entries(categorical, unseen, where, per_file),
            "missing_numeric": missing_entries(numeric, bundle["numeric_missing"], blank, where, blank_per_file),
            "anomaly_rate": anomalies / rows if rows else 0.0, "rows_per_second": rows / seconds if seconds else None}
