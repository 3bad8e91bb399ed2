"""Shared fixtures: tiny generated tables, a fast training config, one trained bundle per session."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

from pipeline.config import PipelineConfig, TrainJob, TrainingConfig  # noqa: E402
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table  # noqa: E402
from pipeline.workflow import run_training  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


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
