"""`vaeguard serve`'s checks of a run's parameters, without a server (tests/test_flows_landing.py
serves for real)."""

import asyncio
import logging
import uuid
from types import SimpleNamespace

import httpx
import pytest

import flows.serve as serve
from flows.landing import check_parameter_names
from flows.serve import check_api
from pipeline.errors import ConfigError


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
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: url}), pytest.raises(ConfigError) as refused:
        check_api(timeout=2.0)
    assert str(refused.value).startswith(f"no Prefect API at PREFECT_API_URL={url} (") and fix in str(refused.value)
