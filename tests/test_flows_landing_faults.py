"""The landing flow in-process (temporary Prefect server): quarantine of bad files, failures outside
the data, files changing under a run, bounded parallelism, drift alerts."""

from __future__ import annotations

import errno
import json
import logging
import threading
import time
from pathlib import Path

import pytest

import flows.landing as landing_module
from flows.landing import landing_flow
from pipeline.errors import ConfigError, DataError, DeviceError, PipelineError
from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("prefect_harness")]


def settled(path: Path) -> Path:
    import os

    os.utime(path, (time.time() - 60, time.time() - 60))
    return path


def test_corrupt_file_is_quarantined_while_the_others_score(trained_bundle, tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    settled(write_table(make_sensor_table(SyntheticSpec(n_rows=800, seed=41)), landing / "good.csv"))
    bad = make_sensor_table(SyntheticSpec(n_rows=300, seed=42)).astype({"pressure": object})
    bad.loc[120, "pressure"] = "##corrupt##"
    settled(write_table(bad, landing / "bad.csv"))
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    status = {f["file"]: f["status"] for f in report["files"]}
    assert status == {"good.csv": "scored", "bad.csv": "quarantined"}
    reason = (out / "quarantine" / "bad.csv.reason.txt").read_text()
    assert "pressure" in reason and "row 121" in reason
    assert not (landing / "bad.csv").exists() and (out / "quarantine" / "bad.csv").exists()
    # The next run finds nothing: the good file is done, the bad one is out of the landing folder.
    assert landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")["files"] == []


def test_a_header_only_file_is_recorded_as_empty_not_quarantined(trained_bundle, tmp_path, caplog):
    """A nightly export of a day without events is a header alone: nothing to score, nothing wrong,
    and nothing in the logs that looks like a failure. A header without the bundle's columns is
    still bad data."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    columns = list(make_sensor_table(SyntheticSpec(n_rows=5, seed=43)).columns)
    (landing / "quiet.csv").write_text(",".join(columns) + "\n")
    (landing / "wrong.csv").write_text(",".join(c for c in columns if c != "pressure") + "\n")
    settled(landing / "quiet.csv"), settled(landing / "wrong.csv")
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    status = {f["file"]: f["status"] for f in report["files"]}
    assert status == {"quiet.csv": "empty", "wrong.csv": "quarantined"}
    assert (landing / "quiet.csv").exists() and not (out / "scores").exists()
    assert sorted((e["relative"], e["status"]) for e in ledger_lines(out)) == [("quiet.csv", "empty"),
                                                                                 ("wrong.csv", "quarantined")]
    # Before, its task run ended Failed: "ERROR ... Task run ... Failed ... EmptyInputError".
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR and "quiet.csv" in r.getMessage()] \
        == []
    assert landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")["files"] == []


@pytest.mark.parametrize("limit", [{"max_psi": float("nan")}, {"max_psi": -1.0}, {"rate_p_value": 2.0},
                                   {"settle_seconds": -5.0}])
def test_a_run_asked_for_a_bad_limit_fails_before_scoring_a_file(trained_bundle, tmp_path, limit):
    """Before, a bad drift limit failed the run only after every file was scored and recorded, and a
    NaN max_psi passed, so the shape alert could never fire."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "monday.csv", 90)
    name = next(iter(limit)).replace("_", "-")
    with pytest.raises(ConfigError, match=f"--{name}"):
        landing_flow(trained_bundle, landing, out, **{"settle_seconds": 0.0, "device": "cpu", **limit})
    assert not (out / "ledger.jsonl").exists() and not (out / "scores").exists()


@pytest.mark.parametrize("watch", ["", "."])
def test_an_empty_or_relative_landing_folder_is_refused_not_taken_as_the_current_one(trained_bundle, tmp_path,
                                                                                     monkeypatch, watch):
    """`prefect deployment run ... --param watch=`: Prefect's parameter validation made the empty
    path Path("."), the folder the run started in (the serve process's), and the run scored that
    folder and quarantined, that is moved away, every table in it that the bundle could not read."""
    here, out = tmp_path / "where-serve-was-started", tmp_path / "out"
    here.mkdir()
    monkeypatch.chdir(here)
    settled(write_table(make_sensor_table(SyntheticSpec(n_rows=50, seed=44)).drop(columns="pressure"),
                        here / "notes.csv"))
    with pytest.raises(ConfigError, match=rf"^landing\.watch \(--watch\) must be an absolute path, got '{watch}'"):
        landing_flow(trained_bundle, watch, out, settle_seconds=0.0, device="cpu")
    assert (here / "notes.csv").exists()
    assert not out.exists()


def test_a_bad_parameter_fails_the_run_with_the_cli_line_as_its_message_and_no_traceback(trained_bundle, tmp_path,
                                                                                         caplog):
    """A deployment run given device=tpu ended Failed("Flow run encountered an exception: ConfigError:
    --device must be ..."), with a traceback logged at ERROR; the line said nothing of how to fix it."""
    from pipeline.config import LandingJob

    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    with pytest.raises(ConfigError) as expected:
        LandingJob(bundle=trained_bundle, watch=landing, output=out, device="tpu")  # what `serve --device` checks
    state = landing_flow(trained_bundle, landing, out, device="tpu", return_state=True)
    assert state.is_failed() and state.message == str(expected.value), state.message
    assert "e.g. --device cpu" in state.message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [str(expected.value)]
    assert not any(r.exc_info or r.exc_text for r in errors)


def test_drifted_batch_raises_the_alert_and_a_normal_one_does_not(trained_bundle, tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    normal = make_sensor_table(SyntheticSpec(n_rows=3000, seed=51, anomaly_fraction=0.0))
    settled(write_table(normal, landing / "monday.csv"))
    calm = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert calm["alert"] is False, calm["drift"]

    drifted = make_sensor_table(SyntheticSpec(n_rows=3000, seed=52, anomaly_fraction=0.0))
    drifted["temperature"] += 8.0  # the plant runs hotter: every row shifted
    drifted["pressure"] *= 1.3
    settled(write_table(drifted, landing / "tuesday.csv"))
    alarmed = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert alarmed["alert"] is True and alarmed["drift"]["alerts"]
    saved = json.loads(max((out / "runs").glob("*.json")).read_text())
    assert saved["alert"] is True


def ledger_lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]


def land_sensors(landing: Path, name: str, seed: int, rows: int = 300) -> Path:
    return settled(write_table(make_sensor_table(SyntheticSpec(n_rows=rows, seed=seed)), landing / name))


def test_a_data_fault_is_not_retried_and_other_failures_are(trained_bundle, tmp_path, monkeypatch):
    """Retrying a file whose data is bad fails the same way: only failures outside the data are
    worth the task's retries."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "bad.csv", 70)
    land_sensors(landing, "flaky.csv", 71)
    attempts: dict[str, int] = {}
    real_score = landing_module.score_files

    def faulty(job):
        name = Path(job.inputs[0]).name
        attempts[name] = attempts.get(name, 0) + 1
        if name == "bad.csv":
            raise DataError(f"{name}: column 'pressure' must be numeric but row 3 holds 'x'; fix that value")
        if attempts[name] == 1:
            raise OSError(errno.EIO, "Input/output error")  # passes on the retry
        return real_score(job)

    monkeypatch.setattr(landing_module, "score_files", faulty)
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert {f["file"]: f["status"] for f in report["files"]} == {"bad.csv": "quarantined", "flaky.csv": "scored"}
    assert attempts == {"bad.csv": 1, "flaky.csv": 2}


def test_failure_outside_the_data_leaves_files_for_the_next_run_and_fails_the_run(trained_bundle, tmp_path,
                                                                                  monkeypatch):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    for i, name in enumerate(["a.csv", "b.csv", "c.csv"]):
        land_sensors(landing, name, 60 + i)
    real_score = landing_module.score_files

    def broken_machine(job):
        name = Path(job.inputs[0]).name
        if name == "b.csv":
            raise OSError(errno.ENOSPC, "No space left on device", str(job.output))
        if name == "c.csv":
            raise DeviceError("device 'cuda' requested, but onnxruntime sees no GPU; pass --device cpu")
        return real_score(job)

    monkeypatch.setattr(landing_module, "score_files", broken_machine)
    with pytest.raises(PipelineError, match=r"^2 landed file\(s\) could not be scored .*first: b\.csv: .*No space "
                                            r"left on device.*stay in the landing folder and are retried next run"):
        landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    [report] = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    status = {f["file"]: (f["status"], f.get("reason", "")) for f in report["files"]}
    assert status["a.csv"] == ("scored", "")
    assert status["b.csv"][0] == "failed" and "No space left" in status["b.csv"][1]
    assert status["c.csv"][0] == "failed" and "sees no GPU" in status["c.csv"][1]
    assert sorted(p.name for p in landing.iterdir()) == ["a.csv", "b.csv", "c.csv"]
    assert not (out / "quarantine").exists()
    assert [(e["relative"], e["status"]) for e in ledger_lines(out)] == [
        ("a.csv", "scored"), ("b.csv", "failed"), ("c.csv", "failed")]

    # The machine is fixed: the next run scores exactly the failed files.
    monkeypatch.setattr(landing_module, "score_files", real_score)
    again = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"]) for f in again["files"]] == [("b.csv", "scored"), ("c.csv", "scored")]
    assert len(list((out / "scores").glob("*.parquet"))) == 3


def test_files_changed_or_deleted_during_the_run_are_not_recorded(trained_bundle, tmp_path, monkeypatch):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    for i, name in enumerate(["keep.csv", "rewritten.csv", "retracted.csv", "fixed.csv"]):
        land_sensors(landing, name, 70 + i)
    real_score = landing_module.score_files

    def upstream_moves_on(job):
        path = Path(job.inputs[0])
        if path.name == "retracted.csv":
            path.unlink(missing_ok=True)  # the upstream retracts it before the read
        summary = None if path.name == "fixed.csv" else real_score(job)
        if path.name == "rewritten.csv":
            land_sensors(landing, "rewritten.csv", 99, rows=500)  # re-exported after it was read
        if path.name == "fixed.csv":
            land_sensors(landing, "fixed.csv", 98, rows=400)  # replaced with good data while failing
            raise DataError(f"{path}: column 'pressure' row 3: expected a number")
        return summary

    monkeypatch.setattr(landing_module, "score_files", upstream_moves_on)
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    status = {f["file"]: f["status"] for f in report["files"]}
    assert status == {"keep.csv": "scored", "rewritten.csv": "changed", "retracted.csv": "vanished",
                      "fixed.csv": "changed"}
    assert [(e["relative"], e["status"]) for e in ledger_lines(out)] == [("keep.csv", "scored")]
    assert {p.name.split(".")[0] for p in (out / "scores").iterdir()} == {"keep"}  # outputs and summaries
    assert not (out / "quarantine").exists()

    monkeypatch.setattr(landing_module, "score_files", real_score)
    again = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"], f["rows"]) for f in again["files"]] == [("fixed.csv", "scored", 400),
                                                                             ("rewritten.csv", "scored", 500)]


def test_landed_files_with_the_same_bytes_and_stem_each_get_their_own_output(trained_bundle, tmp_path, monkeypatch):
    """x.parquet and x.pq with identical bytes were both scored into x.<sha256[:12]>.parquet, with no
    word in the log: the ledger pointed both at it, and when x.pq was rewritten while scored,
    discarding its output deleted x.parquet's, which the ledger still recorded as scored."""
    import shutil

    import pandas as pd

    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    first = land_sensors(landing, "x.parquet", 60)
    for twin in ("x.pq", "y.parquet"):
        shutil.copy2(first, landing / twin)
    real_score = landing_module.score_files

    def re_exported_after_the_read(job):
        summary = real_score(job)
        if Path(job.inputs[0]).name == "x.pq":
            land_sensors(landing, "x.pq", 61, rows=200)
        return summary

    monkeypatch.setattr(landing_module, "score_files", re_exported_after_the_read)
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert {f["file"]: f["status"] for f in report["files"]} == {"x.parquet": "scored", "x.pq": "changed",
                                                                 "y.parquet": "scored"}
    monkeypatch.setattr(landing_module, "score_files", real_score)
    again = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"], f["rows"]) for f in again["files"]] == [("x.pq", "scored", 200)]

    recorded = {e["relative"]: Path(e["output"]) for e in ledger_lines(out)}
    assert sorted(recorded) == ["x.parquet", "x.pq", "y.parquet"]
    for relative, output in recorded.items():
        assert output.name.startswith(f"{relative}.") and output.exists(), output
    assert {relative: len(pd.read_parquet(output)) for relative, output in recorded.items()} == {
        "x.parquet": 300, "x.pq": 200, "y.parquet": 300}
    assert len(list((out / "scores").glob("*.parquet"))) == 3


def test_at_most_two_files_are_scored_at_once(trained_bundle, tmp_path, monkeypatch):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    for i in range(6):
        land_sensors(landing, f"f{i}.csv", 80 + i, rows=50)
    real_score = landing_module.score_files
    lock, running, peak = threading.Lock(), [0], [0]

    def counting(job):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        try:
            time.sleep(0.5)  # long enough for an unbounded pool to start them all
            return real_score(job)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(landing_module, "score_files", counting)
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [f["status"] for f in report["files"]] == ["scored"] * 6
    assert peak[0] == 2, f"{peak[0]} files were scored at once"


def test_two_landing_folders_can_not_share_one_output_folder(trained_bundle, tmp_path):
    """plantA and plantB served into one --output, both with a day.csv: the ledger keyed a file by its
    path inside the landing folder and its sha256, so plantB's day.csv (same bytes) was never scored,
    silently. The output folder now serves the landing folder of its first run, and refuses another."""
    import shutil

    plant_a, plant_b, out = tmp_path / "plantA", tmp_path / "plantB", tmp_path / "out"
    plant_a.mkdir(), plant_b.mkdir()
    shutil.copy2(land_sensors(plant_a, "day.csv", 90), plant_b / "day.csv")
    first = landing_flow(trained_bundle, plant_a, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"]) for f in first["files"]] == [("day.csv", "scored")]
    state = landing_flow(trained_bundle, plant_b, out, settle_seconds=0.0, device="cpu", return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"output folder {out} serves the landing folder {plant_a}, not {plant_b}: ")
    assert "own --output" in state.message and "\n" not in state.message
    assert [(e["relative"], e["status"]) for e in ledger_lines(out)] == [("day.csv", "scored")]
    assert (plant_b / "day.csv").exists()


def test_a_quarantine_that_fails_to_write_leaves_the_file_failed_and_the_others_recorded(trained_bundle, tmp_path):
    """The quarantine folder could not be written: the run ended with a traceback before recording the
    files it had scored, so every run scored them again and crashed again."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "a-good.csv", 91)
    land_sensors(landing, "c-good.csv", 92)
    settled(write_table(make_sensor_table(SyntheticSpec(n_rows=50, seed=93)).drop(columns="pressure"),
                        landing / "b-bad.csv"))
    out.mkdir()
    (out / "quarantine").write_text("a file in the way: as unwritable as a read-only folder, for root too")
    with pytest.raises(PipelineError, match=r"^1 landed file\(s\) could not be scored .*first: b-bad\.csv: .*could "
                                            r"not be quarantined"):
        landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    [report] = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert [(f["file"], f["status"]) for f in report["files"]] == [("a-good.csv", "scored"), ("b-bad.csv", "failed"),
                                                                  ("c-good.csv", "scored")]
    assert [(e["relative"], e["status"]) for e in ledger_lines(out)] == [
        ("a-good.csv", "scored"), ("b-bad.csv", "failed"), ("c-good.csv", "scored")]
    assert (landing / "b-bad.csv").exists()

    (out / "quarantine").unlink()  # fixed: the next run quarantines the bad file and scores nothing again
    again = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"]) for f in again["files"]] == [("b-bad.csv", "quarantined")]


def test_an_output_folder_that_cannot_be_written_fails_the_run_with_one_line(trained_bundle, tmp_path, monkeypatch,
                                                                            caplog):
    """The output folder turned unwritable after serve checked it (remounted read-only, permissions
    changed): every run ended with a PermissionError traceback from the run lock."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "day.csv", 94)

    def read_only(out_dir):
        raise PermissionError(errno.EROFS, "Read-only file system", str(out_dir / ".run.lock"))

    monkeypatch.setattr(landing_module, "run_lock", read_only)
    state = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu", return_state=True)
    assert state.is_failed()
    assert state.message.startswith(f"output folder {out} can't be written ([Errno 30] Read-only file system: ")
    assert "give another --output" in state.message
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [state.message]
    assert not any(r.exc_info or r.exc_text for r in errors)


def test_a_file_name_that_is_not_utf8_is_quarantined_once_and_shown_escaped(trained_bundle, tmp_path, monkeypatch):
    """`printf 'land/caf\\xe9.csv'`: its task failed (a 'failed' line), then the run crashed sending the
    name to Prefect in its artifact (UnicodeEncodeError), and so again every run."""
    import os

    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "ok.csv", 95)
    weird = os.fsdecode(bytes(landing / "caf") + b"\xe9.csv")
    land_sensors(landing, os.path.basename(weird), 96)
    published = []
    real_artifact = landing_module.create_markdown_artifact

    def keeping(**kwargs):
        published.append(kwargs["markdown"])
        return real_artifact(**kwargs)

    monkeypatch.setattr(landing_module, "create_markdown_artifact", keeping)
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"]) for f in report["files"]] == [("caf\udce9.csv", "quarantined"),
                                                                  ("ok.csv", "scored")]
    assert "| caf\\xe9.csv | quarantined |" in published[0] and "not UTF-8" in published[0]
    assert (out / "quarantine" / "caf\udce9.csv").exists() and sorted(os.listdir(landing)) == ["ok.csv"]
    assert landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")["files"] == []


def train_image_bundle(folder: Path, out: Path) -> Path:
    """A tiny bundle that scores images (70 gray 16x16 noise images, 2 epochs, target FPR 0.1): about 3 s."""
    import dataclasses

    import numpy as np
    from PIL import Image

    from pipeline.config import CalibrationConfig, ImageTrainJob
    from pipeline.image_workflow import run_image_training
    from tests.conftest import quiet_config

    rng = np.random.default_rng(0)
    for i in range(70):
        Image.fromarray(rng.integers(100, 140, (16, 16), dtype=np.uint8)).save(folder / f"{i}.png")
    config = dataclasses.replace(quiet_config(max_epochs=2), calibration=CalibrationConfig(target_fpr=0.1))
    return Path(run_image_training(ImageTrainJob(data=folder, name="parts", out_dir=out, image_size=16,
                                                 config=config))["bundle"])


def test_an_image_bundle_fails_the_run_in_one_line_before_a_file_is_read(tmp_path_factory, tmp_path):
    """Each landed table failed on the image bundle's missing table schema (a KeyError traceback), was
    retried, recorded 'failed', and the run blamed the device, the disk or permissions."""
    bundle = train_image_bundle(tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("exported"))
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    land_sensors(landing, "day.csv", 97)
    state = landing_flow(bundle, landing, out, settle_seconds=0.0, device="cpu", return_state=True)
    assert state.is_failed()
    assert state.message == (
        f"bundle parts ({bundle}) scores images; landing folders are scored with a table bundle (their *.csv, "
        f"*.csv.gz, *.parquet, *.pq files are tables): serve a bundle trained on a table, or score a folder of "
        f"images with `vaeguard score {bundle} FOLDER --output scores.parquet`")
    assert not out.exists() and [p.name for p in landing.iterdir()] == ["day.csv"]


def test_landed_files_with_long_names_are_scored_and_quarantined_under_names_that_fit(trained_bundle, tmp_path):
    """A legal name of 72 CJK characters (220 bytes) failed every run on ENAMETOOLONG, its temporary
    summary's name 260 bytes long, and was retried for ever; a bad file of 248 bytes could not be
    quarantined. Every name a run writes now fits in 255 bytes."""
    import os

    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    good, bad = "売上" * 36 + ".csv", "é" * 122 + ".csv"
    land_sensors(landing, good, 98)
    settled(write_table(make_sensor_table(SyntheticSpec(n_rows=50, seed=99)).drop(columns="pressure"),
                        landing / bad))
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert [(f["file"], f["status"]) for f in report["files"]] == [(bad, "quarantined"), (good, "scored")]
    written = [p for p in out.rglob("*") if p.is_file()]
    assert max(len(os.fsencode(p.name)) for p in written) <= 255
    [entry] = [e for e in ledger_lines(out) if e["status"] == "scored"]
    output = Path(entry["output"])
    assert output.is_file() and output.name.startswith("売上" * 30) and output.name.endswith(
        f".csv.{entry['sha256'][:12]}.parquet")
    [quarantined] = [e for e in ledger_lines(out) if e["status"] == "quarantined"]
    assert Path(quarantined["quarantined_to"]).is_file() and "pressure" in quarantined["reason"]
    assert os.listdir(landing) == [good]
    assert landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")["files"] == []


def test_a_small_far_out_file_alerts_and_a_one_row_file_says_what_was_not_judged(trained_bundle, tmp_path):
    """Before, a run under 100 rows never alerted: an hourly file of 90 rows, every one far out,
    was published as calm. A one-row run can reach neither limit: its artifact says so."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    far = make_sensor_table(SyntheticSpec(n_rows=90, seed=44))
    far["temperature"] = far["temperature"] + 1000
    settled(write_table(far, landing / "hour1.csv"))
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    assert report["alert"] and report["drift"]["alerts"][0].startswith("anomaly rate 100.00%")
    settled(write_table(make_sensor_table(SyntheticSpec(n_rows=1, seed=45)), landing / "hour2.csv"))
    report = landing_flow(trained_bundle, landing, out, settle_seconds=0.0, device="cpu")
    notes = report["drift"]["not_judged"]
    assert [n.split(":")[0] for n in notes] == ["anomaly rate not judged", "PSI not judged"] and not report["alert"]
    markdown = landing_module.run_markdown(report, 0.01)
    assert all(f"\n- {note}" in markdown for note in notes)
