"""The `vaeguard` command: train, score, export, inspect, demo.

Errors the pipeline raises on purpose (PipelineError) are printed as one line, without a
traceback, and the exit status is 1; `--verbose` adds the traceback and debug logs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path

from pipeline.calibrate import describe_fpr_range
from pipeline.console import quiet_console
from pipeline.errors import ConfigError, PipelineError, one_line
from pipeline.signals import SIGNALS, StoppedAfterCommit, stopped_after_commit

log = logging.getLogger("vaeguard")


def id_column_names(text: str, columns: list[str]) -> tuple[str, ...]:
    """--id-columns' names: split at commas, each piece taken without the spaces around it
    (`row_id, batch`), unless the file's header has it as written, spaces included (`"Order ID "`),
    or a run of pieces is one name with its commas (`"id,part"`): stripped, such names could not be
    given at all."""
    pieces, names, start, known = text.split(","), [], 0, set(columns)
    while start < len(pieces):
        for end in range(len(pieces), start, -1):  # the longest run of pieces that is a column first
            joined = ",".join(pieces[start:end])
            name = joined if joined in known else joined.strip()
            if name in known or end == start + 1:
                break
        if name:
            names.append(name)
        start = end
    return tuple(names)


def _path(text: str) -> Path:
    """A path argument. An empty one is refused: Path("") is the current folder, so an unset shell
    variable (`vaeguard serve B --watch "$LANDING"`) served, trained on or wrote into wherever the
    command ran."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path; give a file or folder (is a shell variable unset?)")
    return Path(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaeguard", description="VAE anomaly detection for tables and images: "
                                     "train, calibrate, export to ONNX, batch-score.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--verbose", "-v", action="store_true", help="show debug logs and tracebacks")
    # Also before the command (`vaeguard --verbose score ...`), where git and docker take theirs. Its
    # own name: the command's parser would set `verbose` back to its default.
    parser.add_argument("--verbose", "-v", action="store_true", dest="verbose_first", help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", parents=[common], help="train a bundle from a CSV or Parquet table, or from images")
    train.add_argument("data", type=_path, help="training table (.csv, .csv.gz, .parquet, .pq) of mostly normal rows, "
                       "or images (a folder, a CSV of paths, a .npy) with --image-size")
    train.add_argument("--name", required=True, help="bundle name: written to OUT/NAME/")
    train.add_argument("--label-column", help="0/1 column (1 = anomaly); anomalies are never trained on")
    train.add_argument("--id-columns", help="comma-separated columns copied to scores; a name with "
                       "spaces around it or a comma in it is taken as the header writes it (quote it for the shell)")
    train.add_argument("--target-fpr", type=float, help="false-positive rate of the threshold (default 0.01)")
    train.add_argument("--config", type=_path, help="YAML file with preprocess/model/training/calibration sections; "
                       "--target-fpr, --seed, --trim-fraction and --device, when given, win over its values")
    train.add_argument("--seed", type=int, help="random seed (default 0)")
    train.add_argument("--trim-fraction", type=float,
                       help="if the training rows may hold anomalies: leave each batch's worst-fitting share of "
                            "rows out of the loss, e.g. 0.05 (default 0)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), help="training device (default auto)")
    train.add_argument("--out", type=_path, default=Path("exported"), help="output folder (default exported/)")
    images = train.add_argument_group("images (DATA is a folder of images, a CSV with a path column, or a .npy)")
    images.add_argument("--image-size", type=int, help="square side images are resized to (default 64)")
    images.add_argument("--channels", type=int, choices=(1, 3), help="1 = grayscale (default), 3 = RGB")
    images.add_argument("--path-column", help="column of image paths in a CSV (default path)")

    score = commands.add_parser("score", parents=[common], help="score tables or image folders with a bundle")
    score.add_argument("bundle", type=_path, help="bundle folder written by `vaeguard train`")
    score.add_argument("inputs", type=_path, nargs="+", metavar="INPUT",
                       help="table files (.csv, .csv.gz, .parquet, .pq), or for an image bundle image folders, "
                            ".npy arrays or CSV lists of paths; each once")
    score.add_argument("--output", "-o", type=_path, required=True, help="scores file: .parquet or .csv")
    score.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    score.add_argument("--batch-size", type=int, default=65_536, help="rows per chunk (default 65536)")
    score.add_argument("--threads", type=int, help="onnxruntime threads (default: one fewer than the cores, at most 3, "
                                                    "leaving one to the reader; images: cores, at most 4; more than "
                                                    "the cores: the cores, with a warning)")
    score.add_argument("--maps", type=_path, help="image bundles: write a PNG (image, reconstruction, heat map) "
                       "for each flagged image into this folder")
    score.add_argument("--report", action="store_true",
                       help="write OUT.report.html next to the output: score histograms, rate, drift, top anomalies")
    score.add_argument("--task-runner", choices=("local", "dask"), default="local",
                       help="dask: one Prefect task per input file on a Dask cluster (prefect-dask)")
    score.add_argument("--dask-address", help="tcp://host:port of a Dask scheduler (default: a local cluster)")
    score.add_argument("--precision", choices=("fp32", "fp16", "int8"), default="fp32",
                       help="scorer to use: fp32 (scorer.onnx, default) or a variant added by `vaeguard export`")

    export = commands.add_parser("export", parents=[common],
                                 help="add a reduced-precision scorer (fp16 or int8), checked and recalibrated on the bundle's "
                                      "calibration inputs, to a bundle; on a CPU neither was reliably faster than fp32 (BENCHMARKS.md, "
                                      "\"Precision variants\")")
    export.add_argument("bundle", type=_path, help="bundle folder written by `vaeguard train`")
    export.add_argument("--precision", choices=("fp16", "int8"), required=True)
    export.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where the variant is calibrated and timed against fp32 (default cpu)")
    export.add_argument("--threads", type=int, help="onnxruntime threads (default: cores, at most 4; "
                        "more than the cores: the cores, with a warning)")

    serve = commands.add_parser("serve", parents=[common],
                                help="score a landing folder on a schedule (needs `prefect server start`)")
    serve.add_argument("bundle", type=_path)
    serve.add_argument("--watch", type=_path, required=True, help="landing folder: new CSV/Parquet files land here")
    serve.add_argument("--output", type=_path, required=True, help="folder for scores, ledger and quarantine")
    when = serve.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", help='cron schedule, e.g. "0 * * * *" for every hour')
    when.add_argument("--interval", type=float, help="schedule every N seconds")
    serve.add_argument("--settle-seconds", type=float, default=30.0,
                       help="a file whose mtime moved in the last N seconds is still being written: next run")
    serve.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    serve.add_argument("--max-psi", type=float, default=0.25, help="alert above this score PSI")
    serve.add_argument("--rate-p-value", type=float, default=0.001,
                       help="alert when the anomaly rate is this unlikely under the target FPR")
    serve.add_argument("--name", help="deployment name (default: vaeguard-<bundle name>)")
    serve.add_argument("--api-wait", type=float, default=20.0,
                       help="seconds to wait for a Prefect API that is not up yet, e.g. one starting at boot (default 20)")

    inspect = commands.add_parser("inspect", parents=[common], help="show a bundle's manifest")
    inspect.add_argument("bundle", type=_path)
    inspect.add_argument("--json", action="store_true", help="print the raw manifest")

    demo = commands.add_parser("demo", parents=[common], help="train and score on generated data through Prefect")
    parser.set_defaults(commands=commands.choices)
    demo.add_argument("--rows", type=int, default=20_000, help="rows of generated training data")
    demo.add_argument("--out", type=_path, default=Path("exported"), help="bundle folder (default exported/)")
    demo.add_argument("--work", type=_path, default=Path("runs/demo"), help="folder for data and scores")
    return parser


def cmd_train(args: argparse.Namespace) -> None:
    from pipeline.config import ImageTrainJob, TrainJob, load_config
    from pipeline.image_workflow import run_image_training
    from pipeline.images import is_image_input
    from pipeline.workflow import run_training

    config = load_config(args.config)
    if args.target_fpr is not None:
        config = dataclasses.replace(config, calibration=dataclasses.replace(config.calibration, target_fpr=args.target_fpr))
    overrides = {k: v for k, v in (("seed", args.seed), ("device", args.device), ("trim_fraction", args.trim_fraction))
                 if v is not None}
    if overrides:
        config = dataclasses.replace(config, training=dataclasses.replace(config.training, **overrides))
    # A CSV is a table unless --image-size says its path column points at images.
    path_column = "path" if args.path_column is None else args.path_column
    if args.image_size is not None or (args.data.suffix.lower() != ".csv"
                                       and is_image_input(args.data, path_column)):
        # `is None`, not `or`: --image-size 0 must be refused, not read as "no size, so a table".
        size = 64 if args.image_size is None else args.image_size
        job = ImageTrainJob(data=args.data, name=args.name, out_dir=args.out, image_size=size,
                            channels=1 if args.channels is None else args.channels, path_column=path_column,
                            config=config)
    else:
        from pipeline.tables import read_columns

        for option, value in (("--channels", args.channels), ("--path-column", args.path_column)):
            if value is not None:
                # Said, not ignored: a table trains on its columns, and the user expected images.
                raise ConfigError(f"{option} {value}: {args.data} is read as a table, and {option} is for "
                                  f"images; leave it out, or add --image-size N to train on the images it lists")
        if args.id_columns is not None and not args.id_columns.strip(", "):
            # An unset shell variable (--id-columns "$IDS"): read as none, each id became a feature.
            raise ConfigError(f"--id-columns is empty (got {args.id_columns!r}); give the id columns' names, e.g. "
                              f"--id-columns row_id, or leave the option out (is a shell variable unset?)")
        # The header says which pieces of --id-columns are names (no header read without the option).
        id_columns = id_column_names(args.id_columns, read_columns(args.data)) if args.id_columns else ()
        job = TrainJob(data=args.data, name=args.name, out_dir=args.out, label_column=args.label_column,
                       id_columns=id_columns, config=config)
    # A signal once the new bundle is in place (its manifest with it) came after the output was made whole.
    with stopped_after_commit(_replaced(job.bundle_dir / "manifest.json")):
        facts = run_image_training(job) if isinstance(job, ImageTrainJob) else run_training(job)
        print(format_training(facts))


def _replaced(path: Path) -> Callable[[], bool]:
    """Whether ``path`` names another file than when this was called: the command's output was
    committed, and a signal from then on came after it (stopped_after_commit)."""
    from pipeline.outputs import file_identity

    earlier = file_identity(path)
    return lambda: file_identity(path) != earlier


def format_training(facts: dict) -> str:
    sizes, trained, cal = facts["split"], facts["train_model"], facts["calibrate_threshold"]
    if "load_images" in facts:
        loaded = facts["load_images"]
        data = f"{loaded['images']:,} images" + (f"; {loaded['skipped']:,} unreadable skipped" if loaded["skipped"] else "")
    else:
        loaded = facts["load_and_validate"]
        data = (f"{loaded['rows']:,} rows; {loaded['numeric_columns']} numeric, "
                f"{loaded['categorical_columns']} categorical columns"
                + (f"; dropped {', '.join(loaded['dropped_columns'])}" if loaded["dropped_columns"] else ""))
    lines = [
        f"bundle:      {facts['bundle']}",
        f"data:        {data}",
        f"splits:      train {sizes['train']:,}, validation {sizes['val']:,}, calibration {sizes['cal']:,}"
        + (f", test {sizes['test']:,}" if sizes["test"] else ""),
        f"training:    {trained['epochs']} epochs (best {trained['best_epoch']}) in {trained['seconds']:.1f}s on {trained['device']}",
        f"threshold:   {cal['threshold']:.6g} (expected FPR {cal['expected_fpr']:.4%}; "
        f"{describe_fpr_range(cal['rank'], cal['n_calibration'])})",
    ]
    if "auroc" in cal:
        lines.append(f"held-out:    AUROC {cal['auroc']:.4f}, AUPRC {cal['auprc']:.4f}, "
                     f"FPR {cal['test_fpr']:.4%}, recall {cal['test_recall']:.2%}")
    from pipeline.inspect import parity_of_decisions  # here: it loads pandas, which most commands never need

    verify = facts["verify_bundle"]
    lines.append(f"ONNX parity: max |score diff| {verify['max_abs_diff']['score']:.2e}, decisions "
                 f"{parity_of_decisions(verify)}")
    lines.append(f"report:      {Path(facts['bundle']) / facts['write_training_report']['report']}")
    return "\n".join(lines)


def cmd_score(args: argparse.Namespace) -> None:
    from pipeline.outputs import summary_path
    from pipeline.scoring import score
    from pipeline.config import ScoreJob

    if args.dask_address and args.task_runner != "dask":
        # Said, not ignored: the run would score here, on one machine, while the user meant the cluster.
        raise ConfigError(f"--dask-address {args.dask_address}: a Dask scheduler is used only with --task-runner "
                          f"dask; add --task-runner dask, or leave --dask-address out")
    job = ScoreJob(bundle=args.bundle, inputs=tuple(args.inputs), output=args.output, device=args.device,
                   batch_size=args.batch_size, threads=args.threads, maps_dir=args.maps, report=args.report,
                   precision=args.precision)
    if job.precision != "fp32":
        from pipeline.bundle import Bundle

        bundle = Bundle.load(job.bundle)
        bundle.scorer_path_for(job.precision)  # a missing variant fails here, before a Dask cluster starts
        entry = bundle.manifest["variants"][job.precision]
        for warning in entry.get("warnings", []):
            log.warning("%s: %s", entry["file"], warning)
    # A signal once this run's summary is in place (the last file its commit renames) comes after the
    # output was made whole: in the report, or as the Dask cluster and the Prefect server stop (seconds).
    with stopped_after_commit(_replaced(summary_path(job.output))):
        if args.task_runner == "dask":
            from flows.dask_runner import dask_task_runner, prefect_api
            from flows.score import score_flow
            from pipeline.batch_score import ScoreSummary

            with quiet_console(args.verbose), prefect_api(args.dask_address):
                flowed = score_flow.with_options(task_runner=dask_task_runner(args.dask_address, args.verbose))(job)
            # The flow's summary has ScoreSummary's fields: printed as the plain run's is.
            printed = {f.name for f in dataclasses.fields(ScoreSummary)} - {"files"}
            summary = ScoreSummary(**{k: v for k, v in flowed.items() if k in printed})
        else:
            summary = score(job)
        if job.report:
            from pipeline.scoring_report import report_path, write_scoring_report

            # The flow wrote it already, as one of its tasks.
            print(f"report:  {report_path(job.output) if args.task_runner == 'dask' else write_scoring_report(job)}")
        print(f"scores:  {job.output}\nsummary: {summary_path(job.output)}\n{summary.describe()}")
        print(f"device:  {summary.device}; {summary.rows / max(summary.seconds, 1e-9):,.0f} rows/s")


def cmd_export(args: argparse.Namespace) -> None:
    from pipeline.precision import describe_variant, export_variant

    # The variant is in place once the manifest lists it (pipeline.precision commits it that way).
    with stopped_after_commit(_replaced(args.bundle / "manifest.json")):
        entry = export_variant(args.bundle, args.precision, device=args.device, threads=args.threads)
        print(f"bundle:      {args.bundle}\n{describe_variant(entry)}")
        for warning in entry["warnings"]:
            log.warning("%s: %s", entry["file"], warning)


def cmd_serve(args: argparse.Namespace) -> None:
    """Ctrl-C or SIGTERM is a requested stop at any moment, the set-up included: status 0 and
    "vaeguard serve stopped". A supervisor (systemd, Kubernetes, `docker stop`) sends SIGTERM to
    stop a service and reads 0 as the clean stop it asked for (systemd counts an exit status of
    143 as a failure unless told otherwise); before, a signal during the set-up ended serve with
    143 or 0 depending on the moment."""
    stopping: list[int] = []

    def stop(signum, frame):
        # Until the runner takes the signals over (flows.serve.StoppableRunner), the first one
        # unwinds the set-up; once stopping, one more must not cut the stop short.
        if not stopping:
            stopping.append(signum)
            raise Terminated(signum) if signum == signal.SIGTERM else KeyboardInterrupt()

    saved = {}
    if threading.current_thread() is threading.main_thread():  # where signal handlers can be set
        saved = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            _serve(args)
            stopping.append(0)  # served, and stopped by the runner
        except KeyboardInterrupt:
            pass  # a signal during the set-up: flows.serve.serve_landing left nothing registered or active
        print("vaeguard serve stopped", flush=True)
    finally:
        for signum, handler in saved.items():
            if handler is not None:  # None: set outside Python, can't be put back
                signal.signal(signum, handler)


def _serve(args: argparse.Namespace) -> None:
    from pipeline.bundle import Bundle
    from pipeline.config import LandingJob, ServeJob
    from pipeline.landing import check_folders, check_table_bundle, output_claimed

    # Every value is checked here, before the bundle is read or Prefect is reached. Absolute
    # paths: the scheduled runs start in another working directory.
    landing = LandingJob(bundle=args.bundle.resolve(), watch=args.watch.resolve(), output=args.output.resolve(),
                         settle_seconds=args.settle_seconds, device=args.device, max_psi=args.max_psi,
                         rate_p_value=args.rate_p_value)
    job = ServeJob(landing=landing, cron=args.cron, interval=args.interval, name=args.name, api_wait=args.api_wait)
    bundle = Bundle.load(args.bundle)
    check_table_bundle(bundle)
    check_folders(args.watch, args.output, args.bundle)
    if landing.device == "cuda":
        from pipeline.runtime import create_session

        # `vaeguard score --device cuda`'s own check, once here: where CUDA is not active, every
        # scheduled run failed on it, file after file, retried each run.
        create_session(bundle.scorer_path_for("fp32"), "cuda", threads=1, contents=bundle.scorer_bytes("fp32"))
    from flows.serve import serve_landing

    # Claimed from here, not from the first run on: another serve of the output folder is refused at
    # once. Taken back on the way out if no run wrote into it, so a refused serve leaves nothing.
    with output_claimed(landing.output, landing.watch), quiet_console(args.verbose):
        # Prefect's records of a lost API connection, without their tracebacks
        serve_landing(job, bundle.name)


def cmd_inspect(args: argparse.Namespace) -> None:
    from pipeline.bundle import Bundle
    from pipeline.errors import BundleError
    from pipeline.inspect import describe_manifest
    from pipeline.runtime import check_scorer_agrees, create_session

    bundle = Bundle.load(args.bundle)
    print(json.dumps(bundle.manifest, indent=2) if args.json else describe_manifest(bundle.manifest))
    # What is shown is the manifest, but only the graphs are hash-checked: where a hand edit made
    # them disagree, say so here rather than first at the night's `vaeguard score`, which refuses it.
    for precision in ("fp32", *bundle.manifest.get("variants", {})):
        try:
            check_scorer_agrees(create_session(bundle.scorer_path_for(precision), "cpu", threads=1,
                                               contents=bundle.scorer_bytes(precision)), bundle, precision)
        except BundleError as exc:
            log.warning("%s (`vaeguard score` refuses the bundle until then)", exc)


def cmd_demo(args: argparse.Namespace) -> None:
    # The one command that reaches into flows/: the demo *is* the Prefect path.
    from flows.demo import run_demo

    with quiet_console(args.verbose):
        run_demo(rows=args.rows, out_dir=args.out, work_dir=args.work)


COMMANDS = {"train": cmd_train, "score": cmd_score, "export": cmd_export, "serve": cmd_serve, "inspect": cmd_inspect,
            "demo": cmd_demo}


def control_escaped(message: str) -> str:
    """``message`` with control characters written as Python escapes (a line break as \\n).

    Our errors are one line, but they quote file and column names, which may hold a line break:
    `x<newline>y.csv: file not found` printed over two lines, which a log reader or a script taking
    the last line of stderr splits. Whitespace is kept as it is otherwise, since it is part of the name.
    """
    return "".join(c if c.isprintable() or c == " " else c.encode("unicode_escape").decode("ascii") for c in message)


class OneLineFormatter(logging.Formatter):
    """A warning on one line, as an error is (control_escaped); a traceback (--verbose) keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return control_escaped(super().formatMessage(record))


def main(argv: list[str] | None = None) -> int:
    # Known arguments first: argparse hands a subcommand's unknown ones to the top parser, which
    # printed its own usage and "vaeguard: error:" for a typo such as `score ... --tagret`.
    args, unknown = build_parser().parse_known_args(argv)
    if unknown:
        args.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    args.verbose = args.verbose or args.verbose_first
    # Only our own logger: Prefect configures its own, and a root handler would print its logs twice.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLineFormatter("%(levelname)s: %(message)s" if args.verbose else "warning: %(message)s"))
    log.handlers[:] = [handler]  # replace, not add: main() may run many times in one process
    log.setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    log.propagate = False
    # No argv: main() is the program (`vaeguard`, `python -m pipeline.cli`), which exits when it returns.
    # Called with one (tests, other code), it leaves the process's signal handlers as it found them.
    leaving = _Leaving() if argv is None and threading.current_thread() is threading.main_thread() else None
    previous = _stop_cleanly_on_sigterm()

    def ended() -> None:
        if leaving is not None:
            leaving.begin()
        elif previous is not None:
            signal.signal(signal.SIGTERM, previous)

    status = _run(args, ended)
    if leaving is not None:
        leaving.status = status
    return status


def _run(args: argparse.Namespace, ended: Callable[[], None]) -> int:
    """Runs the command and returns the exit status, printing what went wrong as one line.
    ``ended()`` is called as soon as the command is over, whether it returned or raised."""
    try:
        try:
            COMMANDS[args.command](args)
            sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
        finally:
            ended()
    except BrokenPipeError:
        # `vaeguard inspect B | head`: the reader took what it wanted and left. Quiet, as `cat` is, with
        # the status a shell gives a process a closed pipe stopped; stdout goes nowhere so that
        # Python's own flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except PipelineError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {control_escaped(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, (Terminated, StoppedAfterCommit)) else signal.SIGINT
        how = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
        if isinstance(exc, StoppedAfterCommit):
            # The signal came while the output was being committed and waited for it (pipeline.signals).
            # After train's or export's commit there is only the summary to print: no report to name.
            which = " (such as --report)" if args.command == "score" else ""
            print(f"error: {how} after the output was written whole, which was kept; the steps after it{which} "
                  f"did not run", file=sys.stderr)
        else:
            print(f"error: {how}; no output was written", file=sys.stderr)
        return 128 + signum
    except OSError as exc:
        if args.verbose:
            traceback.print_exc()
        print(f"error: {storage_error(args, exc) or _unexpected(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.verbose:
            traceback.print_exc()
        print(f"error: {_unexpected(exc)}{_space_left_hint(args)}", file=sys.stderr)
        return 1
    return 0


def _unexpected(exc: BaseException) -> str:
    return f"unexpected {type(exc).__name__}: {one_line(exc)} (run with --verbose for the traceback)"


# Where each command writes, to name in a disk-full error: the error names at best a hidden
# temporary file there (or, from pyarrow and pandas, nothing at all).
WRITES_TO = {"score": (("--output", "output"), ("--maps", "maps")), "train": (("--out", "out"),),
             "demo": (("--out", "out"), ("--work", "work")), "export": (("bundle", "bundle"),)}
# Commands whose every write goes through a temporary name removed on failure (demo writes its
# generated data straight into --work).
WRITES_WHOLE = {"score", "train", "export"}


def _written_to(args: argparse.Namespace, filename: str | bytes | None = None) -> list[tuple[str, Path]]:
    """The command's outputs (option, path) ``filename`` may be written for: the deepest one holding
    it, or every one where no file is named; none for a file outside them all."""
    places = [(option, Path(getattr(args, attribute))) for option, attribute in WRITES_TO.get(args.command, ())
              if getattr(args, attribute, None) is not None]
    if not filename:
        return places
    file = Path(os.fsdecode(filename)).absolute()
    # --output is a file: its temporary name, summary and report are written beside it.
    holding = [(len(root.parts), option, place) for option, place in places
               for root in [place.absolute().parent if option == "--output" else place.absolute()]
               if file == root or root in file.parents]
    return [max(holding)[1:]] if holding else []


# Free space below which an unexpected failure of a writing command is most likely a full disk.
LOW_SPACE_BYTES = 1 << 20


def _space_left_hint(args: argparse.Namespace) -> str:
    """For a command that writes, where its folder's disk is (nearly) full: the likely cause. A full
    disk does not always come as ENOSPC: torch.save, for one, raises "RuntimeError: [enforce fail
    at inline_container.cc] unexpected pos"."""
    for option, target in _written_to(args):
        free = _free_bytes(target)
        if free is not None and free < LOW_SPACE_BYTES:
            return (f"; the disk of {option} {target} has {free:,} bytes free, the likely cause: free space on it, "
                    f"or write elsewhere")
    return ""


def _free_bytes(target: Path) -> int | None:
    """Free space on the disk ``target`` is (or would be made) on; None where that can't be told."""
    folder = next((p for p in (target, *target.absolute().parents) if p.is_dir()), None)
    try:
        return shutil.disk_usage(folder).free if folder is not None else None
    except OSError:
        return None


STORAGE_ERRORS = {errno.ENOSPC: ("the disk is full", "free space on it, or write elsewhere"),
                  errno.EDQUOT: ("the disk quota is used up", "free space on it, or write elsewhere"),
                  # Checked before any work (pipeline.outputs.check_location): here the file system
                  # turned read-only during the run, as ext4 does after a disk error.
                  errno.EROFS: ("the file system is read-only", "make it writable, or write elsewhere")}


def storage_error(args: argparse.Namespace, exc: OSError) -> str | None:
    """The one line for a disk or quota that filled up, or a file system that turned read-only, while
    the command wrote (None for any other OSError): where, and what to do."""
    if exc.errno not in STORAGE_ERRORS:
        return None
    what, fix = STORAGE_ERRORS[exc.errno]
    written = _written_to(args, exc.filename)
    if not exc.filename and exc.errno != errno.EROFS:
        # Several outputs and no file named (--output and --maps): the one whose disk is full, if told.
        written = [(option, place) for option, place in written
                   if (free := _free_bytes(place)) is not None and free < LOW_SPACE_BYTES] or written
    if written:
        where = " or ".join(f"{option} {place}" for option, place in written)
    elif exc.filename:  # outside the outputs: a temporary folder, say
        where = str(Path(os.fsdecode(exc.filename)).parent)
    else:  # a command that writes nothing, and no file named: nothing to say where
        return None
    kept = "; nothing was written, and an earlier output is as it was" if args.command in WRITES_WHOLE else ""
    return f"{where}: {what} ({os.strerror(exc.errno)}) while writing there; {fix}{kept}"


class _Leaving:
    """Ctrl-C and SIGTERM once the command is over, while Python shuts down (about 1.2 s after
    `train`, most of it collecting torch's objects).

    Then the default handlers were back: a signal ended a successful run with 130 or 143 and
    nothing said, or printed a KeyboardInterrupt traceback from one of torch's exit handlers and
    exited 0. The command's work is done and said: a signal is ignored, and the exit status is the
    command's. A second one leaves at once with it (an exit step that hangs), skipping the
    rest of the shutdown."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.caught = 0
        # The last exit handler (those registered later run first, torch's and Prefect's among them):
        # after it Python resets its signal handlers to the default while it frees its modules, and
        # only an ignored signal can't end the process there.
        atexit.register(_ignore_signals)

    def begin(self) -> None:
        for signum in SIGNALS:
            if signal.getsignal(signum) not in (None, signal.SIG_IGN):  # None: set outside Python
                signal.signal(signum, self)

    def __call__(self, signum: int, frame) -> None:
        self.caught += 1
        if self.caught > 1:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(128 + signum if self.status is None else self.status)


def _ignore_signals() -> None:
    for signum in SIGNALS:
        if signal.getsignal(signum) is not None:
            signal.signal(signum, signal.SIG_IGN)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, like Ctrl-C's KeyboardInterrupt."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_terminated(signum, frame):
    raise Terminated(signum)


def _stop_cleanly_on_sigterm():
    """SIGTERM (`timeout`, `kill`, a scheduler stopping a job) ends Python at once by default,
    skipping the `finally` blocks that remove a run's staging folder and part files; raising
    instead unwinds them, as Ctrl-C does. `serve` hands SIGTERM to its runner once serving
    (flows.serve.StoppableRunner), which stops the runs in flight itself."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _raise_terminated)


if __name__ == "__main__":
    sys.exit(main())
