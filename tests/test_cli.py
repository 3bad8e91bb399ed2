"""The `vaeguard` command end to end: train -> score -> inspect, exit codes, stdout and stderr.

One full run goes through real processes (`python -m pipeline.cli` and the installed
`vaeguard` script), so the entry point, exit statuses and stderr are the real ones; the rest
calls ``pipeline.cli.main(argv)`` in-process and reads its output with capsys.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.runtime import gpu_present
from pipeline.synthetic import write_table
from tests.conftest import run_main

BUNDLE_FILES = ("encoder.onnx", "decoder.onnx", "scorer.onnx", "manifest.json", "report.html", "report_files",
                "calibration_rows.parquet")
SCORE_COLUMNS = ["row_id", "score", "recon", "kl", "p_value", "is_anomaly"]
FAST_YAML = "training:\n  max_epochs: 30\n  patience: 8\n  threads: 2\n  progress: false\n"


def run_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def vaeguard_process(*args, cwd: Path) -> subprocess.CompletedProcess:
    return run_process(sys.executable, "-m", "pipeline.cli", *args, cwd=cwd)


def read_scores(path: Path) -> pd.DataFrame:
    table = pq.read_table(path) if path.suffix == ".parquet" else pacsv.read_csv(path)
    return table.to_pandas()


def rank_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mann-Whitney AUROC, ties counted half (independent of pipeline.metrics)."""
    labels = np.asarray(labels).astype(bool)
    ranks = pd.Series(scores).rank(method="average").to_numpy()
    n_pos, n_neg = labels.sum(), (~labels).sum()
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def hidden_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def cli_trained(tmp_path_factory, sensor_csv) -> SimpleNamespace:
    """`vaeguard train` as a real process, into a fresh output folder."""
    work = tmp_path_factory.mktemp("cli")
    config = work / "fast.yaml"
    config.write_text(FAST_YAML)
    out = work / "exported"
    proc = vaeguard_process("train", sensor_csv, "--name", "sensors", "--label-column", "label",
                            "--id-columns", "row_id", "--config", config, "--out", out, cwd=work)
    return SimpleNamespace(proc=proc, work=work, out=out, bundle=out / "sensors")


# --- train / score / inspect as real processes --------------------------------------------


def test_train_writes_bundle_and_reports_auroc(cli_trained):
    proc = cli_trained.proc
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr
    assert sorted(p.name for p in cli_trained.bundle.iterdir()) == sorted(BUNDLE_FILES)
    assert "AUROC" in proc.stdout
    assert str(cli_trained.bundle) in proc.stdout
    # The run folder is cleaned up: only the bundle is left in the output folder.
    assert [p.name for p in cli_trained.out.iterdir()] == ["sensors"]


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_score_writes_one_row_per_input_row(cli_trained, incoming_csv, suffix):
    assert cli_trained.proc.returncode == 0, cli_trained.proc.stderr
    out_dir = cli_trained.work / f"scores{suffix.replace('.', '_')}"
    output = out_dir / f"scores{suffix}"
    proc = vaeguard_process("score", cli_trained.bundle, incoming_csv, "--output", output,
                            cwd=cli_trained.work)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "error:" not in proc.stderr

    incoming = pd.read_csv(incoming_csv)
    scores = read_scores(output)
    assert list(scores.columns) == SCORE_COLUMNS
    assert len(scores) == len(incoming)
    assert scores["row_id"].astype(str).tolist() == incoming["row_id"].astype(str).tolist()
    assert np.isfinite(scores["score"]).all()
    assert scores["p_value"].between(0.0, 1.0).all()

    manifest = json.loads((cli_trained.bundle / "manifest.json").read_text())
    threshold = manifest["calibration"]["threshold"]
    flagged = scores["is_anomaly"].astype(bool).to_numpy()
    np.testing.assert_array_equal(flagged, scores["score"].to_numpy(np.float64) > threshold)

    summary_file = out_dir / "scores.summary.json"
    assert summary_file.is_file()
    summary = json.loads(summary_file.read_text())
    assert summary["rows"] == len(incoming)
    assert summary["anomalies"] == int(flagged.sum())
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([output.name, summary_file.name])

    assert rank_auroc(incoming["label"].to_numpy(), scores["score"].to_numpy()) > 0.7


def test_inspect_via_installed_script(cli_trained):
    assert cli_trained.proc.returncode == 0, cli_trained.proc.stderr
    script = Path(sys.executable).with_name("vaeguard")
    command = [script] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = run_process(*command, "inspect", cli_trained.bundle, cwd=cli_trained.work)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    manifest = json.loads((cli_trained.bundle / "manifest.json").read_text())
    assert "threshold" in proc.stdout
    assert f"{manifest['calibration']['threshold']:.6g}" in proc.stdout
    low, high = manifest["calibration"]["fpr_range_90"]
    assert f"90% range         {low:.2%}-{high:.2%}" in proc.stdout
    for column in manifest["schema"]["numeric"] + manifest["schema"]["categorical"]:
        assert column in proc.stdout


def test_output_into_a_closed_pipe_ends_quietly(trained_bundle):
    """`vaeguard inspect B --json | head`: before, `error: unexpected BrokenPipeError` after head left."""
    script = Path(sys.executable).with_name("vaeguard")
    command = [script] if script.exists() else [sys.executable, "-m", "pipeline.cli"]
    proc = subprocess.Popen([*map(str, command), "inspect", str(trained_bundle), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the command writes: the reader is gone
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 128 + signal.SIGPIPE
    assert err == ""


# --- in-process ----------------------------------------------------------------------------


def test_inspect_json_equals_manifest(capsys, trained_bundle):
    code, out, err = run_main(capsys, "inspect", trained_bundle, "--json")
    assert code == 0, err
    assert json.loads(out) == json.loads((trained_bundle / "manifest.json").read_text())


def test_two_inputs_add_source_column_first(capsys, tmp_path, trained_bundle, incoming_csv, sensor_frame):
    second = write_table(sensor_frame.head(50), tmp_path / "second.parquet")
    output = tmp_path / "out" / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, second, "--output", output,
                            "--device", "cpu")
    assert code == 0, err
    scores = read_scores(output)
    n_first = len(pd.read_csv(incoming_csv))
    assert list(scores.columns) == ["source", *SCORE_COLUMNS]
    assert scores["source"].tolist() == [str(incoming_csv)] * n_first + [str(second)] * 50
    summary = json.loads((tmp_path / "out" / "scores.summary.json").read_text())
    assert summary["rows"] == n_first + 50
    assert [f["rows"] for f in summary["files"]] == [n_first, 50]


@pytest.mark.parametrize("how", ["same path", "a link"])
def test_an_input_given_twice_is_refused_before_any_work(capsys, tmp_path, trained_bundle, incoming_csv, how):
    """Before: `score B data/*.csv data/today.csv` scored today's rows twice and counted them twice
    in the summary's rows, anomalies and anomaly rate, without a word."""
    again = incoming_csv
    if how == "a link":
        again = tmp_path / "today.csv"
        again.symlink_to(incoming_csv)
    output = tmp_path / "out" / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, again, "--output", output, "--device", "cpu")
    assert code == 1
    expected = f"{incoming_csv}" if how == "same path" else f"{again} and {incoming_csv}, the same file"
    assert err.strip().splitlines() == [f"error: {expected}: given twice as an input, so its rows would be scored and "
                                        f"counted twice; give each input once"]
    assert not (tmp_path / "out").exists()


AFTER_THE_COMMIT = ("after the output was written whole, which was kept; the steps after it (such as --report) "
                    "did not run")


def signal_on_renaming(monkeypatch, name: str, signum: int) -> None:
    """A signal as a file called ``name`` is renamed into place, the first step of the commit."""
    real_replace = os.replace

    def signalled(source, target):
        if Path(target).name == name:
            os.kill(os.getpid(), signum)
        return real_replace(source, target)

    monkeypatch.setattr(os, "replace", signalled)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_scores_are_committed_keeps_them_whole_and_says_so(capsys, monkeypatch, tmp_path,
                                                                               trained_bundle, incoming_csv, signame):
    """Before: a signal after the scores were renamed into place but before their summary was written
    left the scores without a summary, and the CLI said "no output was written"."""
    signum = getattr(signal, signame)
    signal_on_renaming(monkeypatch, "scores.parquet", signum)
    output = tmp_path / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output, "--device", "cpu")
    how = "terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted"
    assert code == 128 + signum
    assert err.strip().splitlines() == [f"error: {how} {AFTER_THE_COMMIT}"]
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert summary["rows"] == len(read_scores(output)) == len(pd.read_csv(incoming_csv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.summary.json"]


def test_a_signal_while_the_summary_is_written_leaves_the_earlier_output(capsys, monkeypatch, tmp_path,
                                                                        trained_bundle, incoming_csv):
    """The summary is written under a hidden name before the commit, as the scores are: a signal
    meanwhile stops the run before anything is in place, and the message says so."""
    real_write_text = Path.write_text

    def signalled(path, text, *args, **kwargs):
        if path.name.startswith(".scores.summary.json.tmp-"):
            os.kill(os.getpid(), signal.SIGINT)
        return real_write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", signalled)
    (tmp_path / "scores.parquet").write_bytes(b"earlier scores")
    (tmp_path / "scores.summary.json").write_text("earlier summary")
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / "scores.parquet",
                            "--device", "cpu")
    assert code == 130 and err.strip().splitlines() == ["error: interrupted; no output was written"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.summary.json"]
    assert (tmp_path / "scores.parquet").read_bytes() == b"earlier scores"
    assert (tmp_path / "scores.summary.json").read_text() == "earlier summary"


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_while_the_report_is_written_says_the_output_was_kept(capsys, monkeypatch, tmp_path, trained_bundle,
                                                                       incoming_csv, signame):
    """The scores and their summary are in place when --report is written: a signal then said
    "no output was written", and a user deleted scores that were whole. No report is left."""
    import pipeline.scoring_report as scoring_report

    signum = getattr(signal, signame)
    real_sections = scoring_report.scoring_sections

    def signalled(job):
        sections = real_sections(job)
        os.kill(os.getpid(), signum)
        return sections

    monkeypatch.setattr(scoring_report, "scoring_sections", signalled)
    output = tmp_path / "scores.parquet"
    code, out, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output, "--device", "cpu",
                              "--report")
    how = "terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted"
    assert code == 128 + signum
    assert err.strip().splitlines() == [f"error: {how} {AFTER_THE_COMMIT}"] and out == ""
    summary = json.loads((tmp_path / "scores.summary.json").read_text())
    assert summary["rows"] == len(read_scores(output)) == len(pd.read_csv(incoming_csv))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.parquet", "scores.summary.json"]


# `vaeguard score` with Ctrl-C or SIGTERM sent from inside Python's queue.Queue, as the main thread
# hands a chunk to the writer thread: after it woke the waiting writer, before it took that writer
# off the list of waiters. A handler that raised there left the queue's condition broken: the writer
# was never woken again, and the run hung forever as it ended. Signals that landed like this anywhere
# in a run (also inside onnxruntime: a segmentation fault) hung or crashed 15-25% of stopped runs.
SIGNAL_IN_A_QUEUE = """
import collections, queue, signal, sys, threading

from pipeline.cli import main
from pipeline.outputs import OutputWriter

signum = int(sys.argv.pop(1))


class Tripwire(collections.deque):
    armed = False  # while the main thread hands a chunk to the writer thread
    tripped = False

    def remove(self, waiter):
        if Tripwire.armed and not Tripwire.tripped and threading.current_thread() is threading.main_thread():
            Tripwire.tripped = True
            signal.raise_signal(signum)
        super().remove(waiter)


real_init, real_write = queue.Queue.__init__, OutputWriter.write


def init(self, maxsize=0):
    real_init(self, maxsize)
    self.not_empty._waiters, self.not_full._waiters = Tripwire(), Tripwire()


def write(self, table):
    Tripwire.armed = True
    try:
        real_write(self, table)
    finally:
        Tripwire.armed = False


queue.Queue.__init__, OutputWriter.write = init, write
status = main()
assert Tripwire.tripped, "the signal was never sent"
sys.exit(status)
"""


def run_script(script: str, *args, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    """``script`` run by a new Python as a program (``main()`` without argv is the `vaeguard` program)."""
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    try:
        return subprocess.run([sys.executable, "-c", script, *map(str, args)], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=timeout,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    except subprocess.TimeoutExpired:
        pass
    pytest.fail(f"hung: still running {timeout:.0f} s later")


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_inside_a_hand_over_between_threads_stops_the_run_cleanly(tmp_path, trained_bundle, incoming_csv,
                                                                         signame):
    signum = getattr(signal, signame)
    output = tmp_path / "out" / "scores.parquet"
    done = run_script(SIGNAL_IN_A_QUEUE, int(signum), "score", trained_bundle, incoming_csv, "--output", output,
                      "--device", "cpu", "--batch-size", 50, cwd=tmp_path)
    how = "terminated (SIGTERM)" if signame == "SIGTERM" else "interrupted"
    assert (done.returncode, done.stderr.splitlines()) == (128 + signum, [f"error: {how}; no output was written"])
    assert not (tmp_path / "out").exists()  # no temporary file, nor the folder the run made for it


# A signal once the command is over, as Python shuts down: in an exit handler (torch has some), or
# as the modules are freed (about a second after `train`, collecting torch's objects), when Python
# has put the default handlers back. A successful run ended with 130 or 143 and nothing said, or
# with a KeyboardInterrupt traceback from an exit handler.
SIGNAL_AT_EXIT = """
import atexit, os, signal, sys, time

import pipeline.cli as cli

signum, when = int(sys.argv.pop(1)), sys.argv.pop(1)


def signalled(kill=os.kill, pid=os.getpid(), sleep=time.sleep):
    kill(pid, signum)
    sleep(0.3)  # for the signal to act


class FreedLast:
    def __del__(self):
        signalled()


score = cli.COMMANDS["score"]


def score_then_exit_handler(args):
    score(args)
    if when == "in an exit handler":
        atexit.register(signalled)  # as torch's are, when it is loaded


cli.COMMANDS["score"] = score_then_exit_handler
if when == "as the modules are freed":
    freed_last = FreedLast()
sys.exit(cli.main())
"""


@pytest.mark.parametrize("when", ["in an exit handler", "as the modules are freed"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_signal_as_python_exits_after_a_successful_command_changes_nothing(tmp_path, trained_bundle, incoming_csv,
                                                                            signame, when):
    output = tmp_path / "scores.parquet"
    done = run_script(SIGNAL_AT_EXIT, int(getattr(signal, signame)), when, "score", trained_bundle, incoming_csv,
                      "--output", output, "--device", "cpu", cwd=tmp_path)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.startswith(f"scores:  {output}\nsummary: ") and "rows/s" in done.stdout
    assert len(read_scores(output)) == len(pd.read_csv(incoming_csv))


@pytest.mark.parametrize("command", ["train", "export"])
def test_a_signal_once_train_or_export_put_the_bundle_in_place_says_it_was_kept(capsys, monkeypatch, tmp_path,
                                                                              sensor_csv, trained_bundle, command):
    """A signal as `train` or `export` printed what it did, the new bundle or variant already in
    place, said "no output was written"."""
    import shutil

    import pipeline.cli
    import pipeline.precision
    from pipeline.bundle import Bundle

    module, name = (pipeline.cli, "format_training") if command == "train" else (pipeline.precision, "describe_variant")
    real = getattr(module, name)

    def signalled(*args):
        os.kill(os.getpid(), signal.SIGINT)
        return real(*args)

    monkeypatch.setattr(module, name, signalled)
    if command == "train":
        config = tmp_path / "fast.yaml"
        config.write_text(FAST_YAML)
        argv = ["train", sensor_csv, "--name", "kept", "--id-columns", "row_id", "--config", config, "--out", tmp_path]
        bundle = tmp_path / "kept"
    else:
        bundle = shutil.copytree(trained_bundle, tmp_path / "kept")
        argv = ["export", bundle, "--precision", "fp16", "--threads", "1"]
    code, out, err = run_main(capsys, *argv)
    assert (code, out, err.splitlines()) == (130, "", ["error: interrupted after the output was written whole, which "
                                                       "was kept; the steps after it did not run"])
    manifest = Bundle.load(bundle).manifest  # in place, and whole
    assert command == "train" or "fp16" in manifest["variants"]


def test_batch_size_does_not_change_scores(capsys, tmp_path, trained_bundle, incoming_csv):
    outputs = {}
    for name, extra in (("default", []), ("small", ["--batch-size", "100"])):
        outputs[name] = tmp_path / f"{name}.parquet"
        code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", outputs[name],
                                "--device", "cpu", *extra)
        assert code == 0, err
    default, small = read_scores(outputs["default"]), read_scores(outputs["small"])
    assert default["row_id"].tolist() == small["row_id"].tolist()
    for column in ("score", "recon", "kl", "p_value"):
        np.testing.assert_allclose(small[column], default[column], rtol=1e-5, atol=1e-6)
    assert small["is_anomaly"].tolist() == default["is_anomaly"].tolist()


@pytest.mark.skipif(gpu_present(), reason="this machine has a GPU: --device cuda may work here")
def test_device_cuda_without_gpu_fails_clearly(capsys, tmp_path, trained_bundle, incoming_csv):
    output = tmp_path / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output,
                            "--device", "cuda")
    assert code == 1
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    assert "cuda" in lines[0].lower() and "--device cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_train_trim_fraction_reaches_the_training_config(capsys, tmp_path, sensor_csv):
    config = tmp_path / "fast.yaml"
    config.write_text(FAST_YAML.replace("max_epochs: 30", "max_epochs: 3"))
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "trimmed", "--config", config, "--trim-fraction", "0.05",
                            "--out", tmp_path / "exported")
    assert code == 0, err
    manifest = json.loads((tmp_path / "exported" / "trimmed" / "manifest.json").read_text())
    assert manifest["config"]["training"]["trim_fraction"] == 0.05


@pytest.mark.parametrize("how", ["flag", "config file"])
def test_trim_fraction_out_of_range_fails_before_any_work(capsys, tmp_path, sensor_csv, how):
    config = tmp_path / "bad.yaml"
    config.write_text("training:\n  trim_fraction: 0.6\n")
    extra = ("--trim-fraction", "0.6") if how == "flag" else ("--config", config)
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "bad", *extra, "--out", tmp_path / "exported")
    assert code == 1
    source = "" if how == "flag" else f"{config}: "  # a value from the file names the file
    assert err.strip() == (f"error: {source}training.trim_fraction must be at least 0 and below 0.5, got 0.6; "
                           "0.05 leaves each batch's worst-fitting 5% of rows out of the loss")
    assert not (tmp_path / "exported").exists()


@pytest.mark.parametrize("verbose", [True, False])
def test_traceback_only_with_verbose(capsys, tmp_path, trained_bundle, verbose):
    missing = tmp_path / "missing.csv"
    output = tmp_path / "scores.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, missing, "--output", output, "--device", "cpu",
                            *(["--verbose"] if verbose else []))
    assert code == 1
    assert err.strip().splitlines()[-1].startswith("error: ")
    assert str(missing) in err
    assert ("Traceback" in err) is verbose
    if not verbose:
        assert len(err.splitlines()) == 1, err
    assert not output.exists()


def test_an_error_naming_a_file_with_a_line_break_stays_one_line(capsys, tmp_path, trained_bundle):
    """A file name may hold a line break; printed as it is, `x<newline>y.csv: file not found` came over two
    lines, and a script reading the last line of stderr got half of it."""
    missing = tmp_path / "x\ny.csv"
    code, _, err = run_main(capsys, "score", trained_bundle, missing, "--output", tmp_path / "s.csv", "--device", "cpu")
    assert code == 1
    assert err.splitlines() == [f"error: {tmp_path}/x\\ny.csv: file not found; check the path"]


def test_a_warning_naming_a_file_with_a_line_break_stays_one_line(capsys, tmp_path, trained_bundle, sensor_frame):
    named = tmp_path / "x\ny.csv"
    write_table(sensor_frame.head(50).assign(note="n"), named)
    code, _, err = run_main(capsys, "score", trained_bundle, named, "--output", tmp_path / "s.csv", "--device", "cpu")
    assert code == 0
    assert err.splitlines() == [f"warning: {tmp_path}/x\\ny.csv: ignoring 1 column(s) the bundle does not use: 'note'"]


@pytest.mark.parametrize("signame, status, message", [("SIGINT", 130, "error: interrupted; no output was written"),
                                                      ("SIGTERM", 143, "error: terminated (SIGTERM); no output was "
                                                                       "written")])
def test_train_stopped_by_a_signal_leaves_nothing_and_prints_one_line(tmp_path, sensor_csv, signame, status, message):
    """Ctrl-C, or SIGTERM from `timeout`, `kill` or a scheduler: the run's staging folder goes too."""
    import signal
    import time

    config = tmp_path / "long.yaml"
    config.write_text("training:\n  max_epochs: 100000\n  patience: 100000\n  threads: 1\n")
    out = tmp_path / "exported"
    env = {**os.environ, "DO_NOT_TRACK": "1", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    # A process started in the background inherits SIGINT ignored; a terminal's Ctrl-C reaches a default handler.
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", str(sensor_csv), "--name", "stopped",
                             "--id-columns", "row_id", "--config", str(config), "--out", str(out)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not any((run / "features.npz").exists() for run in out.glob(".stopped.run-*")):  # training has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.2)
    time.sleep(1.0)  # into the epochs
    proc.send_signal(getattr(signal, signame))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == status, stderr
    assert stderr.splitlines() == [message]
    assert stdout == ""
    assert not out.exists()  # nor the --out folder the run made


def test_train_flags_win_over_the_config_file(capsys, tmp_path, sensor_csv, monkeypatch):
    import pipeline.workflow
    from pipeline.errors import PipelineError

    jobs = []

    def capture(job):
        jobs.append(job)
        raise PipelineError("stopped after the job was built")

    monkeypatch.setattr(pipeline.workflow, "run_training", capture)
    config = tmp_path / "set.yaml"
    config.write_text("training:\n  seed: 1\n  trim_fraction: 0.1\n  device: cuda\n  max_epochs: 7\n"
                      "calibration:\n  target_fpr: 0.05\n")
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "x", "--config", config, "--seed", "2",
                            "--trim-fraction", "0.05", "--device", "cpu", "--target-fpr", "0.02", "--out", tmp_path)
    assert code == 1 and err.strip() == "error: stopped after the job was built"
    training, calibration = jobs[0].config.training, jobs[0].config.calibration
    assert (training.seed, training.trim_fraction, training.device, calibration.target_fpr) == (2, 0.05, "cpu", 0.02)
    assert training.max_epochs == 7  # what no flag sets comes from the file


# --- threads beyond the cores ---------------------------------------------------------------


@pytest.fixture
def one_core(monkeypatch):
    """This process may use one core, whatever machine runs the test; the cap's warning is given anew."""
    from pipeline import cores

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    cores._warn_capped.cache_clear()
    yield
    cores._warn_capped.cache_clear()


CAPPED_WARNING = ("warning: threads {} is more than the 1 CPU core(s) this process may use; using 1, as more threads "
                  "than cores only slow torch and onnxruntime down; set --threads (in training, training.threads) to at most 1, "
                  "or leave it out for the default")


def test_score_threads_beyond_the_cores_are_capped_with_one_warning(capsys, monkeypatch, tmp_path, trained_bundle,
                                                                    incoming_csv, one_core):
    """`vaeguard score --threads 10000` on 2 cores made onnxruntime start 10,000 threads: 50,000 rows
    were not scored after 11 minutes (0.7 s with 2). Now the session gets the cores, and one line says so."""
    from pipeline import runtime

    monkeypatch.setattr(runtime, "_SHARED", {})  # a session of an earlier test would be reused
    threads, real = [], runtime.create_session

    def recorded(*args, **kwargs):
        session = real(*args, **kwargs)
        threads.append(session.get_session_options().intra_op_num_threads)
        return session

    monkeypatch.setattr(runtime, "create_session", recorded)
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", tmp_path / "scores.parquet",
                            "--device", "cpu", "--threads", "3")
    assert code == 0, err
    assert threads == [1]
    assert err.splitlines() == [CAPPED_WARNING.format(3)]


def test_train_config_threads_beyond_the_cores_are_capped_with_one_warning(capsys, monkeypatch, tmp_path, sensor_csv,
                                                                           one_core):
    """`threads: 10000` in the config file trained 20 epochs in 177 s instead of 0.3 s on 2 cores."""
    import torch

    asked = []
    monkeypatch.setattr(torch, "set_num_threads", asked.append)  # torch's pool is the whole test session's
    config = tmp_path / "fast.yaml"
    config.write_text(FAST_YAML.replace("max_epochs: 30", "max_epochs: 2").replace("threads: 2", "threads: 10000"))
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "capped", "--id-columns", "row_id", "--config",
                            config, "--out", tmp_path / "exported")
    assert code == 0, err
    assert asked == [1]
    assert err.splitlines() == [CAPPED_WARNING.format(10000)]


@pytest.mark.parametrize("argv", [
    ["serve", "/srv/bundle", "--watch", "", "--output", "/srv/scored", "--interval", "60"],
    ["train", "", "--name", "x"],
    ["score", "/srv/bundle", "in.csv", "--output", ""],
    ["inspect", ""],
])
def test_an_empty_path_is_refused_not_taken_as_the_current_folder(argv, capsys):
    """Path("") is ".": an unset shell variable (`--watch "$LANDING"`) served the folder the command
    ran in, whose files the runs then scored and quarantined (moved away)."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    assert "an empty path; give a file or folder (is a shell variable unset?)" in capsys.readouterr().err


@pytest.mark.parametrize("text, names", [
    ("row_id, batch", ("row_id", "batch")),           # spaces around a name, as before
    ("Order ID ", ("Order ID ",)),                    # a header's name with its trailing space
    ("Order ID", ("Order ID",)),                      # not a column: left for training's "did you mean"
    ("lot,part", ("lot,part",)),                      # one name with its comma
    ("Order ID ,lot,part, batch", ("Order ID ", "lot,part", "batch")),
    (" a", (" a",)), ("a, a", ("a", " a")),           # as written first, then without the spaces
    (",,", ()),
])
def test_id_columns_take_a_name_as_the_header_writes_it(text, names):
    from pipeline.cli import id_column_names

    assert id_column_names(text, ["Order ID ", "lot,part", "row_id", "batch", " a", "a"]) == names


def test_train_takes_id_columns_named_with_spaces_and_commas(capsys, tmp_path, sensor_frame):
    """`--id-columns "Order ID "` was stripped to 'Order ID' and refused ("did you mean 'Order ID '?"),
    and a name with a comma could not be given at all: the header says which pieces are names."""
    frame = sensor_frame.iloc[:1200].drop(columns="row_id")
    frame.insert(0, "Order ID ", [f"o{i}" for i in range(len(frame))])
    frame.insert(1, "lot,part", [f"l{i}" for i in range(len(frame))])
    data = write_table(frame, tmp_path / "orders.csv")
    config = tmp_path / "fast.yaml"
    config.write_text(FAST_YAML.replace("max_epochs: 30", "max_epochs: 2"))
    code, _, err = run_main(capsys, "train", data, "--name", "orders", "--id-columns", "Order ID ,lot,part",
                            "--label-column", "label", "--config", config, "--out", tmp_path / "exported")
    assert code == 0, err
    manifest = json.loads((tmp_path / "exported" / "orders" / "manifest.json").read_text())
    assert manifest["schema"]["id_columns"] == ["Order ID ", "lot,part"]


@pytest.mark.parametrize("argv, command, unknown", [
    (["score", "b", "in.csv", "--output", "o.parquet", "--tagret-fpr", "0.1"], "score", "--tagret-fpr 0.1"),
    (["train", "d.csv", "--name", "x", "--bogus"], "train", "--bogus"),
    (["inspect", "b", "extra"], "inspect", "extra"),
])
def test_an_unknown_argument_gets_its_command_usage_and_name(argv, command, unknown, capsys):
    """argparse handed a subcommand's unknown argument to the top parser: its usage (the command
    list) and `vaeguard: error:`, where the README promises the command's own."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    err = capsys.readouterr().err
    assert stopped.value.code == 2
    assert err.startswith(f"usage: vaeguard {command} "), err
    assert err.splitlines()[-1] == f"vaeguard {command}: error: unrecognized arguments: {unknown}"


@pytest.mark.parametrize("extra, message", [
    (["--id-columns", ""], "--id-columns is empty (got ''); give the id columns' names, e.g. --id-columns row_id, or "
                           "leave the option out (is a shell variable unset?)"),
    (["--id-columns", " , "], "--id-columns is empty (got ' , ')"),
    (["--channels", "3"], "--channels 3: {data} is read as a table, and --channels is for images; leave it out, or "
                          "add --image-size N to train on the images it lists"),
    (["--path-column", "row_id"], "--path-column row_id: {data} is read as a table, and --path-column is for images; "
                                  "leave it out, or add --image-size N to train on the images it lists"),
])
def test_train_refuses_options_it_would_have_ignored(capsys, tmp_path, sensor_csv, extra, message):
    """Taken as no option at all, `--id-columns "$IDS"` with IDS unset trained each id as a feature,
    and --channels on a table did nothing."""
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "x", "--out", tmp_path / "out", *extra)
    assert code == 1
    assert err.startswith("error: " + message.format(data=sensor_csv)) and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_score_refuses_options_it_would_have_ignored(capsys, tmp_path, trained_bundle, incoming_csv):
    """--dask-address without --task-runner dask scored on this machine alone, and --maps with a table
    bundle drew nothing: both without a word."""
    out = tmp_path / "new" / "s.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", out,
                            "--dask-address", "tcp://scheduler:8786")
    assert (code, err) == (1, "error: --dask-address tcp://scheduler:8786: a Dask scheduler is used only with "
                              "--task-runner dask; add --task-runner dask, or leave --dask-address out\n")
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", out, "--maps", tmp_path / "m")
    assert (code, err) == (1, f"error: --maps {tmp_path / 'm'}: bundle {trained_bundle} scores tables, and maps are "
                              f"drawn for image bundles only; leave --maps out\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rows", ["150", "0"])
def test_demo_with_too_few_rows_is_refused_before_any_file_or_flow(rows, capsys, tmp_path, monkeypatch):
    """150 rows failed inside the training flow, saying to raise --target-fpr, which demo does not
    take; 0 rows said "SyntheticSpec.n_rows must be at least 1". The minimum named is the training
    flow's own: the generated table's normal rows at it pass the flow's check, one row fewer fail it."""
    import re

    import flows.demo
    from pipeline.config import PipelineConfig
    from pipeline.errors import DataError
    from pipeline.splits import check_enough_rows
    from pipeline.synthetic import SyntheticSpec, make_sensor_table

    monkeypatch.setattr(flows.demo, "write_table", lambda *args: pytest.fail("wrote the demo's data"))
    monkeypatch.setattr(flows.demo, "train_flow", lambda job: pytest.fail("ran the training flow"))
    code, out, err = run_main(capsys, "demo", "--rows", rows, "--out", tmp_path / "exported", "--work",
                              tmp_path / "work")
    said = re.fullmatch(rf"error: --rows {rows}: the demo needs at least (\d+) rows \(training and calibrating at "
                        rf"target FPR 0\.01 takes \d+ normal ones, and 3% of the generated rows are anomalies\); "
                        rf"pass --rows \1 or more\n", err)
    assert (code, out) == (1, "") and said, err
    config, needed = PipelineConfig(), int(said[1])

    def check(n: int) -> None:
        normal = int((make_sensor_table(SyntheticSpec(n_rows=n, seed=0))["label"] == 0).sum())
        check_enough_rows(normal, config.calibration, config.training, True, "demo")

    check(needed)
    with pytest.raises(DataError, match="too few rows"):
        check(needed - 1)
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_while_scoring_is_one_line_naming_the_output(capsys, monkeypatch, trained_bundle,
                                                                         incoming_csv, tmp_path):
    """It was `error: unexpected OSError: [Errno 28] No space left on device: '.../.s.summary.json.tmp-...'`:
    neither the output nor what to do."""
    from tests.conftest import disk_full_when_writing

    disk_full_when_writing(monkeypatch, "s.summary.json")
    output = tmp_path / "s.parquet"
    code, _, err = run_main(capsys, "score", trained_bundle, incoming_csv, "--output", output, "--device", "cpu")
    assert code == 1
    assert err.splitlines() == [f"error: --output {output}: the disk is full (No space left on device) while writing "
                                f"there; free space on it, or write elsewhere; nothing was written, and an earlier "
                                f"output is as it was"]
    assert list(tmp_path.iterdir()) == []


def test_a_disk_that_fills_up_while_training_is_one_line_naming_out(capsys, monkeypatch, sensor_csv, tmp_path):
    """It was `error: unexpected OSError: [Errno 28] No space left on device: '.../.q.run-.../schema.json'`."""
    import errno

    real_write_text = Path.write_text

    def full(path, *args, **kwargs):
        if path.name == "schema.json":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write_text(path, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "q", "--out", out)
    assert code == 1
    assert err.splitlines()[-1] == (f"error: --out {out}: the disk is full (No space left on device) while writing "
                                    f"there; free space on it, or write elsewhere; nothing was written, and an "
                                    f"earlier output is as it was")
    assert not out.exists()


def _storage_line(argv, error, free=None, monkeypatch=None):
    import shutil
    from collections import namedtuple

    from pipeline.cli import build_parser, storage_error

    if free is not None:  # bytes free on each disk, by the folder asked about
        usage = namedtuple("usage", "total used free")
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 40, 0, free(Path(path))))
    return storage_error(build_parser().parse_args([str(a) for a in argv]), error)


def test_a_full_disk_or_read_only_file_system_names_the_output_written_and_only_claims_what_holds(monkeypatch,
                                                                                                  tmp_path):
    """Before, every full disk named the command's first output (--output, while --maps on another disk
    filled; --out, while demo filled --work) and claimed nothing was written (demo writes its data in
    place); a file system turned read-only was `unexpected OSError`."""
    import errno

    output, maps = tmp_path / "s" / "s.parquet", tmp_path / "maps"
    output.parent.mkdir()
    maps.mkdir()  # where its disk is told apart from the output's
    score = ["score", "B", "x.csv", "--output", output, "--maps", maps]
    full = OSError(errno.ENOSPC, "No space left on device")
    assert _storage_line(score, OSError(errno.ENOSPC, "No space left on device", str(maps / ".stage" / "1.png"))
                         ).startswith(f"--maps {maps}: the disk is full (No space left on device) while writing there")
    assert _storage_line(score, OSError(errno.ENOSPC, "No space left on device", str(output.parent / ".s.parquet.tmp"))
                         ).startswith(f"--output {output}: the disk is full")
    # No file named (pyarrow, pandas): the output whose disk is nearly full, where one is.
    assert _storage_line(score, full, lambda path: 0 if maps in (path, *path.parents) else 1 << 30,
                         monkeypatch).startswith(f"--maps {maps}: the disk is full")
    assert _storage_line(score, full, lambda path: 1 << 30, monkeypatch).startswith(
        f"--output {output} or --maps {maps}: the disk is full")
    assert _storage_line(score, OSError(errno.EROFS, "Read-only file system", str(output.parent / "s.summary.json"))
                         ) == (f"--output {output}: the file system is read-only (Read-only file system) while "
                               f"writing there; make it writable, or write elsewhere; nothing was written, and an "
                               f"earlier output is as it was")
    demo = _storage_line(["demo", "--out", tmp_path / "ex", "--work", tmp_path / "work"],
                         OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "work" / "train.csv")))
    assert demo == f"--work {tmp_path / 'work'}: the disk is full (No space left on device) while writing there; " \
                   f"free space on it, or write elsewhere"
    assert _storage_line(["inspect", "B"], full) is None  # writes nothing, names nothing: the plain error
    assert _storage_line(score, OSError(errno.EACCES, "Permission denied", str(output))) is None


def test_an_unexpected_failure_on_a_nearly_full_disk_names_it_as_the_likely_cause(capsys, monkeypatch, sensor_csv,
                                                                                 tmp_path):
    """torch.save on a full disk raises RuntimeError ("unexpected pos"), not ENOSPC."""
    import shutil
    from collections import namedtuple

    import pipeline.workflow as workflow

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2944 vs 2896")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(workflow, "STEPS", (full,))
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, (1 << 30) - 4096, 4096))
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "q", "--out", tmp_path / "out")
    assert code == 1
    [line] = err.splitlines()
    assert line.startswith("error: unexpected RuntimeError: [enforce fail at inline_container.cc:672]")
    assert line.endswith(f"; the disk of --out {tmp_path / 'out'} has 4,096 bytes free, the likely cause: free space "
                         f"on it, or write elsewhere")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 0, 1 << 30))
    code, _, err = run_main(capsys, "train", sensor_csv, "--name", "q", "--out", tmp_path / "out")
    assert err.strip().endswith("(run with --verbose for the traceback)")  # room to spare: no such guess


@pytest.mark.parametrize("flag", ["--verbose", "-v"])
def test_verbose_before_the_command_is_taken_as_after_it(capsys, tmp_path, trained_bundle, flag):
    """`vaeguard --verbose score ...` printed the score usage and `unrecognized arguments: --verbose`."""
    missing = tmp_path / "nothere.csv"
    code, _, err = run_main(capsys, flag, "score", trained_bundle, missing, "--output", tmp_path / "s.csv")
    assert code == 1
    assert "Traceback (most recent call last)" in err  # the traceback --verbose asks for
    assert err.splitlines()[-1] == f"error: {missing}: file not found; check the path"
