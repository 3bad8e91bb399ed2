"""Shared fixtures: tiny generated tables, a fast training config, one trained bundle per session."""

from __future__ import annotations

import dataclasses
import gzip
import logging
import os
import zipfile
from pathlib import Path

import pandas as pd
import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.config import PipelineConfig, TrainJob, TrainingConfig  # noqa: E402
from pipeline.preprocess import CategoricalStats, Preprocessor  # noqa: E402
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table  # noqa: E402
from pipeline.workflow import run_training  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def unknown_bucket_rows(stats: CategoricalStats, values):
    """Rows the bundle's one-hot (the reference scorer.onnx matches) puts in the unknown bucket."""
    return Preprocessor.one_hot(stats, values)[:, -1] == 1


def quiet_config(**training) -> PipelineConfig:
    """The defaults, on 2 threads and without a progress bar; keyword arguments override training."""
    base = TrainingConfig(max_epochs=200, patience=15, threads=2, progress=False)
    return PipelineConfig(training=dataclasses.replace(base, **training))


@pytest.fixture(scope="session")
def sensor_frame():
    return make_sensor_table(SyntheticSpec(n_rows=3000, seed=11))


@pytest.fixture(scope="session")
def sensor_csv(tmp_path_factory, sensor_frame) -> Path:
    return write_table(sensor_frame, tmp_path_factory.mktemp("data") / "sensors.csv")


@pytest.fixture(scope="session")
def incoming_csv(tmp_path_factory) -> Path:
    """A later batch from the same generator (different seed), labelled."""
    return write_table(make_sensor_table(SyntheticSpec(n_rows=2000, seed=12)),
                       tmp_path_factory.mktemp("incoming") / "incoming.csv")


@pytest.fixture(scope="session")
def trained_bundle(tmp_path_factory, sensor_csv) -> Path:
    """One bundle trained on the sensor table, shared read-only by every test that scores."""
    out = tmp_path_factory.mktemp("exported")
    job = TrainJob(data=sensor_csv, name="sensors", out_dir=out, label_column="label",
                   id_columns=("row_id",), config=quiet_config())
    return Path(run_training(job)["bundle"])


def run_main(capsys, *argv) -> tuple[int, str, str]:
    """The CLI run in this process as a user runs it: its status, stdout and stderr."""
    from pipeline.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def cli_logger_reset():
    """Undo what an in-process ``cli.main()`` does to the "vaeguard" logger, as a new process would.

    main() points the logger at the stderr of the moment; pytest closes that stream after the
    test, and a later warning would be written to it.
    """
    logger = logging.getLogger("vaeguard")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved[0], saved[1], saved[2]


def pytest_collection_modifyitems(config, items):
    from pipeline.runtime import gpu_present

    if gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU with onnxruntime's CUDA provider")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server (SQLite) for every flow test in the session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on a free localhost port, for schedules and deployments.

    Yields the environment a client process needs (PREFECT_API_URL set). The scheduler and the
    runner poll every 2 s instead of 60 s / 10 s so a short schedule fires within a test.
    """
    import subprocess
    import sys
    import time
    import urllib.request

    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "DO_NOT_TRACK": "1",
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_ENABLED": "false",
           "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2", "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(home / "server.log", "w")
    prefect = Path(sys.executable).parent / "prefect"
    server = subprocess.Popen([str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError(f"prefect server did not start; see {home / 'server.log'}")
        time.sleep(0.5)
    try:
        yield {**env, "PREFECT_API_URL": url}
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def disk_full_when_writing(monkeypatch, name: str) -> None:
    """The disk fills up as the file ``name`` is written under its hidden temporary name (a run's
    summary, e.g. "scores.summary.json"), and at no other write."""
    import errno

    real_write_text = Path.write_text

    def failing(path, text, *args, **kwargs):
        if path.name.startswith(f".{name}.tmp-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing)


# A small table's CSV text, and the same table as bytes that are not CSV in UTF-8: what a .csv
# that is really another format or encoding brings (tests/test_tables.py, tests/test_node_runtime.py).
TABLE_TEXT = "id,x,c\n" + "".join(f"{i:03d},{i / 7},c{i % 3}\n" for i in range(600))


def not_csv_text(kind: str, tmp_path) -> bytes:
    """A table as bytes that are not CSV in UTF-8: another format, or another encoding."""
    if kind == "parquet":
        pd.DataFrame({"id": ["001"], "x": [1.5]}).to_parquet(tmp_path / "t.parquet")
        return (tmp_path / "t.parquet").read_bytes()
    if kind == "xlsx":
        with zipfile.ZipFile(tmp_path / "t.xlsx", "w", zipfile.ZIP_DEFLATED) as book:
            book.writestr("xl/worksheets/sheet1.xml", "<sheetData/>" * 50)
        return (tmp_path / "t.xlsx").read_bytes()
    if kind == "gzip":
        return gzip.compress(TABLE_TEXT.encode())
    return TABLE_TEXT.encode(kind)


NOT_CSV_TEXT = {
    "parquet": r"is a Parquet file \(it starts with Parquet's PAR1 marker\), not CSV text; name it \.parquet$",
    "xlsx": r"is a zip archive, as an Excel \.xlsx workbook is, not CSV text; export the sheet as CSV UTF-8",
    "gzip": r"is gzip-compressed data, not CSV text; name it \.csv\.gz",
    "utf-16": r"is not UTF-8 text \(it looks UTF-16: it starts with a UTF-16 byte-order mark\); save it as CSV in UTF-8$",
    "utf-16-le": r"is not UTF-8 text \(it looks UTF-16: it has NUL bytes between its characters\); save it as",
    "utf-16-be": r"is not UTF-8 text \(it looks UTF-16: it has NUL bytes between its characters\); save it as",
    "utf-32": r"is not UTF-8 text \(it looks UTF-32: it starts with a UTF-32 byte-order mark\); save it as",
}
