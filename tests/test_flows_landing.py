"""Scheduled scoring of a landing folder, against real components: a `prefect server start`
process, `vaeguard serve` as a subprocess, SIGKILL mid-run, two overlapping runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import pandas as pd
import pytest

from pipeline.synthetic import SyntheticSpec, make_sensor_table, write_table

pytestmark = pytest.mark.slow

FLOW_SCRIPT = """
import sys
from flows.landing import landing_flow
landing_flow(bundle=sys.argv[1], watch=sys.argv[2], output=sys.argv[3], settle_seconds=0.0, device="cpu")
"""


def ledger_lines(out: Path) -> list[dict]:
    path = out / "ledger.jsonl"
    if not path.exists():
        return []
    lines = []
    for line in path.read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a torn last line of a killed run
    return lines


def run_reports(out: Path) -> list[dict]:
    """The flow's run reports, oldest first (their names are UTC stamps)."""
    return [json.loads(p.read_text()) for p in sorted((out / "runs").glob("*.json"))]


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def land(frame: pd.DataFrame, landing: Path, name: str) -> Path:
    """Write beside the landing folder's files under a hidden name, then rename: how uploads land."""
    hidden = write_table(frame, landing / f".{name}.partial{Path(name).suffix}")
    final = landing / name
    os.replace(hidden, final)
    os.utime(final, (time.time() - 60, time.time() - 60))  # settled
    return final


def landing_run(env: dict, bundle: Path, landing: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FLOW_SCRIPT, str(bundle), str(landing), str(out)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def assert_exactly_once(out: Path, landed: dict[str, int]) -> None:
    scored = [e for e in ledger_lines(out) if e["status"] == "scored"]
    keys = [(e["relative"], e["sha256"]) for e in scored]
    assert len(keys) == len(set(keys)), "a file was recorded twice"
    assert {e["relative"] for e in scored} == set(landed)
    outputs = sorted((out / "scores").rglob("*.parquet"))
    assert len(outputs) == len(landed), [p.name for p in outputs]
    assert sum(pd.read_parquet(p).shape[0] for p in outputs) == sum(landed.values())


def runs_begun_after(api_url: str, deployment: str, moment: float) -> list[str]:
    """Flow runs of a deployment that were handed to a process (Pending) or began (Running) after
    ``moment`` (epoch seconds), from their state histories in the API. A run's start_time is no
    help: the server stamps it on a run cancelled before it ever ran, too."""
    def api(path: str, body: dict | None = None):
        request = urllib.request.Request(f"{api_url}{path}", method="POST" if body is not None else "GET",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    begun = []
    for run in api("/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}}):
        for state in api(f"/flow_run_states/?flow_run_id={run['id']}"):
            at = datetime.fromisoformat(state["timestamp"]).timestamp()
            if state["type"] in ("PENDING", "RUNNING") and at > moment:
                begun.append(f"{run['name']}: {state['type']} at {state['timestamp']}")
    return begun


def test_serve_scores_a_dropped_file_once_and_stops_cleanly_on_sigterm(prefect_server, trained_bundle, tmp_path):
    """SIGTERM (kill, docker stop, a scheduler) reaches serve alone, not its runs' processes. Prefect's
    handler printed two tracebacks, skipped "vaeguard serve stopped", and runs handed to a process
    before the signal (the runner fetches them up to 10 s ahead) began after it."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    deployment = f"sigterm-{tmp_path.name}"
    serve = subprocess.Popen(
        [sys.executable, "-m", "pipeline.cli", "serve", str(trained_bundle), "--watch", str(landing),
         "--output", str(out), "--interval", "3", "--settle-seconds", "0.5", "--device", "cpu", "--name", deployment],
        env=prefect_server, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    output = ""
    try:
        land(make_sensor_table(SyntheticSpec(n_rows=500, seed=31)), landing, "batch-001.csv")
        # Watch the run reports, not the ledger (its line is written before the report). A served
        # flow that started late may run its missed schedules back to back, so the report that
        # scored the file need not be the newest by the time it is seen.
        wait_for(lambda: any(r["files"] for r in run_reports(out)), 150,
                 "a scheduled run to report the dropped file", poll=0.5)
        reports = run_reports(out)
        scored_at = next(i for i, r in enumerate(reports) if r["files"])
        assert [f["status"] for f in reports[scored_at]["files"]] == ["scored"]
        # Later scheduled runs find nothing new.
        wait_for(lambda: len(run_reports(out)) > scored_at + 1, 90, "a later scheduled run", 0.5)
        assert all(r["files"] == [] for r in run_reports(out)[scored_at + 1:])
        assert_exactly_once(out, {"batch-001.csv": 500})
        signalled = time.time()
        serve.send_signal(signal.SIGTERM)
        output, _ = serve.communicate(timeout=120)  # cancelling runs in flight is slow on a loaded machine
    finally:
        if serve.poll() is None:
            os.killpg(serve.pid, signal.SIGKILL)
            output = serve.communicate()[0]
        print(output[-5000:])  # shown by pytest when the test fails
    assert serve.returncode == 0
    assert "Traceback" not in output
    assert output.rstrip().endswith("vaeguard serve stopped")
    # Three seconds for the signal to be handled on loaded cores: a run whose process was starting may
    # just make it. Before, runs fetched up to 10 s ahead began at their times, 3 s apart, after it.
    assert runs_begun_after(prefect_server["PREFECT_API_URL"], deployment, signalled + 3.0) == []
    assert_exactly_once(out, {"batch-001.csv": 500})


def test_killed_run_resumes_without_loss_or_duplicates(prefect_server, trained_bundle, tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    landed = {}
    for i in range(24):
        land(make_sensor_table(SyntheticSpec(n_rows=4000, seed=100 + i)), landing, f"part-{i:02d}.parquet")
        landed[f"part-{i:02d}.parquet"] = 4000
    run = landing_run(prefect_server, trained_bundle, landing, out)
    scored_at_kill = wait_for(lambda: len(ledger_lines(out)), 180, "the first file to be recorded", poll=0.005)
    os.killpg(run.pid, signal.SIGKILL)
    run.wait()
    assert 1 <= scored_at_kill < len(landed), "the run finished before it could be killed mid-way"
    assert len(ledger_lines(out)) < len(landed)
    again = landing_run(prefect_server, trained_bundle, landing, out)
    output = again.communicate(timeout=300)[0].decode()
    assert again.returncode == 0, output[-3000:]
    assert_exactly_once(out, landed)


def test_overlapping_runs_never_score_a_file_twice(prefect_server, trained_bundle, tmp_path):
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    landed = {}
    for i in range(8):
        land(make_sensor_table(SyntheticSpec(n_rows=2000, seed=200 + i)), landing, f"f{i}.csv")
        landed[f"f{i}.csv"] = 2000
    runs = [landing_run(prefect_server, trained_bundle, landing, out) for _ in range(2)]
    for run in runs:
        output = run.communicate(timeout=300)[0].decode()
        assert run.returncode == 0, output[-3000:]
    assert_exactly_once(out, landed)


def test_sigterm_after_serving_ended_is_no_error():
    """SIGTERM landing after the served loop ended, before serve_landing put the previous handler
    back: the runner's handler raised RuntimeError ("Event loop is closed"), an unexpected error
    in place of "vaeguard serve stopped"."""
    import asyncio

    from flows.serve import StoppableRunner

    runner = StoppableRunner(name="ended")

    async def serve_briefly():
        runner._loop = asyncio.get_running_loop()  # as serve() does

    asyncio.run(serve_briefly())
    runner.handle_sigterm(signal.SIGTERM, None)
    assert runner._stopping is None
