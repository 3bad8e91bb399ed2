"""What Prefect's and Dask's logs show on the user's console when the CLI runs a flow.

Without --verbose the CLI's one `error:` line is the report of a failed run. Prefect logs the same
failure with its traceback, twice, and then "Finished in state Failed(...)" with the message again;
Dask's scheduler and nannies add some 30 INFO lines a run. Only the console handlers change here:
the records, and their copies sent to the Prefect API, are kept whole.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

from pipeline.errors import PipelineError


class _WithoutTraceback(logging.Formatter):
    """Formats a record as ``inner`` does, leaving out its traceback."""

    def __init__(self, inner: logging.Formatter | None):
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        saved = record.exc_info, record.exc_text, record.stack_info
        record.exc_info = record.exc_text = record.stack_info = None
        try:
            return self.inner.format(record)
        finally:
            record.exc_info, record.exc_text, record.stack_info = saved


class PipelineErrorRuns(logging.Filter):
    """Leaves out Prefect's records of a task or flow run that failed with a PipelineError, which
    the CLI prints as its one `error:` line. A run failed by any other exception (a bug) keeps them.

    Prefect logs such a failure with the exception, then "Finished in state Failed(...)" with its
    message again: the first names the exception, and the run's id the second.
    """

    RUN_IDS = {"prefect.task_runs": "task_run_id", "prefect.flow_runs": "flow_run_id"}

    def __init__(self) -> None:
        super().__init__()
        self.failed: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = self.RUN_IDS.get(record.name)
        run = getattr(record, key, None) if key else None
        if run is None:
            return True
        if record.exc_info and isinstance(record.exc_info[1], PipelineError):
            self.failed.add(run)
        return run not in self.failed


def dask_info(record: logging.LogRecord) -> bool:
    """False for Dask's INFO and DEBUG records: some 30 lines a run from the scheduler and nannies
    in vaeguard's process, where the Dask task runner's ``silence_logs`` does not reach (Dask applies
    it to a console handler of its own, which it adds only where it is imported before Prefect sets
    up logging). Its warnings and errors stay: a nanny restarting a worker that ran out of memory is
    what explains a run that then fails."""
    return not ((record.name == "distributed" or record.name.startswith("distributed."))
                and record.levelno < logging.WARNING)


def _console(handler: logging.Handler) -> bool:
    # A FileHandler is a StreamHandler too: a log file the user set up keeps every record and traceback.
    return isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)


@contextlib.contextmanager
def quiet_console(verbose: bool) -> Iterator[None]:
    """The root logger's console handlers without tracebacks, without the records of a run that
    failed with a PipelineError, and without Dask's INFO lines; unchanged with ``verbose``."""
    handlers = [] if verbose else [h for h in logging.getLogger().handlers
                                   if _console(h) and not isinstance(h.formatter, _WithoutTraceback)]
    saved = [h.formatter for h in handlers]
    quiet = (PipelineErrorRuns(), dask_info)
    for handler in handlers:
        handler.setFormatter(_WithoutTraceback(handler.formatter))
        for f in quiet:
            handler.addFilter(f)
    try:
        yield
    finally:
        for handler, formatter in zip(handlers, saved):
            handler.setFormatter(formatter)
            for f in quiet:
                handler.removeFilter(f)
