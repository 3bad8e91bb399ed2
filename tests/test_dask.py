"""Scale-out: the scoring flow on a real Dask LocalCluster with 2 worker processes."""

from __future__ import annotations

import shutil
import time

import numpy as np
import pandas as pd
import pytest

from flows.score import score_flow
from pipeline.batch_score import score_files
from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.errors import DataError
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def sessions_in_process() -> int:
    from pipeline import runtime

    return len(runtime._SHARED)


def test_dask_output_equals_single_process_output(trained_bundle, tmp_path):
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    inputs = tuple(write_table(make_sensor_table(SyntheticSpec(n_rows=3000, seed=60 + i)), tmp_path / f"in{i}.csv")
                   for i in range(4))
    single = tmp_path / "single.parquet"
    score_files(ScoreJob(trained_bundle, inputs, single, device="cpu"))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        job = ScoreJob(trained_bundle, inputs, tmp_path / "dask.parquet", device="cpu")
        score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(job)
        with Client(cluster) as client:
            per_worker = client.run(sessions_in_process)

    expected, actual = pd.read_parquet(single), pd.read_parquet(tmp_path / "dask.parquet")
    assert list(actual.columns) == list(expected.columns)
    assert actual["source"].tolist() == expected["source"].tolist()
    np.testing.assert_array_equal(actual["score"].to_numpy(), expected["score"].to_numpy())
    # 4 files on 2 workers: some worker scored at least 2 files, and no worker built more than
    # one onnxruntime session, so sessions are reused across files.
    assert len(per_worker) == 2 and all(n <= 1 for n in per_worker.values()) and sum(per_worker.values()) >= 1


def test_cli_task_runner_dask_starts_a_local_cluster(trained_bundle, tmp_path, capsys):
    from pipeline.cli import main

    inputs = [write_table(make_sensor_table(SyntheticSpec(n_rows=500, seed=70 + i)), tmp_path / f"in{i}.parquet")
              for i in range(2)]
    out = tmp_path / "scores.parquet"
    code = main(["score", str(trained_bundle), *map(str, inputs), "--output", str(out), "--device", "cpu",
                 "--task-runner", "dask"])
    assert code == 0, capsys.readouterr().err
    scored = pd.read_parquet(out)
    assert len(scored) == 1000 and scored["source"].nunique() == 2
    assert "1,000 rows" in capsys.readouterr().out


def test_dask_flow_scores_with_the_chosen_precision(trained_bundle, tmp_path):
    """--precision reaches every Dask task: the files are scored by the int8 variant, not scorer.onnx."""
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    from pipeline.precision import export_variant

    bundle = shutil.copytree(trained_bundle, tmp_path / "sensors")
    export_variant(bundle, "int8", device="cpu", threads=1, repeats=1)
    inputs = tuple(write_table(make_sensor_table(SyntheticSpec(n_rows=500, seed=80 + i)), tmp_path / f"in{i}.parquet")
                   for i in range(2))
    scored = {}
    for precision in ("fp32", "int8"):
        scored[precision] = tmp_path / f"{precision}.parquet"
        score_files(ScoreJob(bundle, inputs, scored[precision], device="cpu", precision=precision))

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        job = ScoreJob(bundle, inputs, tmp_path / "dask.parquet", device="cpu", precision="int8")
        summary = score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(job)

    actual = pd.read_parquet(tmp_path / "dask.parquet")["score"].to_numpy()
    int8, fp32 = (pd.read_parquet(scored[p])["score"].to_numpy() for p in ("int8", "fp32"))
    np.testing.assert_allclose(actual, int8, rtol=1e-5)
    assert not np.allclose(actual, fp32, rtol=1e-3)
    assert summary["expected_fpr"] == Bundle.load(bundle).calibration_for("int8")["expected_fpr"]


def busy_threads(dask_worker) -> int:
    return len(dask_worker.active_threads)


def test_dask_failed_input_leaves_no_parts_and_keeps_the_old_output(trained_bundle, tmp_path, monkeypatch):
    """One bad input fails the run with its own error; tasks still running on other workers when it
    failed must not write their parts into a parts folder recreated after the flow removed it."""
    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    monkeypatch.chdir(tmp_path)
    bad = make_sensor_table(SyntheticSpec(n_rows=300, seed=90))
    bad["pressure"] = bad["pressure"].astype(object)
    bad.loc[290, "pressure"] = "abc"  # a late row: the file is partly scored before it fails
    bad.to_csv("bad.csv", index=False)
    good = [write_table(make_sensor_table(SyntheticSpec(n_rows=20_000, seed=91 + i)), tmp_path / f"in{i}.parquet")
            for i in range(6)]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.parquet").write_bytes(b"earlier scores")
    inputs = (good[0].name, "bad.csv", *(p.name for p in good[1:]))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        job = ScoreJob(trained_bundle, inputs, "out/scores.parquet", device="cpu")
        with pytest.raises(DataError) as failed:
            score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(job)
        with Client(cluster) as client:  # the cluster outlives the flow, as one named by --dask-address does
            deadline = time.monotonic() + 60
            while any(client.run(busy_threads).values()) and time.monotonic() < deadline:
                time.sleep(0.2)

    assert str(failed.value).startswith("bad.csv: column 'pressure' must be numeric but row 291 (line 292)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.parquet"]  # no parts folder
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == b"earlier scores"


def test_dask_workers_in_another_folder_read_relative_paths_from_the_callers_folder(trained_bundle, tmp_path,
                                                                                    monkeypatch):
    """--dask-address to workers started elsewhere: relative bundle, inputs and output still mean
    the caller's files, and the output equals single-process scoring's (source names as given)."""
    import os

    from distributed import Client, LocalCluster
    from prefect_dask import DaskTaskRunner

    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.copytree(trained_bundle, work / "bundle")
    monkeypatch.chdir(work)
    inputs = tuple(write_table(make_sensor_table(SyntheticSpec(n_rows=400, seed=95 + i)), work / name).name
                   for i, name in enumerate(["a.csv", "b.parquet"]))
    score_files(ScoreJob("bundle", inputs, "single.parquet", device="cpu"))

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            client.run(os.chdir, str(elsewhere))
            job = ScoreJob("bundle", inputs, "out/dask.parquet", device="cpu")
            summary = score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(job)

    expected, actual = pd.read_parquet(work / "single.parquet"), pd.read_parquet(work / "out" / "dask.parquet")
    pd.testing.assert_frame_equal(actual, expected)
    assert actual["source"].unique().tolist() == ["a.csv", "b.parquet"]
    assert [f["file"] for f in summary["files"]] == ["a.csv", "b.parquet"] and summary["rows"] == 800
    assert list(elsewhere.iterdir()) == []
