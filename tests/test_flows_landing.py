"""Scheduled scoring of a landing folder, against real components: a `prefect server start`
process, `vaeguard serve` as a subprocess, SIGKILL mid-run, two overlapping runs."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.error
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
    begun = []
    for run in api_call(api_url, "/flow_runs/filter", {"deployments": {"name": {"any_": [deployment]}}}):
        for state in api_call(api_url, f"/flow_run_states/?flow_run_id={run['id']}"):
            at = datetime.fromisoformat(state["timestamp"]).timestamp()
            if state["type"] in ("PENDING", "RUNNING") and at > moment:
                begun.append(f"{run['name']}: {state['type']} at {state['timestamp']}")
    return begun


class ServeProcess:
    """`vaeguard serve BUNDLE --watch LANDING --output OUT OPTIONS` in its own process group, for a
    `with` block: stop() sends SIGTERM as a supervisor does and keeps what it printed; leaving the
    block kills it if it still runs, and prints its output's end (pytest shows it when a test fails)."""

    def __init__(self, env: dict, bundle: Path, landing: Path, out: Path, *options: str, cwd: Path | None = None):
        self.output = ""
        self.process = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", str(bundle), "--watch", str(landing), "--output", str(out),
             *options], env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def returncode(self) -> int | None:
        return self.process.returncode

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    def stop(self, timeout: float = 120) -> str:
        """SIGTERM, then its output once it ended (cancelling runs in flight is slow on a loaded machine)."""
        self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def wait(self, timeout: float) -> str:
        self.output = self.process.communicate(timeout=timeout)[0]
        return self.output

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        if self.process.stdout is not None and not self.process.stdout.closed:  # not read yet: it explains a failure
            self.output = self.process.communicate()[0]
        print(self.output[-5000:])


def test_serve_scores_a_dropped_file_once_and_stops_cleanly_on_sigterm(prefect_server, trained_bundle, tmp_path):
    """SIGTERM (kill, docker stop, a scheduler) reaches serve alone, not its runs' processes. Prefect's
    handler printed two tracebacks, skipped "vaeguard serve stopped", and runs handed to a process
    before the signal (the runner fetches them up to 10 s ahead) began after it."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    deployment = f"sigterm-{tmp_path.name}"
    with ServeProcess(prefect_server, trained_bundle, landing, out, "--interval", "3", "--settle-seconds", "0.5",
                      "--device", "cpu", "--name", deployment) as serve:
        land(make_sensor_table(SyntheticSpec(n_rows=500, seed=31)), landing, "batch-001.csv")
        # Watch the run reports, not the ledger (its line is written before the report). Later runs
        # may report before this one is seen, so the report that scored the file need not be the newest.
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
        output = serve.stop()
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


class HoldingProxy:
    """A TCP proxy in front of the Prefect API that holds the first request whose first bytes are
    ``hold`` until released: a moment of serve's set-up, reached for sure, with no sleeps. Bytes
    are passed as they come, so the runner's websockets work through it too."""

    def __init__(self, target_port: int, hold: bytes | None):
        import socket
        import threading

        self.target_port, self.hold = target_port, hold
        self.reached, self.release = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import threading

        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            upstream = self._connect()
            if upstream is None:
                client.close()
                continue
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _connect(self):
        import socket

        for _ in range(10):  # a server busy on a loaded machine may refuse a connection now and then
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=30)
            except OSError:
                time.sleep(1.0)
            else:
                upstream.settimeout(None)
                return upstream
        return None

    def _pump(self, source, sink, requests: bool):
        import socket

        try:
            while data := source.recv(65536):
                if requests and self.hold and data.startswith(self.hold) and not self.reached.is_set():
                    self.reached.set()
                    self.release.wait()
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self):
        self.release.set()
        self.listener.close()


def signal_bits(pid: int, field: str) -> int:
    """A signal mask from /proc/PID/status (SigCgt: signals with a handler; SigPnd/ShdPnd: pending)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1], 16)
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def api_call(api_url: str, path: str, body: dict | None = None, attempts: int = 5):
    """The Prefect API's JSON answer. A 503 is retried: the test server's SQLite answers it when a
    write times out on its lock (rolled back), as it did once on 2 busy CI cores."""
    for attempt in range(attempts):
        request = urllib.request.Request(f"{api_url}{path}", method="POST" if body is not None else "GET",
                                         data=json.dumps(body).encode() if body is not None else None,
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            if exc.code != 503 or attempt == attempts - 1:
                raise
            time.sleep(1.0 + attempt)


def api_get(api_url: str, path: str):
    try:
        return api_call(api_url, path)
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return None
        raise


TERM_BIT = 1 << (signal.SIGTERM - 1)


# Requests of serve's set-up, in order: the API check, the deployment's registration (Prefect's loop
# thread, while the main thread waits), the runner entering its client (its SIGTERM handler is in
# place, it has not started), its events websocket, and its first poll for runs (serving).
SETUP_MOMENTS = {
    "checks": None,  # as soon as vaeguard has its SIGTERM handler: reading the bundle, importing Prefect
    "api check": b"GET /api/health ",
    "registration": b"POST /api/deployments/ ",
    "runner entering its client": b"GET /api/admin/version ",
    "runner opening its events": b"GET /api/events/in ",
    "first poll": b"POST /api/deployments/get_scheduled_flow_runs ",
}


@pytest.mark.parametrize("moment", list(SETUP_MOMENTS))
def test_sigterm_at_any_moment_of_the_set_up_stops_serve_with_status_0_and_leaves_no_schedule_running(
        prefect_server, trained_bundle, tmp_path, moment):
    """A supervisor stops a service with SIGTERM. During serve's set-up that ended it with 143
    ("terminated") or 0 ("stopped") depending on the moment, and a signal while the runner set up
    its client left the deployment registered with its schedule running and nobody serving it."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    api_url = prefect_server["PREFECT_API_URL"]
    proxy = HoldingProxy(int(api_url.rsplit(":", 1)[1].split("/")[0]), SETUP_MOMENTS[moment])
    deployment = f"setup-{tmp_path.name}"
    through_proxy = {**prefect_server, "PREFECT_API_URL": f"http://127.0.0.1:{proxy.port}/api"}
    with ServeProcess(through_proxy, trained_bundle, landing, out, "--interval", "60", "--settle-seconds", "0",
                      "--device", "cpu", "--name", deployment) as serve, contextlib.closing(proxy):
        # Before vaeguard's own handler is in place, SIGTERM is Python's default: it kills the process.
        wait_for(lambda: signal_bits(serve.pid, "SigCgt") & TERM_BIT, 120, "vaeguard's SIGTERM handler")
        if SETUP_MOMENTS[moment] is not None:
            assert proxy.reached.wait(180), f"serve never reached the {moment}"
        serve.send_signal(signal.SIGTERM)
        # Released only once the signal has reached the process, so it lands while the request is held.
        wait_for(lambda: not (signal_bits(serve.pid, "SigPnd") | signal_bits(serve.pid, "ShdPnd")) & TERM_BIT, 30,
                 "the signal to be delivered")
        proxy.release.set()
        output = serve.wait(timeout=120)
    assert serve.returncode == 0
    assert "Traceback" not in output and "error:" not in output
    assert output.rstrip().endswith("vaeguard serve stopped")
    registered = api_get(api_url, f"/deployments/name/vaeguard-landing/{deployment}")
    if moment == "api check":
        assert registered is None
    elif moment == "checks":  # on a slow machine the signal may come later than meant
        assert registered is None or registered["paused"] is True, registered
    else:
        assert registered is not None and registered["paused"] is True, registered


def test_a_deployment_run_given_bad_parameters_fails_with_the_line_serve_prints_and_touches_nothing(
        prefect_server, trained_bundle, tmp_path):
    """A person starts the served deployment by hand with other parameters (`prefect deployment run
    ... --param device=tpu`, the UI, the API). The runs ended Failed("Flow run encountered an
    exception: ConfigError: ..."), with a traceback in their logs; `watch=` (empty) was turned into
    the folder serve was started in, whose tables the run scored and quarantined (moved away)."""
    from pipeline.config import LandingJob
    from pipeline.errors import ConfigError

    landing, out, here = tmp_path / "landing", tmp_path / "out", tmp_path / "where-serve-was-started"
    landing.mkdir(), here.mkdir()
    notes = write_table(make_sensor_table(SyntheticSpec(n_rows=50, seed=32)).drop(columns="pressure"),
                        here / "notes.csv")
    os.utime(notes, (time.time() - 60, time.time() - 60))
    api_url, deployment = prefect_server["PREFECT_API_URL"], f"by-hand-{tmp_path.name}"
    with ServeProcess({**prefect_server, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, trained_bundle,
                      landing, out, "--cron", "0 0 1 1 *", "--device", "cpu", "--name", deployment, cwd=here) as serve:
        registered = wait_for(lambda: api_get(api_url, f"/deployments/name/vaeguard-landing/{deployment}"), 180,
                              "the deployment to be registered", poll=0.5)
        served = {"bundle": str(trained_bundle), "watch": str(landing), "output": str(out), "device": "cpu"}
        expected = {}
        for bad in ({"watch": ""}, {"device": "tpu"}, {"settle_seconds": -5}, {"bundle": "exported/sensors"}):
            with pytest.raises(ConfigError) as refused:
                LandingJob(**{**served, **bad})  # what `vaeguard serve` says of the same value
            run = api_call(api_url, f"/deployments/{registered['id']}/create_flow_run", {"parameters": bad})
            expected[run["id"]] = str(refused.value)
        missing = api_call(api_url, f"/deployments/{registered['id']}/create_flow_run",
                           {"parameters": {"watch": str(tmp_path / "nowhere")}})
        expected[missing["id"]] = f"landing folder {tmp_path / 'nowhere'} does not exist; create it or fix the path"
        # A wrong type is Prefect's to refuse, when the run is created, and its message says it plainly.
        with pytest.raises(urllib.error.HTTPError) as conflict:
            api_call(api_url, f"/deployments/{registered['id']}/create_flow_run",
                     {"parameters": {"settle_seconds": "abc"}})
        assert conflict.value.code == 409
        assert "'abc' is not of type 'number'" in conflict.value.read().decode()

        states = wait_for(lambda: final_states(api_url, expected), 240, "the runs to end", poll=1.0)
        serve.stop()
    assert_failed_with_one_line(api_url, states, expected)
    assert notes.exists() and not (out / "quarantine").exists()
    assert serve.returncode == 0


def test_a_deployment_run_given_an_unknown_parameter_fails_with_one_line_naming_it_and_what_the_flow_takes(
        prefect_server, trained_bundle, tmp_path):
    """A misspelt key sent through the API (a raw POST, Python's `run_deployment`) passes the server,
    which checks the types of the parameters the flow has and lets other keys through. Prefect's
    engine refused it only as the run started, before the flow's own checks: the run ended Crashed
    ("Process exited with status code: 1"), its traceback in serve's output and none in its logs."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    api_url, deployment = prefect_server["PREFECT_API_URL"], f"misspelt-{tmp_path.name}"
    with ServeProcess(prefect_server, trained_bundle, landing, out, "--cron", "0 0 1 1 *", "--device", "cpu",
                      "--name", deployment) as serve:
        registered = wait_for(lambda: api_get(api_url, f"/deployments/name/vaeguard-landing/{deployment}"), 180,
                              "the deployment to be registered", poll=0.5)
        # The UI's form for a run by hand: the flow's parameters, and no catch-all beside them.
        schema = registered["parameter_openapi_schema"]
        takes = ["bundle", "watch", "output", "settle_seconds", "device", "batch_size", "rate_p_value", "max_psi"]
        assert (list(schema["properties"]), schema["required"]) == (takes, ["bundle", "watch", "output"])
        takes_line = f"the landing flow takes {', '.join(takes)}"
        expected = {}
        for unknown, message in (
                ({"wach": str(tmp_path)}, f"unknown parameter 'wach' (did you mean 'watch'?): {takes_line}; rename or "
                                          f"remove it in the run's parameters"),
                ({"colour": "red", "batchsize": 10},
                 f"unknown parameters 'batchsize' (did you mean 'batch_size'?), 'colour': {takes_line}; rename or "
                 f"remove them in the run's parameters")):
            run = api_call(api_url, f"/deployments/{registered['id']}/create_flow_run", {"parameters": unknown})
            expected[run["id"]] = message
        states = wait_for(lambda: final_states(api_url, expected), 240, "the runs to end", poll=1.0)
        output = serve.stop()
    assert_failed_with_one_line(api_url, states, expected)
    assert "Traceback" not in output
    assert serve.returncode == 0
    assert list(landing.iterdir()) == [] and not out.exists()


def final_states(api_url: str, run_ids) -> dict | None:
    """The runs' states once every one has ended, else None."""
    states = {run_id: api_get(api_url, f"/flow_runs/{run_id}")["state"] for run_id in run_ids}
    return states if all(s["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") for s in states.values()) \
        else None


def assert_failed_with_one_line(api_url: str, states: dict, expected: dict[str, str]) -> None:
    """Each run ended Failed with its expected line as the state message and its one ERROR log, no traceback."""
    for run_id, message in expected.items():
        assert (states[run_id]["type"], states[run_id]["message"]) == ("FAILED", message)
        logs = api_call(api_url, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run_id]}}})
        assert [entry["message"] for entry in logs if entry["level"] >= logging.ERROR] == [message]
        assert not any("Traceback" in entry["message"] for entry in logs)


def test_a_second_serve_of_a_served_deployment_is_refused_and_one_after_a_kill_takes_over(
        prefect_server, trained_bundle, tmp_path):
    """Two landing folders served with one bundle get the same default deployment name. The second
    serve re-registered it with its own folders, so the first one's runs scored the second folder
    and its own was never scored again; and whichever stopped first paused the other's schedule,
    leaving it serving nothing, with no word. A serve killed with SIGKILL (out of memory), which
    could not pause its schedule, must not keep a restart from serving."""
    api_url, deployment = prefect_server["PREFECT_API_URL"], f"shared-{tmp_path.name}"

    def serve(folder: str) -> ServeProcess:
        (tmp_path / folder).mkdir(exist_ok=True)
        # Each its own PREFECT_HOME, as on two machines: on one, the second is refused by the first's
        # lock before it asks the API (tests/test_serve.py); this is the check across machines.
        env = {**prefect_server, "PREFECT_HOME": str(tmp_path / f"{folder}-home")}
        return processes.enter_context(ServeProcess(env, trained_bundle, tmp_path / folder,
                                                    tmp_path / f"{folder}-out", "--interval", "3600", "--device", "cpu",
                                                    "--name", deployment))

    def served_by(folder: str, asked_after: str | None = None):
        found = api_get(api_url, f"/deployments/name/vaeguard-landing/{deployment}")
        return (found is not None and not found["paused"] and found["parameters"]["watch"] == str(tmp_path / folder)
                and found["last_polled"] is not None and found["last_polled"] != asked_after and found)

    with contextlib.ExitStack() as processes:
        first = serve("plant1")
        asked = wait_for(lambda: served_by("plant1"), 180, "the first serve to poll", poll=0.5)["last_polled"]
        wait_for(lambda: served_by("plant1", asked), 60, "the first serve to poll again", poll=0.5)
        second = serve("plant2")
        assert second.wait(timeout=180) and second.returncode == 1, second.output
        assert second.output.rstrip().splitlines()[-1] == (
            f"error: deployment 'vaeguard-landing/{deployment}' is served already (scoring {tmp_path / 'plant1'} into "
            f"{tmp_path / 'plant1-out'}): a runner asks for its runs; two serves of one deployment take each other's "
            f"parameters and pause each other's schedule, so stop that `vaeguard serve` first, or give this one its "
            f"own --name (the default is vaeguard-<bundle name>)")
        assert served_by("plant1")  # the first one's folders, schedule on

        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
        after_kill = serve("plant2")
        wait_for(lambda: served_by("plant2"), 180, "the serve started after the kill to serve", poll=0.5)
        after_kill.stop()
        assert after_kill.returncode == 0, after_kill.output
