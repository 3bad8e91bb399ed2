"""`vaeguard serve`'s checks of a run's parameters and of the Prefect API, without a server, and
what it does with missed runs and with a second serve of one deployment, with one (the helpers
of tests/test_flows_landing.py, which serves for real)."""

import asyncio
import contextlib
import http.server
import json
import logging
import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace

import httpx
import pytest
from prefect.settings import PREFECT_API_URL, PREFECT_HOME, temporary_settings

import flows.serve as serve
from flows.landing import check_parameter_names
from flows.serve import check_api, served_here
from pipeline.errors import ConfigError
from tests.conftest import free_port
from tests.test_flows_landing import (HoldingProxy, ServeProcess, api_call, api_get, final_states, runs_begun_after,
                                      wait_for)


def test_parameter_names_name_the_unknown_ones_and_the_nearest():
    check_parameter_names({"watch": "/in", "output": "/out", "max_psi": 0.3})
    with pytest.raises(ConfigError, match=r"^unknown parameter 'wach' \(did you mean 'watch'\?\): the landing flow "
                                          r"takes bundle, watch, output, .*; rename or remove it in the run's "
                                          r"parameters$"):
        check_parameter_names({"wach": "/in", "output": "/out"})


def run(proposer, parameters) -> bool:
    return asyncio.run(proposer.propose_pending(SimpleNamespace(id=uuid.uuid4(), parameters=parameters)))


def test_a_run_with_an_unknown_parameter_is_not_started_when_the_api_is_down(monkeypatch, caplog):
    """Failing the run is one more API call: unanswered, it raised out of the poller (Prefect then
    logged "Failed to submit flow run" with a traceback) and logged the run's ERROR at every poll."""
    async def unreachable(*args, **kwargs):
        raise httpx.ConnectError("All connection attempts failed")

    monkeypatch.setattr(serve, "propose_state", unreachable)
    monkeypatch.setattr(serve, "flow_run_logger", lambda **kw: pytest.fail("logged before the run failed"))
    with caplog.at_level(logging.WARNING):
        assert run(serve.NamesCheckedProposer(client=None), {"wach": "/in"}) is False
    [said] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "(All connection attempts failed); it stays scheduled: unknown parameter 'wach'" in said


def test_a_run_with_an_unknown_parameter_fails_with_its_line_and_one_error_log(monkeypatch):
    proposed, logged = [], []

    async def accept(client, state, flow_run_id):
        proposed.append((state.type.value, state.message))
        return state

    monkeypatch.setattr(serve, "propose_state", accept)
    monkeypatch.setattr(serve, "flow_run_logger",
                        lambda **kw: SimpleNamespace(error=lambda fmt, message: logged.append(message)))
    assert run(serve.NamesCheckedProposer(client=None), {"wach": "/in"}) is False
    line = logged[0]
    assert line.startswith("unknown parameter 'wach' (did you mean 'watch'?)") and logged == [line]
    assert proposed == [("FAILED", line)]


@pytest.mark.parametrize("url, fix", [
    ("http://127.0.0.1:99999/api", "start the Prefect server it should name, or correct PREFECT_API_URL"),
    ("https://localhost/api", "start the Prefect server at localhost, or correct PREFECT_API_URL"),
    ("http://[::1]:1/api", "start one with `prefect server start --host ::1 --port 1`"),
])
def test_no_api_is_one_line_whatever_the_url(url, fix):
    """A port out of range raised ValueError while this very line was written: "unexpected ValueError"."""
    with temporary_settings(updates={PREFECT_API_URL: url}), pytest.raises(ConfigError) as refused:
        check_api(timeout=2.0, wait=0)
    assert str(refused.value).startswith(f"no Prefect API at PREFECT_API_URL={url} (") and fix in str(refused.value)


class Health(http.server.BaseHTTPRequestHandler):
    """The one answer of a Prefect API that check_api asks for."""

    def do_GET(self):
        self.send_response(200 if self.path == "/api/health" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"true")

    def log_message(self, *args):
        pass


def test_the_api_check_waits_for_a_server_that_starts_a_moment_later_saying_so_once(capsys):
    """A system unit starts serve at boot right after the Prefect server, which answers about 10 s
    after it starts: the one check found the port closed, and serve failed."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    servers = []

    def start_later():
        time.sleep(2.5)  # the first check tries for 1.5 s (httpcore's 3 connection attempts in Prefect's client)
        servers.append(http.server.HTTPServer(("127.0.0.1", port), Health))
        servers[0].serve_forever(poll_interval=0.1)

    threading.Thread(target=start_later, daemon=True).start()
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            check_api(timeout=2.0, wait=20.0)
    finally:
        wait_for(lambda: servers, 10, "the server thread")
        servers[0].shutdown()
        servers[0].server_close()
    said = capsys.readouterr().out.splitlines()
    assert len(said) == 1 and said[0].startswith(f"no Prefect API at PREFECT_API_URL={url} yet (")
    assert said[0].endswith("): waiting up to 20 s for it to start")


def test_an_api_that_never_starts_is_the_same_one_line_after_the_wait(capsys):
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    began = time.monotonic()
    with temporary_settings(updates={PREFECT_API_URL: url}), pytest.raises(ConfigError) as refused:
        check_api(timeout=2.0, wait=1.0)
    assert 1.0 <= time.monotonic() - began < 10
    port = url.split(":")[2].split("/")[0]
    assert str(refused.value) == (f"no Prefect API at PREFECT_API_URL={url} ([Errno 111] Connection refused); start "
                                  f"one with `prefect server start --host 127.0.0.1 --port {port}` (a server answers "
                                  f"about 10 s after it starts), or correct PREFECT_API_URL")
    said = capsys.readouterr().out
    assert said == (f"no Prefect API at PREFECT_API_URL={url} yet ([Errno 111] Connection refused): waiting up to 1 s "
                    f"for it to start\n")


def test_one_serve_of_a_deployment_per_api_on_a_machine(tmp_path):
    """The lock that keeps a second serve of a deployment out, even one started at the same instant
    (test_two_serves_of_one_deployment_started_at_once_serve_it_once serves for real)."""
    @contextlib.contextmanager
    def lock(url: str, name: str, home=tmp_path):
        with temporary_settings(updates={PREFECT_API_URL: url, PREFECT_HOME: home}), served_here(name):
            yield

    with lock("http://127.0.0.1:4200/api", "vaeguard-landing/plant"):
        for same in ("http://127.0.0.1:4200/api", "http://localhost:4200/api/"):
            with pytest.raises(ConfigError) as refused, lock(same, "vaeguard-landing/plant"):
                pass
            assert str(refused.value).startswith(
                f"deployment 'vaeguard-landing/plant' is served already (by process {os.getpid()} on this machine): "
                f"it holds the lock {tmp_path / 'vaeguard-serve'}/")
            assert str(refused.value).endswith("or give this one its own --name (the default is "
                                               "vaeguard-<bundle name>)")
        with lock("http://127.0.0.1:4200/api", "vaeguard-landing/other"), lock("http://127.0.0.1:4201/api",
                                                                                "vaeguard-landing/plant"):
            pass
        # A home it cannot write (a service's read-only one) leaves the check of the API alone.
        (tmp_path / "file").write_text("")
        with lock("http://127.0.0.1:4200/api", "vaeguard-landing/plant", home=tmp_path / "file"):
            pass
    with lock("http://127.0.0.1:4200/api", "vaeguard-landing/plant"):
        pass  # let go at the end of the block


@pytest.mark.slow
def test_runs_that_piled_up_while_serve_was_down_run_once_and_the_older_ones_end_cancelled_saying_why(
        prefect_server, trained_bundle, tmp_path):
    """A serve that had no chance to pause its schedule (killed, out of memory, the power cut) left
    it on, and the server went on making runs. On restart they all ran, oldest first, five at a
    time, each finding nothing new: catch up once, with the newest; a run made by hand still runs."""
    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    api_url, deployment = prefect_server["PREFECT_API_URL"], f"missed-{tmp_path.name}"
    now = datetime.now(timezone.utc)
    start = now - timedelta(hours=5, minutes=30)
    parameters = {"bundle": str(trained_bundle), "watch": str(landing), "output": str(out), "settle_seconds": 0,
                  "device": "cpu"}
    # The deployment as an hourly serve killed five and a half hours ago left it, with the runs made since.
    flow = api_call(api_url, "/flows/", {"name": "vaeguard-landing"})
    registered = api_call(api_url, "/deployments/", {
        "name": deployment, "flow_id": flow["id"], "parameters": parameters,
        "schedules": [{"schedule": {"interval": 3600, "anchor_date": start.isoformat()}, "active": True}]})
    api_call(api_url, f"/deployments/{registered['id']}/schedule",
             {"start_time": start.isoformat(), "end_time": now.isoformat(), "min_runs": 100})
    by_hand = api_call(api_url, f"/deployments/{registered['id']}/create_flow_run", {"state": {
        "type": "SCHEDULED", "state_details": {"scheduled_time": (now - timedelta(hours=2)).isoformat()}}})
    missed = sorted((run for run in api_call(api_url, "/flow_runs/filter",
                                             {"flow_runs": {"deployment_id": {"any_": [registered["id"]]}}})
                     if run["auto_scheduled"]), key=lambda run: run["expected_start_time"])
    assert len(missed) == 6
    newest = missed[-1]
    with ServeProcess(prefect_server, trained_bundle, landing, out, "--interval", "3600", "--settle-seconds", "0",
                      "--device", "cpu", "--name", deployment) as serve_process:
        states = wait_for(lambda: final_states(api_url, [run["id"] for run in missed] + [by_hand["id"]]), 240,
                          "the missed runs to end", poll=1.0)
        output = serve_process.stop()
    assert serve_process.returncode == 0
    due_at = datetime.fromisoformat(newest["expected_start_time"]).strftime("%Y-%m-%d %H:%M:%S UTC")
    skipped = (f"skipped: missed its time, and a later scheduled run, '{newest['name']}' (due {due_at}), runs once in "
               f"its place; a landing run scores all that landed since the last one")
    assert [(states[run["id"]]["type"], states[run["id"]]["message"]) for run in missed[:-1]] == \
        [("CANCELLED", skipped)] * 5
    assert states[newest["id"]]["type"] == states[by_hand["id"]]["type"] == "COMPLETED"
    assert {begun.split(":")[0] for begun in runs_begun_after(api_url, deployment, 0)} == {newest["name"],
                                                                                          by_hand["name"]}
    assert output.count(f"5 scheduled runs missed their time: skipping them; the newest, '{newest['name']}' (due "
                        f"{due_at}), runs once in their place") == 1


@pytest.mark.slow
def test_two_serves_of_one_deployment_started_at_once_serve_it_once(prefect_server, trained_bundle, tmp_path):
    """Both asked the API before either had registered the deployment, found it unserved, and both
    served it: the second's parameters for both, and the first to stop paused the other's schedule.
    Here the first serve is held as it registers, so the second comes at that very moment."""
    api_url, deployment = prefect_server["PREFECT_API_URL"], f"at-once-{tmp_path.name}"
    proxy = HoldingProxy(int(api_url.rsplit(":", 1)[1].split("/")[0]), b"POST /api/deployments/ ")
    through_proxy = {**prefect_server, "PREFECT_API_URL": f"http://127.0.0.1:{proxy.port}/api"}

    def serve_at(folder: str) -> ServeProcess:
        (tmp_path / folder).mkdir()
        return processes.enter_context(ServeProcess(through_proxy, trained_bundle, tmp_path / folder,
                                                    tmp_path / f"{folder}-out", "--interval", "3600", "--device",
                                                    "cpu", "--name", deployment))

    with contextlib.ExitStack() as processes, contextlib.closing(proxy):
        first = serve_at("plant1")
        assert proxy.reached.wait(180), "the first serve never registered"
        second = serve_at("plant2")
        second.wait(timeout=180)
        assert second.returncode == 1
        assert second.output.rstrip().splitlines()[-1].startswith(
            f"error: deployment 'vaeguard-landing/{deployment}' is served already (by process {first.pid} on this "
            f"machine): it holds the lock ")
        proxy.release.set()
        wait_for(lambda: (found := api_get(api_url, f"/deployments/name/vaeguard-landing/{deployment}"))
                 and found["last_polled"] and found["parameters"]["watch"] == str(tmp_path / "plant1"), 180,
                 "the first serve to serve", poll=0.5)
        first.stop()
    assert first.returncode == 0, first.output


def serve_argv(bundle, watch, out, *options) -> list:
    return ["serve", bundle, "--watch", watch, "--output", out, "--interval", "60", *options]


def test_a_second_serve_of_another_landing_folder_into_one_output_folder_is_refused_at_once(
        trained_bundle, tmp_path, monkeypatch, capsys):
    """The first run claimed the output folder, and only then: a second serve started before it
    passed every check, and each of its runs failed on the claim. Here the second comes while the
    first serves (Prefect's part stood in for), before any run."""
    from tests.conftest import run_main

    plant_a, plant_b, out = tmp_path / "plantA", tmp_path / "plantB", tmp_path / "out"
    plant_a.mkdir(), plant_b.mkdir()
    served, seen = [], {}

    def serving(job, bundle_name):  # what is seen here is asserted after: the CLI catches every error
        served.append(job.landing.watch)
        if job.landing.watch == plant_a and not seen:  # the first serve, serving
            seen["claim"] = json.loads((out / "landing.json").read_text())["watch"]
            seen["before"] = {p.name: p.read_bytes() for p in out.iterdir()}
            seen["second"] = run_main(capsys, *serve_argv(trained_bundle, plant_b, out, "--name", "plant-b"))
            seen["after"] = {p.name: p.read_bytes() for p in out.iterdir()}
            # The usual restart of the same landing folder (a serve of it under another name here) goes on.
            seen["again"] = run_main(capsys, *serve_argv(trained_bundle, plant_a, out, "--name", "plant-a2"))

    monkeypatch.setattr(serve, "serve_landing", serving)
    code, _, err = run_main(capsys, *serve_argv(trained_bundle, plant_a, out))
    assert (code, err) == (0, "")
    assert seen["claim"] == str(plant_a)  # claimed from the start
    assert seen["second"][::2] == (1, (
        f"error: output folder {out} serves the landing folder {plant_a}, not {plant_b}: its ledger keys files by "
        f"their path inside the landing folder, so a file with the same name in both would be scored once; give each "
        f"landing folder its own --output (and its own --name), or, if the landing folder moved, delete "
        f"{out / 'landing.json'}\n"))
    assert seen["after"] == seen["before"]  # the refused serve left nothing
    assert seen["again"][::2] == (0, "") and served == [plant_a, plant_a]
    assert not out.exists()  # stopped before any run: the claim and the folder it made are taken back


def test_a_serve_restarted_on_its_landing_folder_keeps_its_claim_and_ledger(trained_bundle, tmp_path, monkeypatch,
                                                                           capsys):
    from pipeline.landing import claim_output
    from tests.conftest import run_main

    landing, out = tmp_path / "landing", tmp_path / "out"
    landing.mkdir()
    out.mkdir()
    claim_output(out, landing)  # as an earlier serve's runs left it
    (out / "ledger.jsonl").write_text("")
    claim = (out / "landing.json").read_bytes()
    served = []
    monkeypatch.setattr(serve, "serve_landing", lambda job, name: served.append(job.landing.watch))
    code, _, err = run_main(capsys, *serve_argv(trained_bundle, landing, out))
    assert (code, err) == (0, "")
    assert served == [landing]
    assert (out / "landing.json").read_bytes() == claim
    assert {p.name for p in out.iterdir()} - {".run.lock"} == {"landing.json", "ledger.jsonl"}


def test_a_serve_refused_after_claiming_leaves_no_output_folder(trained_bundle, tmp_path, capsys):
    from tests.conftest import run_main

    (tmp_path / "landing").mkdir()
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    with temporary_settings(updates={PREFECT_API_URL: url}):
        code, _, err = run_main(capsys, *serve_argv(trained_bundle, tmp_path / "landing", tmp_path / "new" / "out",
                                                    "--api-wait", "0"))
    assert code == 1 and err.startswith(f"error: no Prefect API at PREFECT_API_URL={url} (") and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landing"]


def test_a_run_holding_the_output_folder_has_its_claim_judged(tmp_path):
    """A run takes the run lock, then claims: serve waits for that claim rather than the lock,
    which a run holds as long as it scores."""
    from pipeline.landing import claim_output, output_claimed, run_lock

    plant_a, plant_b, out = tmp_path / "plantA", tmp_path / "plantB", tmp_path / "out"
    with run_lock(out) as acquired:
        assert acquired
        threading.Timer(0.3, claim_output, (out, plant_a)).start()  # the run's claim, a moment after its lock
        began = time.monotonic()
        with pytest.raises(ConfigError, match=f"serves the landing folder {plant_a}, not {plant_b}"):
            with output_claimed(out, plant_b):
                pytest.fail("served")
        assert 0.3 <= time.monotonic() - began < 3
        with output_claimed(out, plant_a):
            pass
    assert sorted(p.name for p in out.iterdir()) == [".run.lock", "landing.json"]  # the run's claim stays


def test_serve_device_cuda_where_cuda_is_not_active_is_refused_before_prefect(trained_bundle, tmp_path,
                                                                             monkeypatch, capsys):
    """Each scheduled run failed on it instead, file after file. The line is `vaeguard score`'s."""
    from pipeline.bundle import Bundle
    from pipeline.errors import DeviceError
    from pipeline.runtime import create_session
    from tests.conftest import run_main

    bundle = Bundle.load(trained_bundle)
    try:
        create_session(bundle.scorer_path, "cuda", threads=1)
    except DeviceError as exc:
        expected = f"error: {exc}\n"
    else:
        pytest.skip("CUDA is active here")
    (tmp_path / "landing").mkdir()
    monkeypatch.setattr(serve, "serve_landing", lambda job, name: pytest.fail("served"))
    code, _, err = run_main(capsys, *serve_argv(trained_bundle, tmp_path / "landing", tmp_path / "out",
                                                "--device", "cuda"))
    assert (code, err) == (1, expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landing"]


def test_an_output_folder_that_cannot_take_the_claim_is_one_line_and_left_as_found(tmp_path, monkeypatch):
    import errno

    import pipeline.landing
    from pipeline.landing import output_claimed

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pipeline.landing, "write_atomic", full)
    out = tmp_path / "new" / "out"
    with pytest.raises(ConfigError, match=rf"^output folder {out} can't be written \(\[Errno 28\] No space left on "
                                          rf"device\); expected a folder this user can write: .* another --output$"):
        with output_claimed(out, tmp_path / "landing"):
            pytest.fail("served")
    assert list(tmp_path.iterdir()) == []


def test_serve_refuses_an_image_bundle_in_one_line_before_prefect(tmp_path_factory, tmp_path, monkeypatch, capsys):
    """Served, every run failed each landed table on the image bundle's missing table schema, and
    blamed the device, the disk or permissions."""
    from tests.conftest import run_main
    from tests.test_flows_landing_faults import train_image_bundle

    bundle = train_image_bundle(tmp_path_factory.mktemp("images"), tmp_path_factory.mktemp("exported"))
    (tmp_path / "landing").mkdir()
    monkeypatch.setattr(serve, "serve_landing", lambda job, name: pytest.fail("served"))
    code, _, err = run_main(capsys, *serve_argv(bundle, tmp_path / "landing", tmp_path / "out"))
    assert (code, err) == (1, f"error: bundle parts ({bundle}) scores images; landing folders are scored with a table "
                              f"bundle (their *.csv, *.csv.gz, *.parquet, *.pq files are tables): serve a bundle "
                              f"trained on a table, or score a folder of images with `vaeguard score {bundle} FOLDER "
                              f"--output scores.parquet`\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["landing"]
