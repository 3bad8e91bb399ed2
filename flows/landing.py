"""Scheduled scoring of a landing folder: every landed file scored exactly once, drift watched.

One run: take the output folder's run lock (an overlapping run skips instead of racing),
list the settled files the ledger has not seen, score each in its own task (retried, two at a
time), record each success in the ledger after its output is in place, quarantine what still
fails because of its data, then compare the run's scores with the calibration scores and
publish a markdown artifact, marked as an alert when drift passes the limits. Files that failed
for another reason (device, disk) stay in the landing folder, and the run ends Failed after its
report, so someone looks. `vaeguard serve` serves this flow on a schedule (flows/serve.py).
"""

# No `from __future__ import annotations` here: a served run gets the flow's function pickled by
# value (cloudpickle, into a spawned process) with only the globals its body uses, so string
# annotations such as "Path" could not be resolved there when Prefect validates the parameters.
import contextlib
import difflib
import inspect
import json
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.states import Failed
from prefect.task_runners import ThreadPoolTaskRunner

from pipeline.batch_score import read_score_column, score_files
from pipeline.outputs import text_path, write_atomic
from pipeline.bundle import Bundle
from pipeline.config import LandingJob, ScoreJob
from pipeline.drift import DriftLimits, drift_report
from pipeline.errors import ConfigError, EmptyInputError, PipelineError, one_line
from pipeline.landing import (
    DATA_FAULTS,
    LandedFile,
    LandingRunError,
    Ledger,
    check_folders,
    check_table_bundle,
    claim_output,
    name_fault,
    output_path,
    pending_files,
    record_empty,
    record_failed,
    record_failure,
    record_scored,
    run_failure,
    run_lock,
)

FILE_RETRIES = 2
# Files scored at once. Scoring one file already uses the machine's cores (a pyarrow parsing
# thread plus onnxruntime's threads, one fewer than the cores); Prefect's default thread pool has
# no limit, so hundreds of landed files would each start a session, reader and writer at once and
# fight for cores and memory. Two keep one file's parsing or writing overlapping another's scoring.
FILE_WORKERS = 2


def _worth_retrying(task, task_run, state) -> bool:
    """A fault in the file's data fails the same way again: it goes to quarantine without retries."""
    return not isinstance(state.result(raise_on_failure=False), DATA_FAULTS)


@task(retries=FILE_RETRIES, retry_delay_seconds=1, retry_condition_fn=_worth_retrying, cache_policy=NO_CACHE)
def score_landed_file(bundle: Path, landed: LandedFile, output: Path, device: str, batch_size: int) -> dict:
    """Score one landed file into its own output (atomic); a file without data rows comes back as empty."""
    try:
        summary = score_files(ScoreJob(bundle=bundle, inputs=(landed.path,), output=output, device=device,
                                       batch_size=batch_size))
    except EmptyInputError:
        # A day without events is no failure: raised, it would be logged as a Failed task run (an ERROR).
        return {"rows": 0, "anomalies": 0, "empty": True}
    return {"rows": summary.rows, "anomalies": summary.anomalies}


# The parameters are plain values, not a LandingJob: a deployment stores them as JSON
# (LandingJob.parameters()), and each run builds and checks the job from them. Prefect's own
# validation (pydantic) is off: it turned an empty path into Path("."), the folder the run
# started in, whose files the run then scored and quarantined; LandingJob checks the values as
# they came, with the same one-line error as `vaeguard serve`. The Prefect server still checks
# the types against the signature when a run is created.
@flow(name="vaeguard-landing", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=FILE_WORKERS),
      validate_parameters=False)
def landing_flow(bundle: Path, watch: Path, output: Path, settle_seconds: float = 30.0, device: str = "auto",
                 batch_size: int = 65_536, rate_p_value: float = 0.001, max_psi: float = 0.25) -> dict:
    try:
        return _landing_run(bundle, watch, output, settle_seconds, device, batch_size, rate_p_value, max_psi)
    except PipelineError as exc:
        # Our errors are one line that says what to fix (a bad parameter, a broken bundle, files that
        # failed outside their data): that line is the run's state message and its one ERROR log,
        # where raising it made Prefect log a traceback and prefix the message with the class name.
        # Called as a function, the flow still raises the error itself.
        message = one_line(exc)
        get_run_logger().error("%s", message)
        return Failed(message=message, data=exc)


def check_parameter_names(parameters: Mapping[str, object]) -> None:
    """Every key is a parameter of landing_flow, or a one-line ConfigError naming the others.

    A key the flow does not take never reaches its body: Prefect's engine binds the run's parameters
    to the signature before anything of ours runs (with or without validate_parameters), and the run
    ended Crashed with a traceback. `vaeguard serve` calls this before it starts a run
    (flows/serve.py). Accepting `**extra` instead does not help: Prefect 3.8.8 binds an unknown key
    only when it comes nested under "extra", and the schema would show "extra" as a required
    parameter in the UI.
    """
    accepted = list(inspect.signature(landing_flow.fn).parameters)
    unknown = sorted(set(parameters) - set(accepted), key=str)
    if not unknown:
        return
    named = []
    for key in unknown:
        nearest = difflib.get_close_matches(str(key), accepted, n=1)
        named.append(repr(key) + (f" (did you mean {nearest[0]!r}?)" if nearest else ""))
    noun, pronoun = ("parameter", "it") if len(unknown) == 1 else ("parameters", "them")
    raise ConfigError(f"unknown {noun} {', '.join(named)}: the landing flow takes {', '.join(accepted)}; "
                      f"rename or remove {pronoun} in the run's parameters")


def _landing_run(bundle, watch, output, settle_seconds, device, batch_size, rate_p_value, max_psi) -> dict:
    logger = get_run_logger()
    job = LandingJob(bundle=bundle, watch=watch, output=output, settle_seconds=settle_seconds, device=device,
                     batch_size=batch_size, max_psi=max_psi, rate_p_value=rate_p_value)
    bundle, watch, output = job.bundle, job.watch, job.output
    check_folders(watch, output, bundle)
    loaded = Bundle.load(bundle)  # a corrupted bundle fails the run before any file moves
    check_table_bundle(loaded)  # so does one that scores images, not the tables landed here
    manifest = loaded.manifest
    with contextlib.ExitStack() as stack:
        try:
            output.mkdir(parents=True, exist_ok=True)
            acquired = stack.enter_context(run_lock(output))
            if acquired:
                claim_output(output, watch)
        except OSError as exc:  # check_folders found it writable: it changed since, or the disk is full
            raise _unwritable(output, exc) from None
        if not acquired:
            logger.warning("another run holds %s; skipping this one (its files are picked up next time)", output)
            return {"skipped": True}
        ledger = Ledger(output)
        landed = pending_files(watch, ledger, job.settle_seconds)
        # A name the readers can't open is quarantined without a task: no retry can score it.
        unreadable_names = {item.relative: fault for item in landed if (fault := name_fault(item)) is not None}
        futures = {item.relative: (item, score_landed_file.submit(bundle, item, output_path(output, item), job.device,
                                                                  job.batch_size))
                   for item in landed if item.relative not in unreadable_names}
        files = []
        for item in landed:
            if item.relative in unreadable_names:
                entry = _settle(output, item, None, unreadable_names[item.relative], ledger)
            else:
                future = futures[item.relative][1]
                future.wait()
                entry = _settle(output, item, future, None, ledger)
            if entry["status"] == "empty":
                logger.info("%s: %s", text_path(item.relative), entry["reason"])
            elif entry["status"] != "scored":
                logger.warning("%s: %s: %s", text_path(item.relative), entry["status"], entry["reason"])
            files.append(entry)
    scored_outputs = [output_path(output, futures[f["file"]][0]) for f in files if f["status"] == "scored"]
    calibration = manifest["calibration"]
    drift = drift_report(read_score_column(scored_outputs), sum(f["anomalies"] for f in files),
                         _calibration_scores(calibration), calibration["expected_fpr"],
                         DriftLimits(rate_p_value=job.rate_p_value, max_psi=job.max_psi))
    for alert in drift.alerts:
        logger.warning("drift alert: %s", alert)
    for note in drift.not_judged:  # a quiet small run is not a calm one
        logger.info("drift: %s", note)
    report = {"finished_at": datetime.now(timezone.utc).isoformat(), "bundle": str(bundle),
              "version": manifest["version"], "files": files, "drift": drift.to_dict(), "alert": drift.alert}
    stamp = report["finished_at"].replace(":", "").replace("-", "")
    try:
        (output / "runs").mkdir(exist_ok=True)
        write_atomic(output / "runs" / f"{stamp}.json", json.dumps(report, indent=2, allow_nan=False))
    except OSError as exc:  # the artifact still tells what the run did
        unwritten = _unwritable(output, exc)
    else:
        unwritten = None
    create_markdown_artifact(key="vaeguard-landing-alert" if drift.alert else "vaeguard-landing",
                             markdown=run_markdown(report, calibration["target_fpr"]),
                             description=("ALERT: " if drift.alert else "") + f"{len(scored_outputs)} of "
                                         f"{len(files)} file(s) scored from {watch}")
    # Raised only now, so the report and artifact exist; the run ends Failed so the cause is seen.
    failure = run_failure(files) or unwritten
    if failure is not None:
        raise failure
    return report


def _settle(output: Path, item: LandedFile, future, fault: BaseException | None, ledger: Ledger) -> dict:
    """Record one file's outcome (its finished task, or a fault found before scoring); its run-report entry.

    A write that fails meanwhile (a quarantine folder or ledger that can't be written, a full
    disk) makes the file 'failed', left for the next run, instead of ending the run with a
    traceback before the other files were recorded: they were then scored again every run.
    """
    try:
        if fault is not None:
            return record_failure(output, item, fault, ledger)
        if not future.state.is_completed():
            return record_failure(output, item, _failure(future.state), ledger)
        result = future.result()
        if result.get("empty"):
            return record_empty(item, ledger)
        return record_scored(item, output_path(output, item), result, ledger)
    except OSError as exc:
        return record_failed(item, f"could not be recorded ({one_line(exc)}); it is tried again next run",
                             type(exc).__name__, ledger)


def _unwritable(output: Path, exc: OSError) -> LandingRunError:
    return LandingRunError(f"output folder {output} can't be written ({one_line(exc)}); expected a folder this user "
                           f"can write: fix its permissions or free space, or give another --output")


def _calibration_scores(calibration: dict) -> np.ndarray:
    return np.asarray(calibration["scores"], dtype=np.float32)


def _failure(state) -> BaseException:
    """The exception a failed task state holds (its type decides quarantine or retry next run)."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - the exception is the point
        return exc
    return RuntimeError(state.message or state.name)


def run_markdown(report: dict, target_fpr: float) -> str:
    drift = report["drift"]
    rows = [f"| {text_path(f['file'])} | {f['status']} | {f['rows']:,} | {f['anomalies']:,} | "
            f"{(f['anomalies'] / f['rows']) if f['rows'] else 0:.3%} |" for f in report["files"]]
    lines = [
        f"# {'ALERT: ' if report['alert'] else ''}landing run of bundle version {report['version']}",
        "", "| file | status | rows | anomalies | rate |", "|---|---|---|---|---|", *rows, "",
        f"- rows {drift['rows']:,}, anomalies {drift['anomalies']:,}: rate {fmt(drift['observed_rate'], '.3%')} "
        f"against target FPR {target_fpr:.3%} (p = {fmt(drift['calibrated_p_value'], '.3g')} given the "
        f"calibration sample; plain binomial p = {fmt(drift['rate_p_value'], '.3g')})",
        f"- score drift: PSI {fmt(drift['psi'], '.3f')} (p = {fmt(drift['psi_p_value'], '.2g')} with no drift), "
        f"KS {fmt(drift['ks_statistic'], '.3f')} (p = {fmt(drift['ks_p_value'], '.3g')})",
        *[f"- {note}" for note in drift["not_judged"]],
        *[f"- **alert**: {a}" for a in drift["alerts"]],
        *[f"- {text_path(f['file'])} {f['status']}: {f['reason']}" for f in report["files"] if f.get("reason")],
    ]
    return "\n".join(lines)


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
