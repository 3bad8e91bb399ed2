"""Scale-out: the scoring flow on a real Dask LocalCluster with 2 worker processes."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.score import score_flow
from pipeline.batch_score import score_files
from pipeline.bundle import Bundle
from pipeline.config import ScoreJob
from pipeline.errors import DataError
from pipeline.preprocess import CategoricalStats
from pipeline.runtime import gpu_present
from pipeline.scoring import score
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table
from tests import test_image_flows
from tests.conftest import disk_full_when_writing
from tests.test_image_flows import files_under, flagged_folder, unreadable_folder

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]

# The image bundle of the flow tests, trained once for this module too.
image_folder, flow_facts = test_image_flows.image_folder, test_image_flows.flow_facts


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
    """The Dask run's summary file and printed summary have the plain run's fields and values
    (AUROC over every labelled row of every input, device), timings aside."""
    from pipeline.cli import main

    inputs = [write_table(make_sensor_table(SyntheticSpec(n_rows=500, seed=70 + i)), tmp_path / f"in{i}.parquet")
              for i in range(2)]
    printed, summaries = {}, {}
    for runner in ("local", "dask"):
        out = tmp_path / runner / "scores.parquet"
        code = main(["score", str(trained_bundle), *map(str, inputs), "--output", str(out), "--device", "cpu",
                     "--task-runner", runner])
        printed[runner] = capsys.readouterr().out.replace(str(tmp_path / runner), "OUT")
        assert code == 0, printed[runner]
        summaries[runner] = json.loads((tmp_path / runner / "scores.summary.json").read_text())
    scored = pd.read_parquet(tmp_path / "dask" / "scores.parquet")
    assert len(scored) == 1000 and scored["source"].nunique() == 2

    plain, dask = summaries["local"], summaries["dask"]
    assert list(dask) == list(plain)
    apart = {"seconds", "rows_per_second", "output", "files"}  # timings, the two outputs, and below
    assert {k: v for k, v in dask.items() if k not in apart} == {k: v for k, v in plain.items() if k not in apart}
    assert plain["auroc"] > 0.9 and plain["device"] == "cpu"
    for ours, theirs in zip(dask["files"], plain["files"], strict=True):
        assert list(ours) == list(theirs)  # each file's fields, rate, target, skipped and AUROC included
        assert {k: v for k, v in ours.items() if k != "rows_per_second"} == \
            {k: v for k, v in theirs.items() if k != "rows_per_second"}
    # Every line alike but the speed: the Dask run's is its wall time across workers.
    assert printed["dask"].splitlines()[:-1] == printed["local"].splitlines()[:-1]
    assert printed["dask"].splitlines()[-1].startswith("device:  cpu; ")


def test_dask_run_adds_up_unseen_categories_and_warns_once(trained_bundle, tmp_path, capsys):
    """Each task counts its file's values the bundle never saw; the run's summary carries them
    summed, as a plain run's does, and each column warns once for the run, not once per file."""
    from flows.score import combine_summaries
    from pipeline.cli import main

    frames = [make_sensor_table(SyntheticSpec(n_rows=300, seed=80 + i)) for i in range(2)]
    frames[1]["line"] = frames[1]["line"].str.lower()  # one export spells the line differently
    inputs = [write_table(frame, tmp_path / f"in{i}.parquet") for i, frame in enumerate(frames)]
    summaries, warned, per_file, entries = {}, {}, {}, {}
    for runner in ("local", "dask"):
        out = tmp_path / runner / "scores.parquet"
        assert main(["score", str(trained_bundle), *map(str, inputs), "--output", str(out), "--device", "cpu",
                     "--task-runner", runner]) == 0
        printed = capsys.readouterr()
        warned[runner] = [line for line in printed.err.splitlines() if "never saw" in line]
        assert "values the bundle never saw in 'line' (" in printed.out
        written = json.loads((out.parent / "scores.summary.json").read_text())
        summaries[runner] = written["unseen_categories"]
        per_file[runner] = [f["unseen_categories"]["line"] for f in written["files"]]
        entries[runner] = [{k: v for k, v in f.items() if k != "rows_per_second"} for f in written["files"]]
    assert summaries["dask"] == summaries["local"] and per_file["dask"] == per_file["local"]
    # Each file's entry: the same fields, in the same order, with the same values but the speed (the
    # plain run's entries lacked the rate, target, skipped, AUROC and speed the flow's have).
    assert [list(e) for e in entries["local"]] == [list(e) for e in entries["dask"]]
    assert [{**e, "input": Path(e["input"]).name} for e in entries["local"]] == \
        [{**e, "input": Path(e["input"]).name} for e in entries["dask"]]
    assert all(e["auroc"] is not None and e["target_fpr"] == 0.01 for e in entries["local"])
    # Each file's own counts, and the line names the file spelled differently, not the other.
    assert [f["rows"] for f in per_file["dask"]] == [300, 300] and per_file["dask"][1]["unseen"] >= 300 - 10
    assert per_file["dask"][0]["unseen"] + per_file["dask"][1]["unseen"] == summaries["dask"]["line"]["unseen"]
    assert f" in {inputs[1]} ({per_file['dask'][1]['unseen']} of 300 rows); it knows " in warned["dask"][0]
    assert str(inputs[0]) not in warned["dask"][0]
    assert warned["dask"] == warned["local"] and len(warned["dask"]) == 1
    line = summaries["dask"]["line"]
    assert line["rows"] == 600 and line["unseen"] >= 300 and line["warning"] == warned["dask"][0][len("warning: "):]
    assert warned["dask"][0].startswith(f"warning: column 'line': {line['unseen']} of 600 rows (")
    # Counts per file add up: rows, unseen rows and the examples' counts.
    bundle = {"target_fpr": 0.01, "expected_fpr": 0.01, "fpr_range": "r",
              "categorical": (CategoricalStats("line", ("A", "B", "C"), unknown_share=0.0),), "numeric": (),
              "numeric_missing": {}}
    files = [{"rows": 300, "anomalies": 0, "anomaly_rate": 0.0, "skipped": 0, "auroc": None, "rows_per_second": 1,
              "device": "cpu", "unseen_categories": {"line": {"rows": 300, "unseen": unseen, "examples": examples}},
              "missing_numeric": {}}
             for unseen, examples in ((4, {"D": 4}), (300, {"a": 150, "b": 100, "D": 50}))]
    job = ScoreJob(trained_bundle, tuple(inputs), tmp_path / "merged.parquet")
    merged = combine_summaries(job, bundle, files, 1.0, (None, None))["unseen_categories"]["line"]
    assert (merged["rows"], merged["unseen"], merged["examples"]) == (600, 304, {"a": 150, "b": 100, "D": 54})
    assert merged["share"] == 304 / 600 and merged["warning"].startswith("column 'line': 304 of 600 rows (51%)")
    # Each file above the limit (1% here) named, highest share first.
    assert f"(e.g. 'a', 'b', 'D') in {inputs[1]} (300 of 300 rows), {inputs[0]} (4 of 300); it knows" in merged["warning"]
    table = combine_summaries(job, bundle, files, 1.0, (None, None))["files"]
    assert [f["unseen_categories"] for f in table] == [{"line": {"rows": 300, "unseen": 4, "share": 4 / 300}},
                                                      {"line": {"rows": 300, "unseen": 300, "share": 1.0}}]


@pytest.mark.skipif(gpu_present(), reason="checks the warning of a machine without a GPU")
def test_cli_dask_run_warns_once_each_as_the_plain_run_does(trained_bundle, tmp_path, capfd, monkeypatch):
    """Each worker's first task said "CUDA is not active" on the worker's console (once per worker,
    in Prefect's format; on a machine without a GPU it is no longer a warning at all), and named a
    file with extra columns by the absolute path the task was handed. The flow now logs the tasks'
    warnings: once each, the plain run's lines."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    frames = [make_sensor_table(SyntheticSpec(n_rows=200, seed=110 + i)) for i in range(4)]
    frames[2]["note"] = "x"  # a column the bundle does not use
    inputs = [write_table(frame, tmp_path / f"in{i}.csv").name for i, frame in enumerate(frames)]
    warned = {}
    for runner in ("local", "dask"):
        assert main(["score", str(trained_bundle), *inputs, "--output", f"{runner}/scores.parquet",
                     "--task-runner", runner]) == 0
        err = capfd.readouterr().err  # the workers' console as well
        warned[runner] = [line for line in err.splitlines() if "CUDA is not active" in line or "not use" in line]
    assert warned["local"] == ["warning: in2.csv: ignoring 1 column(s) the bundle does not use: 'note'"]
    assert warned["dask"] == warned["local"]


def test_cli_dask_file_failing_mid_run_is_not_reported_by_its_worker(trained_bundle, tmp_path, capfd, monkeypatch):
    """A bad value that only the file's task finds: the worker logged the task's failure twice on
    the user's terminal, the first time with its traceback, and the flow's records repeated it, above
    the CLI's one line, which is now all there is. The file's warnings, which its worker logged in
    Prefect's format with the absolute path, come back with the error: said once, before it, as the
    plain run says them."""
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    write_table(make_sensor_table(SyntheticSpec(n_rows=200, seed=120)), tmp_path / "in0.csv")
    bad = make_sensor_table(SyntheticSpec(n_rows=200, seed=121))
    bad["pressure"] = bad["pressure"].astype(object)
    bad.loc[150, "pressure"] = "abc"
    bad["note"] = "x"  # a column the bundle does not use
    bad.to_csv("bad.csv", index=False)

    said = {}
    for runner in ("local", "dask"):
        code = main(["score", str(trained_bundle), "in0.csv", "bad.csv", "--output", f"{runner}/scores.parquet",
                     "--device", "cpu", "--task-runner", runner])
        err = capfd.readouterr().err.splitlines()  # the workers' console as well
        assert code == 1
        said[runner] = [line for line in err if "bad.csv" in line]
    assert err[-1].startswith("error: bad.csv: column 'pressure' must be numeric but row 151 (line 152) holds 'abc'")
    assert not any(line.startswith("Traceback") for line in err), "\n".join(err)
    assert [line for line in err if "must be numeric" in line] == [err[-1]]
    assert said["dask"] == said["local"] == ["warning: bad.csv: ignoring 1 column(s) the bundle does not use: 'note'",
                                             err[-1]]
    assert not (tmp_path / "dask").exists()


def test_local_workers_are_quieted_only_without_verbose():
    """Each local worker runs dask_setup (pipeline.console.quiet_console), since its console is the user's."""
    from flows.dask_runner import dask_task_runner

    assert dask_task_runner(None).cluster_kwargs["preload"] == ["flows.dask_runner"]
    assert "preload" not in dask_task_runner(None, verbose=True).cluster_kwargs


def test_a_local_cluster_takes_a_free_port_without_warning_that_8787_is_taken():
    """With its dashboard off, the local cluster's scheduler still served HTTP on port 8787: a second
    `vaeguard score --task-runner dask` at once (or anything else on that port) printed distributed's
    "UserWarning: Port 8787 is already in use. Perhaps you already have a cluster running?"."""
    import socket
    import warnings

    from flows.dask_runner import dask_task_runner

    runner = dask_task_runner(None)
    with socket.socket() as taken:
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            taken.bind(("127.0.0.1", 8787))
            taken.listen()
        except OSError:  # taken already, by another cluster: as good for this test
            pass
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Its scheduler alone: the workers serve no HTTP (and take seconds to start).
            with runner.cluster_class(**{**runner.cluster_kwargs, "n_workers": 0}) as cluster:
                host, port = cluster.scheduler.http_server.address, cluster.scheduler.http_server.port
    assert [str(w.message) for w in caught if "already in use" in str(w.message)] == []
    assert host == "127.0.0.1" and port != 8787


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
    assert [f["input"] for f in summary["files"]] == ["a.csv", "b.parquet"] and summary["rows"] == 800
    assert list(elsewhere.iterdir()) == []


def cli_environment(tmp_path: Path, marker: str) -> dict:
    """A `vaeguard` process as a user starts it: no PREFECT_API_URL, its own Prefect home, and a
    marker every process it starts inherits, so that survivors can be found after it exits. It
    imports this checkout's code (the one under test), not the one the virtualenv was built from."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    code = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH")]))
    return env | {"PREFECT_HOME": str(tmp_path / "prefect"), "DO_NOT_TRACK": "1", "PYTHONPATH": code,
                  "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "VAEGUARD_TEST_RUN": marker}


def processes_with(marker: str) -> list[str]:
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if f"VAEGUARD_TEST_RUN={marker}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found.append(proc.name + ": " + (proc / "cmdline").read_bytes().replace(b"\0", b" ")[:200].decode())
        except OSError:  # not a process, or one that ended meanwhile
            pass
    return found


def test_cli_dask_run_starts_no_prefect_server_per_worker(trained_bundle, tmp_path):
    """Without PREFECT_API_URL the flow and both workers report to one temporary server that
    vaeguard starts and stops; Prefect starts none of its own (about 10 s in each process)."""
    inputs = [write_table(make_sensor_table(SyntheticSpec(n_rows=300, seed=75 + i)), tmp_path / f"in{i}.parquet")
              for i in range(2)]
    marker = uuid.uuid4().hex
    done = subprocess.run([str(Path(sys.executable).parent / "vaeguard"), "score", str(trained_bundle),
                           *map(str, inputs), "--output", str(tmp_path / "scores.parquet"), "--device", "cpu",
                           "--task-runner", "dask"], env=cli_environment(tmp_path, marker), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "600 rows" in done.stdout
    assert "Starting temporary server" not in done.stderr  # what Prefect logs for each server it starts
    assert "Task run 'score_file-" in done.stderr  # the tasks did report
    assert processes_with(marker) == []


def start_slow_dask_run(bundle: Path, tmp_path: Path, rows: int, seed: int, files: int,
                        options: tuple[str, ...] = ()) -> tuple[subprocess.Popen, Path, str]:
    """`vaeguard score --task-runner dask` on ``files`` inputs in tiny batches, in a session of its own,
    over an earlier output and summary; its process, the output folder and the marker its environment
    carries. A process started in the background inherits SIGINT ignored: a terminal's Ctrl-C reaches
    a default handler, so it gets one."""
    inputs = [write_table(make_sensor_table(SyntheticSpec(n_rows=rows, seed=seed + i)), tmp_path / f"in{i}.csv")
              for i in range(files)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.parquet").write_bytes(b"earlier scores")
    (out / "scores.summary.json").write_text("earlier summary")
    marker = uuid.uuid4().hex
    proc = subprocess.Popen([str(Path(sys.executable).parent / "vaeguard"), "score", str(bundle),
                             *map(str, inputs), "--output", str(out / "scores.parquet"), "--device", "cpu",
                             "--batch-size", "2", "--task-runner", "dask", *options],
                            env=cli_environment(tmp_path, marker), cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return proc, out, marker


@pytest.mark.parametrize("signame, to_group, status, message", [
    ("SIGINT", True, 130, "error: interrupted; no output was written"),  # Ctrl-C in a terminal: the whole group
    ("SIGTERM", False, 143, "error: terminated (SIGTERM); no output was written"),  # kill, a scheduler
    ("SIGTERM", True, 143, "error: terminated (SIGTERM); no output was written"),  # `timeout`: the whole group
])
def test_cli_dask_run_stopped_by_a_signal_leaves_nothing_behind(trained_bundle, tmp_path, signame, to_group, status,
                                                               message):
    """Stopped mid-run, the real CLI ends within seconds with its one line, not after the files
    being scored; the earlier output and summary stay as they were, no parts folder remains, and
    no process it started (workers, the Prefect server) lives on. Signalled as a group, it used to
    hang: the workers and the servers died of the signal too."""
    # Tiny batches: each file takes over 30 s, so the signal lands while tasks run.
    proc, out, marker = start_slow_dask_run(trained_bundle, tmp_path, rows=60_000, seed=100, files=4)
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob(".scores.parquet.parts-*/.*.tmp-*")):  # a task is writing its part
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        sent = time.monotonic()
        (os.killpg if to_group else os.kill)(proc.pid, getattr(signal, signame))
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    # Stopping takes 2.5-6 s here; finishing the running files instead took 48 s (SIGTERM to the
    # process) or hung (to the group). 35 s leaves room for 2 busy CI cores and still tells them apart.
    assert time.monotonic() - sent < 35, "waited for the running files instead of stopping them"
    assert proc.returncode == status, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [message]
    assert "Traceback" not in stderr, stderr
    assert stdout == ""
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "scores.summary.json"]
    assert (out / "scores.parquet").read_bytes() == b"earlier scores"
    assert (out / "scores.summary.json").read_text() == "earlier summary"
    deadline = time.monotonic() + 10
    while processes_with(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with(marker) == []


@pytest.mark.parametrize("signame, when", [
    ("SIGINT", "as the merged scores are made"),
    ("SIGINT", "as the scores are renamed into place"),
    ("SIGTERM", "as the scores are renamed into place"),
    ("SIGINT", "as the report is written"),
    ("SIGTERM", "as the report is written"),
    ("SIGINT", "as the cluster stops after the flow"),
    ("SIGTERM", "as the cluster stops after the flow"),
])
def test_cli_dask_run_signalled_at_its_end_leaves_the_output_whole_or_untouched(trained_bundle, tmp_path, capsys,
                                                                               monkeypatch, signame, when):
    """A signal after the merge had put the scores in place, but before their summary was written,
    left the new scores with the earlier run's summary, and the CLI said "no output was written".
    Now the commit (scores, errors file, summary renamed into place) holds the signal, as the plain
    run's does, and the CLI says the output was kept; so it does for a signal while the report is
    written after it (inside the flow, SIGTERM is Prefect's TerminationSignal), which it said was
    not, and for one while the cluster and the Prefect server stop after the flow (seconds). A
    signal while the parts are still being merged (every row read and written again, so not
    held) leaves the earlier output and summary as they were."""
    import flows.score
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    inputs = [write_table(make_sensor_table(SyntheticSpec(n_rows=300, seed=160 + i)), tmp_path / f"in{i}.parquet").name
              for i in range(2)]
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.parquet").write_bytes(b"earlier scores")
    (out / "scores.summary.json").write_text("earlier summary")
    (out / "scores.report.html").write_text("earlier report")  # it names scores.parquet: it goes with them
    (out / "scores.report_files").mkdir()
    (out / "scores.report_files" / "scores_against_calibration.png").write_bytes(b"earlier figure")
    signum = getattr(signal, signame)
    if when == "as the merged scores are made":
        real_merge = flows.score.merge_scored_parts

        def merged_then_signalled(*args):
            rows = real_merge(*args)
            os.kill(os.getpid(), signum)
            return rows

        monkeypatch.setattr(flows.score, "merge_scored_parts", merged_then_signalled)
    elif when == "as the scores are renamed into place":
        real_replace = os.replace

        def signalled_on_the_way(source, target):
            if Path(target).name == "scores.parquet":
                os.kill(os.getpid(), signum)
            return real_replace(source, target)

        monkeypatch.setattr(os, "replace", signalled_on_the_way)
    elif when == "as the report is written":
        def signalled_in_the_report(job):
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal did not stop the report")

        monkeypatch.setattr(flows.score, "write_scoring_report", signalled_in_the_report)
    else:
        real_flow = flows.score.score_flow

        class SignalledAfterTheFlow:  # as the flow ends: its cluster and the temporary Prefect server stop
            def with_options(self, **options):
                def run(job):
                    summary = real_flow.with_options(**options)(job)
                    os.kill(os.getpid(), signum)
                    return summary
                return run

        monkeypatch.setattr(flows.score, "score_flow", SignalledAfterTheFlow())
    code = main(["score", str(trained_bundle), *inputs, "--output", "out/scores.parquet", "--device", "cpu",
                 "--task-runner", "dask", *(["--report"] if when == "as the report is written" else [])])
    err = capsys.readouterr().err
    how = "terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted"
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 128 + signum, err
    if when == "as the merged scores are made":
        assert errors == [f"error: {how}; no output was written"]
        assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "scores.report.html", "scores.report_files",
                                                        "scores.summary.json"]  # no parts or temp files
        assert (out / "scores.report.html").read_text() == "earlier report"
        assert (out / "scores.parquet").read_bytes() == b"earlier scores"
        assert (out / "scores.summary.json").read_text() == "earlier summary"
    else:
        assert errors == [f"error: {how} after the output was written whole, which was kept; the steps after it "
                          f"(such as --report) did not run"]
        # No parts or temp files, and no report: the earlier one went with the earlier scores.
        assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "scores.summary.json"]
        summary = json.loads((out / "scores.summary.json").read_text())
        assert summary["rows"] == len(pd.read_parquet(out / "scores.parquet")) == 600


@pytest.fixture
def summary_write_fails(monkeypatch):
    """The disk fills up as the run's summary (``scores.summary.json``; not a part's) is written."""
    disk_full_when_writing(monkeypatch, "scores.summary.json")


def test_a_flow_whose_summary_cannot_be_written_leaves_the_earlier_output(trained_bundle, tmp_path,
                                                                         summary_write_fails):
    """The merged scores were renamed into place before their summary was written: a full disk
    then left them beside the earlier run's summary. (The flow's own task runner: the commit is the
    same whatever scored the parts, and a Dask cluster takes seconds to start.)"""
    inputs = tuple(write_table(make_sensor_table(SyntheticSpec(n_rows=200, seed=170 + i)), tmp_path / f"in{i}.csv")
                   for i in range(2))
    out = tmp_path / "out"
    out.mkdir()
    (out / "scores.parquet").write_bytes(b"earlier scores")
    (out / "scores.summary.json").write_text("earlier summary")
    with pytest.raises(OSError, match="No space left"):
        score_flow(ScoreJob(trained_bundle, inputs, out / "scores.parquet", device="cpu"))
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "scores.summary.json"]  # no parts, no temp
    assert (out / "scores.parquet").read_bytes() == b"earlier scores"
    assert (out / "scores.summary.json").read_text() == "earlier summary"


def test_a_table_flow_leaves_a_file_named_as_the_errors_file_alone(trained_bundle, tmp_path):
    """Only an image run owns OUT.errors.csv (its unreadable images). The flow deleted that name for
    tables too, which the plain run does not: even when it was one of the tables being scored,
    since only image runs check that it is not an input."""
    inputs = tuple(write_table(make_sensor_table(SyntheticSpec(n_rows=200, seed=175 + i)), tmp_path / name)
                   for i, name in enumerate(["in.csv", "scores.errors.csv"]))
    kept = inputs[1].read_bytes()
    summary = score_flow(ScoreJob(trained_bundle, inputs, tmp_path / "scores.parquet", device="cpu"))
    assert summary["rows"] == 400 and "errors_file" not in summary
    assert inputs[1].read_bytes() == kept
    score_files(ScoreJob(trained_bundle, inputs, tmp_path / "scores.parquet", device="cpu"))  # as the plain run
    assert inputs[1].read_bytes() == kept


@pytest.fixture(scope="module")
def named_cluster():
    """A cluster of one single-threaded worker, as a user runs one for --dask-address: apart from the
    `vaeguard` process, whose signals don't reach it."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with Client(cluster) as client:
            yield client


@pytest.mark.parametrize("signame, status, message", [
    ("SIGINT", 130, "error: interrupted; no output was written"),  # Ctrl-C in a terminal
    ("SIGTERM", 143, "error: terminated (SIGTERM); no output was written"),  # `timeout`
])
def test_cli_run_on_a_named_cluster_stopped_by_a_signal_cancels_its_tasks(trained_bundle, tmp_path, named_cluster,
                                                                          signame, status, message):
    """Ctrl-C (or `timeout`) to `vaeguard score --dask-address`: the run ends with its one line and
    status, keeps the earlier output, cancels its tasks on the cluster, and no part appears when the
    task running there ends later; the cluster scores the next run. The signal used to stop the
    temporary Prefect server Prefect had started in vaeguard's group: the run waited for the
    running files, then for a minute of retries, and ended with `unexpected ConnectError`."""
    from prefect_dask import DaskTaskRunner

    client = named_cluster
    # Tiny batches: each file takes seconds, so the signal lands while the first is scored and the
    # second waits on the cluster's one worker.
    proc, out, marker = start_slow_dask_run(trained_bundle, tmp_path, rows=20_000, seed=140, files=2,
                                            options=("--dask-address", client.scheduler.address))
    try:
        deadline = time.monotonic() + 240
        while not list(out.glob(".scores.parquet.parts-*/.*.tmp-*")):  # the task is writing its part
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        os.killpg(proc.pid, getattr(signal, signame))  # the whole group, as a terminal and `timeout` do
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == status, stderr
    assert [line for line in stderr.splitlines() if line.startswith("error:")] == [message]
    assert "Traceback" not in stderr and stdout == "", stderr
    assert client.run_on_scheduler(lambda dask_scheduler: list(dask_scheduler.tasks)) == []  # cancelled

    deadline = time.monotonic() + 120
    while any(client.run(busy_threads).values()):  # Dask can't stop a running task: it scores on, then drops its part
        assert time.monotonic() < deadline, "the cancelled task still runs"
        time.sleep(0.2)
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "scores.summary.json"]
    assert (out / "scores.parquet").read_bytes() == b"earlier scores"
    assert (out / "scores.summary.json").read_text() == "earlier summary"
    assert processes_with(marker) == []

    job = ScoreJob(trained_bundle, (tmp_path / "in0.csv",), out / "next.parquet", device="cpu", batch_size=4096)
    summary = score_flow.with_options(task_runner=DaskTaskRunner(address=client.scheduler.address))(job)
    assert summary["rows"] == 20_000


@pytest.mark.parametrize("stopped", ["before its first rows", "after its scores"])
def test_a_task_that_ends_after_its_run_stopped_leaves_nothing(trained_bundle, tmp_path, monkeypatch, stopped):
    """A run stopped on a cluster named by --dask-address removes its parts folder without waiting
    for the tasks running there. One whose writer had not started made the folder again and left its
    part in it; one that had scored failed writing its labels, an error for no one."""
    import flows.score
    from flows.score import RUNNING, score_file

    source = write_table(make_sensor_table(SyntheticSpec(n_rows=300, seed=150)), tmp_path / "in.csv")
    parts = tmp_path / ".scores.parquet.parts-1234abcd"
    parts.mkdir()
    (parts / RUNNING).touch()
    real = flows.score.score_files

    def stopped_meanwhile(job, **kwargs):
        if stopped == "before its first rows":
            shutil.rmtree(parts)
        summary = real(job, **kwargs)
        if stopped == "after its scores":
            shutil.rmtree(parts)
        return summary

    monkeypatch.setattr(flows.score, "score_files", stopped_meanwhile)
    job = ScoreJob(trained_bundle, (source,), tmp_path / "scores.parquet", device="cpu")
    assert score_file.fn(job, source, parts / "00000.parquet", label_column="label") is None
    assert list(tmp_path.iterdir()) == [source]


def test_the_flow_reads_labels_as_single_process_scoring_does(trained_bundle, tmp_path):
    """A label spelled true/false, with a blank: the flow's per-input labels (for the run's AUROC)
    were read as numbers and failed where `vaeguard score` without Dask reads them."""
    from flows.score import label_metrics, save_labels

    frame = make_sensor_table(SyntheticSpec(n_rows=600, seed=31))
    spelled = frame.assign(label=frame["label"].astype(bool).astype(object))
    spelled.loc[spelled.index[3], "label"] = None
    source = write_table(spelled, tmp_path / "in.csv")
    part = tmp_path / "part.parquet"
    plain = score_files(ScoreJob(trained_bundle, (source,), part, device="cpu"))
    save_labels(source, "label", part, batch_size=100)
    assert label_metrics([part]) == (plain.auroc, plain.auprc) and plain.auroc is not None


def test_a_second_ctrl_c_while_the_temporary_server_stops_still_stops_it(tmp_path, monkeypatch):
    """Ctrl-C pressed again while vaeguard waits for its Prefect server to stop (a busy machine, or
    `vaeguard` in Jupyter): the server used to live on, its pipe to vaeguard left open."""
    from flows import dask_runner

    ready = tmp_path / "ignoring SIGTERM"
    # A stand-in for the server that, as the real one does, stops when vaeguard's end of its pipe
    # closes, and that ignores SIGTERM as a server slow to shut down seems to.
    monkeypatch.setattr(dask_runner, "_SERVE", "import os, pathlib, signal, sys\n"
                                               "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                                               f"pathlib.Path({str(ready)!r}).touch()\n"
                                               "os.read(int(sys.argv[2]), 1)\n")

    def wait_until_ready(server, url, timeout, log):
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert server.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)

    monkeypatch.setattr(dask_runner, "_wait_until_serving", wait_until_ready)
    servers, real_wait = [], subprocess.Popen.wait

    def interrupted_wait(self, timeout=None):
        if not servers:
            servers.append(self)
            raise KeyboardInterrupt  # the second Ctrl-C
        return real_wait(self, timeout)

    monkeypatch.setattr(subprocess.Popen, "wait", interrupted_wait)
    with pytest.raises(KeyboardInterrupt):
        with dask_runner.temporary_prefect_server():
            pass
    try:
        assert real_wait(servers[0], timeout=60) == 0
    finally:
        if servers[0].poll() is None:
            servers[0].kill()
            real_wait(servers[0])


@pytest.mark.parametrize("fault", ["missing column", "header twice"])
def test_cli_dask_refuses_a_bad_header_before_any_task(trained_bundle, tmp_path, capsys, monkeypatch, fault):
    """One of many inputs without a column the bundle needs, or with a header the reader refuses:
    the Dask run used to find it only when that file's task ran, after the others were scored.
    Now it fails as the plain run does, with the same line, before a task is submitted, and
    leaves the earlier output alone. Of two inputs lacking columns, the first given is named,
    its missing columns in the bundle's order (ids, numeric, categorical), not the file's."""
    import flows.score
    from pipeline.cli import main

    monkeypatch.chdir(tmp_path)
    good = [write_table(make_sensor_table(SyntheticSpec(n_rows=300, seed=40 + i)), tmp_path / f"in{i}.csv").name
            for i in range(2)]
    bad = make_sensor_table(SyntheticSpec(n_rows=300, seed=42))
    if fault == "missing column":
        bad = bad[["line", "shift", "row_id", "humidity", "temperature", "flow_rate", "vibration", "rpm"]]
        bad.drop(columns=["temperature"]).to_csv("worse.csv", index=False)  # a second, given after it
    else:
        bad = bad.rename(columns={"humidity": "pressure"})
    bad.to_csv("bad.csv", index=False)
    inputs = [*good, "bad.csv", *(["worse.csv"] if fault == "missing column" else [])]
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "scores.parquet").write_bytes(b"earlier scores")
    submitted, submit = [], flows.score.score_file.submit

    def recorded(*args, **kwargs):
        submitted.append(args[1])
        return submit(*args, **kwargs)

    monkeypatch.setattr(flows.score.score_file, "submit", recorded)

    errors = {}
    for runner in ("local", "dask"):
        code = main(["score", str(trained_bundle), *inputs, "--output", "out/scores.parquet",
                     "--device", "cpu", "--task-runner", runner])
        assert code == 1
        errors[runner] = capsys.readouterr().err.strip().splitlines()[-1]

    assert submitted == []
    assert errors["dask"] == errors["local"]
    assert errors["dask"].startswith("error: bad.csv: " + ("missing column(s) ['pressure', 'power_kw', 'torque'] "
                                                           if fault == "missing column"
                                                           else "column 'pressure' appears twice in the header"))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scores.parquet"]  # no parts folder
    assert (tmp_path / "out" / "scores.parquet").read_bytes() == b"earlier scores"


def test_dask_run_failing_on_a_later_input_leaves_the_maps_folder_as_it_was(flow_facts, image_folder, tmp_path):
    """Each task moved its input's maps in as it ended: a run that failed on its second input kept the
    first input's maps, and replaced an earlier run's map of the same image."""
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    first = flagged_folder(image_folder, tmp_path / "monday")
    maps = tmp_path / "maps"
    score(ScoreJob(Path(flow_facts["bundle"]), (first,), tmp_path / "earlier.parquet", device="cpu", maps_dir=maps))
    earlier = sorted(maps.iterdir())[0]
    earlier.write_bytes(b"an earlier run's map of this image")  # which this run's would replace
    (maps / "other.png").write_bytes(b"a map of another image")
    before = files_under(maps)
    job = ScoreJob(Path(flow_facts["bundle"]), (first, unreadable_folder(tmp_path / "tuesday")),
                   tmp_path / "out" / "scores.parquet", device="cpu", maps_dir=maps)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        with pytest.raises(DataError, match="none of the 1 image file"):
            score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(job)
    assert files_under(maps) == before  # no new map, none replaced, no hidden folder
    assert not (tmp_path / "out").exists()


def test_dask_run_moves_in_the_maps_a_plain_run_does(flow_facts, image_folder, tmp_path):
    """The same names and bytes: two folders holding files of one name, and an image listed by two
    inputs (a folder and its subfolder), whose map the later input's replaces, as a plain run draws it again."""
    from distributed import LocalCluster
    from prefect_dask import DaskTaskRunner

    first = flagged_folder(image_folder, tmp_path / "monday")
    second = flagged_folder(image_folder, tmp_path / "tuesday")  # the same file names as monday's
    nested = flagged_folder(image_folder, second / "late", n=2)
    job = ScoreJob(Path(flow_facts["bundle"]), (first, second, nested), tmp_path / "plain.parquet", device="cpu",
                   maps_dir=tmp_path / "plain-maps")
    score(job)
    flowed = dataclasses.replace(job, output=tmp_path / "dask.parquet", maps_dir=tmp_path / "dask-maps")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        score_flow.with_options(task_runner=DaskTaskRunner(address=cluster.scheduler_address))(flowed)
    plain = files_under(job.maps_dir)
    assert any("__tuesday__late__noise_" in name for name in plain)  # a map two inputs drew
    assert files_under(flowed.maps_dir) == plain


def test_an_image_task_that_ends_after_its_run_stopped_leaves_no_maps(flow_facts, image_folder, tmp_path, monkeypatch):
    """A run stopped on a cluster named by --dask-address removes its maps' staging folder without
    waiting for the tasks running there: one that drew maps made it again, and must remove them."""
    import flows.score
    from flows.score import RUNNING, score_file

    source = flagged_folder(image_folder, tmp_path / "monday")
    parts = tmp_path / ".scores.parquet.parts-1234abcd"
    parts.mkdir()
    (parts / RUNNING).touch()
    maps = tmp_path / "maps"
    maps.mkdir()
    real = flows.score.score

    def stopped_meanwhile(job):
        summary = real(job)
        shutil.rmtree(parts)
        return summary

    monkeypatch.setattr(flows.score, "score", stopped_meanwhile)
    job = ScoreJob(Path(flow_facts["bundle"]), (source,), tmp_path / "scores.parquet", device="cpu",
                   maps_dir=maps / ".maps.tmp-1234abcd")  # the run's staging folder, as the flow hands it
    assert score_file.fn(job, source, parts / "00000.parquet", modality="image") is None
    assert list(maps.iterdir()) == []
