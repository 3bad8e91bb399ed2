"""One exception root for everything the pipeline reports to a user.

Each subclass also inherits the built-in it resembles, so callers that already catch
``ValueError`` or ``FileNotFoundError`` keep working. Messages are one line and say what was
expected, what came, where (file, column, row) and how to fix it; the CLI prints them as they
are, without a traceback.
"""

from __future__ import annotations


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class DataError(PipelineError, ValueError):
    """The input table is unusable: wrong shape, wrong types, bad values."""


class EmptyInputError(DataError):
    """The inputs have their header (every column the bundle needs) but no data rows.

    Wrong for a command asked to score something, yet not bad data: a nightly export of a day
    with no events looks like this, so the landing flow records it instead of quarantining it.
    """


class InputFileError(PipelineError, FileNotFoundError):
    """An input path is missing, empty, or not a supported format."""


class ConfigError(PipelineError, ValueError):
    """A configuration value or file is invalid."""


class BundleError(PipelineError, ValueError):
    """An exported bundle is missing files, corrupted, or inconsistent with its manifest."""


class ExportError(PipelineError, RuntimeError):
    """The exported ONNX graphs do not match the PyTorch model within tolerance."""


class TrainingError(PipelineError, RuntimeError):
    """Training failed to produce a usable model (its loss diverged)."""


class DeviceError(PipelineError, RuntimeError):
    """The requested compute device is not really available."""


def one_line(error: BaseException) -> str:
    """An exception's message on one line (libraries' messages often span several), or its type's name."""
    return " ".join(str(error).split()) or type(error).__name__
