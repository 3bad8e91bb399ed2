"""The landing flow in-process (temporary Prefect server): quarantine of bad files, drift alerts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from flows.landing import landing_flow
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
