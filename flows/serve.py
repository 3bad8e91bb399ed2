"""`vaeguard serve`: the landing flow served as a Prefect deployment on a schedule, until Ctrl-C
or SIGTERM.

Before anything is registered, the schedule and the Prefect API are checked, so a mistake is
one line. Then Prefect's Runner serves the deployment; ``StoppableRunner`` makes both signals
stop it the way Prefect means to (its own SIGTERM handling does not, in 3.8.8), fails a run
given a parameter the flow does not take with one line, where Prefect's engine crashed on it,
and runs scheduled runs that missed their time once, not each in turn (``CatchUpOncePoller``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

import anyio
import httpx
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (FlowRunFilter, FlowRunFilterDeploymentId,
                                            FlowRunFilterNextScheduledStartTime, FlowRunFilterState,
                                            FlowRunFilterStateType)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.client.schemas.schedules import CronSchedule
from prefect.client.schemas.sorting import FlowRunSort
from prefect.deployments.runner import EntrypointType
from prefect.exceptions import Abort, ObjectNotFound
from prefect.logging.loggers import flow_run_logger
from prefect.runner import Runner
from prefect.runner._scheduled_run_poller import ScheduledRunPoller
from prefect.runner._state_proposer import StateProposer
from prefect.settings import get_current_settings
from prefect.states import Cancelled, Failed
from prefect.utilities.engine import propose_state

from flows.landing import check_parameter_names, landing_flow
from pipeline.config import ServeJob
from pipeline.errors import ConfigError, one_line
from pipeline.landing import LOCK_NAME, run_lock
from pipeline.signals import signals_held

# How long `vaeguard serve` waits for the Prefect API's health check before saying it is unreachable.
API_CHECK_SECONDS = 5.0
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def serve_landing(job: ServeJob, bundle_name: str) -> None:
    """Serve landing_flow as a deployment on the job's schedule until Ctrl-C or SIGTERM.

    The schedule and the Prefect API are checked first, so a mistake is one line before anything
    is registered or started, and so is a deployment another serve serves. A signal once serving
    stops the runner, and this returns; one that comes earlier raises KeyboardInterrupt, after
    pausing the schedule if it was registered. Either way the deployment is left paused, as
    Prefect's own stop leaves it.
    """
    if job.cron is not None:
        check_cron(job.cron)
    check_api(wait=job.api_wait)
    name = job.deployment_name(bundle_name)
    with served_here(f"{landing_flow.name}/{name}"):  # to the end: the schedule is paused under it
        check_not_served(f"{landing_flow.name}/{name}")
        _serve_deployment(job, name)


def _serve_deployment(job: ServeJob, name: str) -> None:
    """Register the deployment and serve it until a signal; its schedule is paused after."""
    runner = StoppableRunner(name=name)
    deployment_id = None
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}  # the runner replaces them
    try:
        # Held over the registration, which runs in Prefect's loop thread: a signal that unwound the
        # wait for it would not stop it, and the deployment it registers would go unpaused.
        with signals_held():
            # Runs of one deployment never overlap on a folder: the flow also takes a file lock.
            deployment_id = runner.add_flow(landing_flow, name=name, cron=job.cron, interval=job.interval,
                                            parameters=job.landing.parameters(),
                                            entrypoint_type=EntrypointType.MODULE_PATH)
        every = f"cron {job.cron!r}" if job.cron is not None else f"every {job.interval:g} s"
        print(f"serving deployment '{landing_flow.name}/{name}' ({every}): files landing in {job.landing.watch} "
              f"are scored into {job.landing.output}; Ctrl-C or SIGTERM stops it", flush=True)
        asyncio.run(runner.serve())
    finally:
        with stop_signals_ignored(then=previous):
            runner.undo_unfinished_start(deployment_id)


@contextlib.contextmanager
def stop_signals_ignored(then: dict) -> Iterator[None]:
    """Ctrl-C and SIGTERM do nothing in the block, and get the handlers ``then`` after it.

    Stopping already: one more signal must not cut the stop short and leave the schedule running.
    A handler rather than SIG_IGN, which processes started meanwhile would inherit."""
    if threading.current_thread() is not threading.main_thread():  # where signal handlers can be set
        yield
        return
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stopping_already)
    try:
        yield
    finally:
        for signum, handler in then.items():
            if handler is not None:  # None: set outside Python, can't be put back
                signal.signal(signum, handler)


def _stopping_already(signum, frame) -> None:
    logging.getLogger("prefect.runner").debug("signal %d: stopping already", signum)


def check_cron(expression: str) -> None:
    """A cron expression Prefect's own parser (the one that runs the schedule) accepts, or a one-line error."""
    try:
        CronSchedule(cron=expression)
    except ValueError as exc:  # pydantic's ValidationError, several lines long
        reasons = [e["msg"].removeprefix("Value error, ") for e in exc.errors()] if hasattr(exc, "errors") else []
        reason = "; ".join(reasons) or one_line(exc)
        raise ConfigError(f"--cron {expression!r} is not a valid cron schedule ({reason}); "
                          f"expected 5 fields: minute hour day-of-month month day-of-week, e.g. --cron \"0 * * * *\" "
                          f"for every hour") from None


def check_api(wait: float, timeout: float = API_CHECK_SECONDS) -> None:
    """The Prefect API that PREFECT_API_URL names answers its health check, or a one-line error.

    Otherwise the first call of the runner fails deep inside Prefect, as a bare ConnectError. An
    API that refuses connections is asked again for up to ``wait`` seconds, said once: a serve
    started with its server (two system units at boot) failed while the server was starting.
    """
    url = get_current_settings().api.url
    if not url:
        raise ConfigError("vaeguard serve needs a running Prefect server: start one with `prefect server start` "
                          "and set PREFECT_API_URL=http://127.0.0.1:4200/api")
    deadline = time.monotonic() + wait
    with get_client(httpx_settings={"timeout": timeout}, sync_client=True) as client:
        problem = client.api_healthcheck()
        if isinstance(problem, httpx.ConnectError) and wait > 0:
            print(f"no Prefect API at PREFECT_API_URL={url} yet ({one_line(problem)}): waiting up to {wait:g} s for "
                  f"it to start", flush=True)
            while isinstance(problem, httpx.ConnectError) and time.monotonic() < deadline:
                time.sleep(min(0.5, max(deadline - time.monotonic(), 0.0)))
                problem = client.api_healthcheck()
    if problem is None:
        return
    if isinstance(problem, httpx.HTTPStatusError):
        reason = f"{problem.request.url} answered HTTP {problem.response.status_code}, so it is no Prefect API"
    elif isinstance(problem, httpx.TimeoutException):
        reason = f"no answer within {timeout:g} s"
    else:
        reason = one_line(problem)
    raise ConfigError(f"no Prefect API at PREFECT_API_URL={url} ({reason}); {_how_to_start(url)}, or correct "
                      f"PREFECT_API_URL")


def _how_to_start(url: str) -> str:
    """The command that starts the server the URL names, where it is this machine's."""
    parts = urlsplit(url)
    try:
        port = parts.port or 80
    except ValueError:  # a port out of range: the URL is the mistake, and this line names it
        return "start the Prefect server it should name"
    if parts.hostname not in ("127.0.0.1", "localhost", "::1") or parts.scheme != "http":
        return f"start the Prefect server at {parts.netloc}"  # `prefect server start` serves plain http only
    # A server started a moment ago refuses connections for about 10 s: a service started right
    # after it (a script, a systemd unit) should wait for its /health.
    return (f"start one with `prefect server start --host {parts.hostname} --port {port}` (a server "
            f"answers about 10 s after it starts)")


def check_not_served(deployment_name: str) -> None:
    """No other `vaeguard serve` serves this deployment now, or a one-line error.

    Two serves of one deployment (two landing folders served with one bundle take the same default
    name) share it: the second one's registration gave the first one's runs its parameters, so the
    first folder was no longer scored, and whichever stopped first paused the schedule of the
    other, which went on running with nothing to do. A serve that stops pauses the schedule; one
    whose schedule is on and that asked for runs lately may be alive, or killed (SIGKILL, out of
    memory) just before this restart: a live one asks again within its poll interval, so this
    waits for that, and goes on once the last ask is too old to come from a live one.
    """
    deployment = _read_deployment(deployment_name)
    if deployment is None or deployment.paused or deployment.last_polled is None:
        return
    # A live runner asks every PREFECT_RUNNER_POLL_FREQUENCY seconds (10 by default).
    live_within = max(3 * get_current_settings().runner.poll_frequency, 30)
    wait = live_within - (datetime.now(timezone.utc) - deployment.last_polled).total_seconds()
    if wait <= 0:
        return
    print(f"deployment '{deployment_name}' has its schedule on and was asked for runs lately: waiting up to "
          f"{wait:.0f} s to see whether the `vaeguard serve` that asked is still running", flush=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _read_deployment(deployment_name)
        if now is None or now.paused:
            return  # it stopped meanwhile
        if now.last_polled != deployment.last_polled:
            raise _served_already(deployment_name, f"scoring {now.parameters.get('watch')} into "
                                                   f"{now.parameters.get('output')}", "a runner asks for its runs")


def _served_already(deployment_name: str, what: str, evidence: str) -> ConfigError:
    return ConfigError(f"deployment '{deployment_name}' is served already ({what}): {evidence}; two serves of one "
                       f"deployment take each other's parameters and pause each other's schedule, so stop that "
                       f"`vaeguard serve` first, or give this one its own --name (the default is "
                       f"vaeguard-<bundle name>)")


@contextlib.contextmanager
def served_here(deployment_name: str) -> Iterator[None]:
    """No other `vaeguard serve` on this machine serves the deployment while the block runs, or a
    one-line error.

    check_not_served reads the API, where two serves started at the same instant both find the
    deployment unserved, and both served it. A kernel lock keyed by the API and the deployment
    closes that race on one machine; it dies with its process, so a serve killed (SIGKILL, out of
    memory) keeps no restart out. Serves on two machines still rely on check_not_served alone.
    """
    settings = get_current_settings()
    key = hashlib.sha256(f"{_same_api(settings.api.url)} {deployment_name}".encode()).hexdigest()[:16]
    folder = Path(settings.home) / "vaeguard-serve" / key  # where every serve of this user and profile looks
    with contextlib.ExitStack() as stack:
        try:
            acquired = stack.enter_context(run_lock(folder))
        except OSError as exc:  # a home it can't write (a service's read-only one): check_not_served alone
            logging.getLogger("prefect.runner").debug("no serve lock in %s (%s)", folder, one_line(exc))
            acquired = True
        if not acquired:
            holder = ""  # also for the moment it has no pid written yet
            with contextlib.suppress(OSError):
                holder = (folder / LOCK_NAME).read_text().strip()
            by = f"process {holder}" if holder.isdigit() else "another process"
            raise _served_already(deployment_name, f"by {by} on this machine",
                                  f"it holds the lock {folder / LOCK_NAME}")
        yield


def _same_api(url: str) -> str:
    """The API URL as one server's: the loopback names taken as one, no trailing slash."""
    parts = urlsplit(url.rstrip("/"))
    host = "localhost" if parts.hostname in ("127.0.0.1", "localhost", "::1") else parts.hostname
    return parts._replace(netloc=f"{host}:{parts.port or ''}", scheme=parts.scheme.lower()).geturl()


def _read_deployment(deployment_name: str):
    with get_client(sync_client=True) as client:
        try:
            return client.read_deployment_by_name(deployment_name)
        except ObjectNotFound:
            return None


class StoppableRunner(Runner):
    """Prefect's Runner, stopped by SIGTERM or Ctrl-C the way Prefect means to stop it.

    Prefect's own SIGTERM handler calls the sync stop() from inside the running event loop, where
    it only creates a coroutine that nobody awaits: the poller goes on, and runs already handed to
    a process begin after the signal; then its sys.exit(0) unwinds the loop from wherever the
    signal landed, printing two tracebacks. Ctrl-C cancelled start(), which waits for the runs in
    flight to finish, so runs fetched ahead of their time (up to 10 s) began after it too. Here
    either signal schedules astop() on the loop: the poller stops, the runs in flight are
    cancelled (a landing run is safe to stop anywhere), the schedules are paused, start() returns.
    """

    _loop: asyncio.AbstractEventLoop | None = None
    _main: asyncio.Task | None = None
    _stopping: asyncio.Task | None = None
    _paused = False

    async def __aenter__(self) -> StoppableRunner:
        await super().__aenter__()
        # The poller proposes Pending for each run before it starts it: the last moment at which a run
        # given a parameter the flow does not take can still end with our line (Prefect's engine then
        # crashes on it, before the flow's own checks). The poller is built in Runner.__aenter__
        # (Prefect 3.8.8, pinned); tests/test_flows_landing.py sends such a run through the API.
        poller = self._scheduled_run_poller
        if not isinstance(getattr(poller, "_state_proposer", None), StateProposer):
            raise RuntimeError("Prefect's runner no longer proposes states through its poller's _state_proposer "
                               "(Prefect 3.8.8 did): flows/serve.py must follow it")
        poller._state_proposer = NamesCheckedProposer(client=self._client)
        if type(poller) is not ScheduledRunPoller or not isinstance(getattr(poller, "_submitting_flow_run_ids", None),
                                                                    set):
            raise RuntimeError("Prefect's runner no longer polls through a ScheduledRunPoller that keeps the runs it "
                               "submits in _submitting_flow_run_ids (Prefect 3.8.8 did): flows/serve.py must follow it")
        poller.__class__ = CatchUpOncePoller  # built with its own class inside Runner.__aenter__
        return self

    async def serve(self) -> None:
        self._loop, self._main = asyncio.get_running_loop(), asyncio.current_task()
        # Not where SIGINT is ignored (a job started with `&` by a script): that is the caller's choice.
        ctrl_c = (threading.current_thread() is threading.main_thread()  # where signal handlers can be set
                  and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN)
        if ctrl_c:
            self._loop.add_signal_handler(signal.SIGINT, self._begin_stop, "Ctrl-C")
        try:
            await self.start()  # installs handle_sigterm
        except asyncio.CancelledError:
            if self._stopping is None:
                raise
        finally:
            if ctrl_c:
                self._loop.remove_signal_handler(signal.SIGINT)  # back to KeyboardInterrupt

    def handle_sigterm(self, *args) -> None:
        # Not once the loop is closed: serve_landing puts the previous handler back only after
        # asyncio.run() returns, and the runner has stopped then anyway.
        if self._loop is not None and not self._loop.is_closed():
            # The handler runs between two bytecodes of the loop's own thread: the stop is
            # scheduled, not run here, so the loop first finishes the step it was in.
            self._loop.call_soon_threadsafe(self._begin_stop, "SIGTERM")

    def _begin_stop(self, what: str) -> None:
        if self._stopping is not None:
            return  # a second signal must not cut the shutdown short
        logging.getLogger("prefect.runner").info("%s: cancelling the runs in flight and stopping...", what)
        self._stopping = self._loop.create_task(self._stop())

    async def _stop(self) -> None:
        try:
            await self.astop()
        except Exception:  # noqa: BLE001 - not started yet, or the API went away: cancel start() instead
            logging.getLogger("prefect.runner").debug("astop failed; cancelling the runner", exc_info=True)
            self._main.cancel()

    async def _pause_schedules(self) -> None:
        await super()._pause_schedules()
        self._paused = True

    def undo_unfinished_start(self, deployment_id) -> None:
        """After serving, or a set-up cut short by a signal: the schedule paused, as Prefect's own
        stop leaves it, and the runner's scratch folder gone.

        A stop before the runner had started (a signal while it set up its client and services)
        skipped both, which left the deployment's schedule running with no runner to serve it: the
        server went on creating runs that a later serve would run back to back."""
        shutil.rmtree(self._tmp_dir, ignore_errors=True)
        if deployment_id is None or self._paused:
            return
        try:
            with get_client(sync_client=True) as client:
                client.pause_deployment(deployment_id)
        except Exception as exc:  # noqa: BLE001 - the stop goes on; say what is left to do
            logging.getLogger("prefect.runner").warning(
                "could not pause the schedule of deployment %s (%s); pause it with `prefect deployment schedule "
                "pause %s/%s --all`", deployment_id, one_line(exc), landing_flow.name, self.name)

    async def cancel_all(self) -> None:
        # Prefect's cancels the runs in flight one after another, 3 s or more each (the kill looks
        # for the process's exit every 3 s), and a run waiting its turn begins meanwhile. These
        # attributes are Prefect 3.8.8's (pinned); tests/test_flows_landing.py stops a serve with
        # runs in flight.
        async with anyio.create_task_group() as group:
            for flow_run_id in self._process_manager.flow_run_ids():
                group.start_soon(self._cancel_run, flow_run_id)

    async def _cancel_run(self, flow_run_id) -> None:
        try:
            await self._cancellation_manager.cancel_by_id(flow_run_id)
        except Exception:  # noqa: BLE001 - one run that can't be cancelled must not keep the others running
            logging.getLogger("prefect.runner").warning("could not cancel flow run %s", flow_run_id, exc_info=True)


class CatchUpOncePoller(ScheduledRunPoller):
    """Prefect's poller of scheduled runs, which catches up once: of a deployment's scheduled runs
    whose time has come and that have not begun, the newest runs and the older ones end Cancelled,
    their message saying why.

    Prefect's poller hands out every run whose time has come, oldest first, as many at once as the
    runner's process limit (5) allows, however late. After a serve was down with its schedule on
    (killed, or its machine off) the runs that piled up ran back to back, each finding nothing new
    to score: a landing run scores all that landed since the last one, so one run catches up for
    all. A run started by hand (not auto-scheduled) is never skipped.
    """

    async def _get_scheduled_flow_runs(self) -> list[FlowRun]:
        runs = await super()._get_scheduled_flow_runs()
        moment = datetime.now(timezone.utc)
        if sum(self._missed(run, moment) for run in runs) < 2:
            return runs  # the usual poll: no more requests
        await self._skip_all_but_the_newest(moment)
        return await super()._get_scheduled_flow_runs()  # the newest may lie beyond the page first read

    def _missed(self, run: FlowRun, moment: datetime) -> bool:
        return (run.auto_scheduled and run.next_scheduled_start_time is not None
                and run.next_scheduled_start_time <= moment and run.id not in self._submitting_flow_run_ids)

    async def _skip_all_but_the_newest(self, moment: datetime) -> None:
        due = FlowRunFilter(
            deployment_id=FlowRunFilterDeploymentId(any_=list(self._deployment_registry.get_deployment_ids())),
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.SCHEDULED])),
            next_scheduled_start_time=FlowRunFilterNextScheduledStartTime(before_=moment))
        missed, offset = {}, 0
        # Every page (the server's limit is 200): a week of a schedule every minute is 10080 runs.
        while page := await self._client.read_flow_runs(flow_run_filter=due, offset=offset,
                                                        sort=FlowRunSort.NEXT_SCHEDULED_START_TIME_ASC):
            offset += len(page)
            missed.update((run.id, run) for run in page if self._missed(run, moment))
        newest = {}
        for run in sorted(missed.values(), key=lambda run: run.next_scheduled_start_time):
            newest[run.deployment_id] = run
        for deployment_id, kept in newest.items():
            skipped = [run for run in missed.values() if run.deployment_id == deployment_id and run is not kept]
            if not skipped:
                continue
            due_at = kept.next_scheduled_start_time.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
            self._logger.info("%d scheduled runs missed their time: skipping them; the newest, '%s' (due %s), runs "
                              "once in their place", len(skipped), kept.name, due_at)
            message = (f"skipped: missed its time, and a later scheduled run, '{kept.name}' (due {due_at}), runs once "
                       f"in its place; a landing run scores all that landed since the last one")
            for run in skipped:
                try:
                    await propose_state(self._client, Cancelled(message=message), flow_run_id=run.id)
                except Abort:
                    pass  # it moved on meanwhile (started by hand, cancelled): it is no longer waiting to run


class NamesCheckedProposer(StateProposer):
    """Prefect's state proposer, which ends a run asked for a parameter the landing flow does not take
    Failed with a one-line message (also its one ERROR log) instead of letting it start."""

    async def propose_pending(self, flow_run) -> bool:
        try:
            check_parameter_names(flow_run.parameters)
        except ConfigError as exc:
            await self._fail(flow_run, one_line(exc))
            return False
        return await super().propose_pending(flow_run)

    async def _fail(self, flow_run, message: str) -> None:
        try:
            state = await propose_state(self._client, Failed(message=message), flow_run_id=flow_run.id)
        except Abort:  # the server keeps the run from changing state (cancelled meanwhile): not started either
            return
        except Exception as exc:  # noqa: BLE001 - as Prefect's own proposer: the runner goes on serving
            # The run stays Scheduled and is checked again at the next poll, so it is logged there once it fails.
            self._logger.warning("could not fail flow run '%s' (%s); it stays scheduled: %s", flow_run.id,
                                 one_line(exc), message)
            return
        if state.is_failed():
            flow_run_logger(flow_run=flow_run).error("%s", message)
