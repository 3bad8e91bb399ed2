"""The console as the CLI shows Prefect's and Dask's logs around a flow run."""

import io
import logging
import sys
import warnings

from pipeline.console import quiet_console
from pipeline.errors import DataError


def test_quiet_console_leaves_out_only_runs_our_errors_failed():
    """Prefect's records of a run that failed with a PipelineError (the CLI's `error:` line says
    it) are left out; a bug's keep their lines, without the traceback; so are Dask's INFO lines.
    --verbose shows everything."""
    def failed_run(logger: str, run: str, error: Exception) -> list[logging.LogRecord]:
        try:
            raise error
        except Exception:
            raised = sys.exc_info()
        fields = {"name": logger, "levelno": logging.ERROR, "levelname": "ERROR",
                  ("task_run_id" if logger == "prefect.task_runs" else "flow_run_id"): run}
        return [logging.makeLogRecord({**fields, "msg": "failed with exception: %r", "args": (error,),
                                       "exc_info": raised}),
                logging.makeLogRecord({**fields, "msg": f"Finished in state Failed({type(error).__name__})"})]

    records = [*failed_run("prefect.task_runs", "t1", DataError("bad.csv: wrong")),
               *failed_run("prefect.task_runs", "t2", KeyError("bug")),
               *failed_run("prefect.flow_runs", "f1", DataError("bad.csv: wrong")),
               logging.makeLogRecord({"name": "distributed.scheduler", "levelno": logging.INFO, "levelname": "INFO",
                                      "msg": "Scheduler at: tcp://127.0.0.1:1"}),
               logging.makeLogRecord({"name": "distributed.nanny.memory", "levelno": logging.WARNING,
                                      "levelname": "WARNING", "msg": "Worker exceeded 95% memory budget. Restarting..."})]
    console = logging.StreamHandler(io.StringIO())
    console.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logging.getLogger().addHandler(console)
    shown = {}
    try:
        for verbose in (False, True):
            console.stream = io.StringIO()
            with quiet_console(verbose):
                for record in records:
                    console.handle(record)
            shown[verbose] = console.stream.getvalue()
    finally:
        logging.getLogger().removeHandler(console)
    assert shown[False].splitlines() == ["ERROR failed with exception: KeyError('bug')",
                                         "ERROR Finished in state Failed(KeyError)",
                                         "WARNING Worker exceeded 95% memory budget. Restarting..."]
    assert shown[True].count("Traceback") == 3 and shown[True].count("Finished in state") == 3
    assert "Scheduler at" in shown[True]
    assert console.filters == [] and type(console.formatter) is logging.Formatter  # as they were


def test_a_log_file_keeps_every_record_and_traceback(tmp_path):
    """A FileHandler is a StreamHandler too: a user's Prefect log file lost a bug's traceback and the
    records of failed runs, which only the console is spared."""
    path = tmp_path / "prefect.log"
    log_file = logging.FileHandler(path)
    logging.getLogger().addHandler(log_file)
    try:
        with quiet_console(verbose=False), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Prefect's API handler: "without a flow run id", nothing to test here
            try:
                raise DataError("bad.csv: wrong")
            except DataError:
                logging.getLogger("prefect.task_runs").error("failed", exc_info=True, extra={"task_run_id": "t1"})
    finally:
        logging.getLogger().removeHandler(log_file)
        log_file.close()
    assert "failed" in path.read_text() and "Traceback" in path.read_text()
