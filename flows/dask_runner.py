"""What `vaeguard score --task-runner dask` runs the scoring flow in, on the local cluster it starts:
one temporary Prefect server for the flow and its workers, and worker processes that only
vaeguard stops.

A terminal's Ctrl-C, and `timeout`'s SIGTERM, go to every process of the foreground group. Had
they reached the workers and the Prefect server, the workers would die mid-task (the flow then
waited for their futures for ever) and so would the server the flow reports its end to. Here
only the vaeguard process takes them; the scoring flow restarts the workers it started (ending
the tasks they run) and removes its parts, then the cluster and the server are closed in turn.

On a cluster named by --dask-address, the signals reach neither the workers (not vaeguard's) nor
the temporary Prefect server vaeguard reports to (in a session of its own, as above): the flow
cancels the run's tasks there and removes its parts, and a task already running there removes its
part itself when it ends (flows.score).

The local workers write to the user's terminal too: without --verbose, Prefect's records of their
tasks are shown there as the CLI shows its own (pipeline.console), not with a failed file's traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

from pipeline.errors import ConfigError

SIGNALS = {signal.SIGINT, signal.SIGTERM}

# Prefect's own temporary server (create_app(ephemeral=True): SQLite in PREFECT_HOME, only the
# services a temporary server runs), served on a socket vaeguard bound, so its port is known and
# can't be taken meanwhile. It stops itself when vaeguard is gone, even killed (the pipe ends).
_SERVE = """
import os, signal, socket, sys, threading
listener, alive = socket.socket(fileno=int(sys.argv[1])), int(sys.argv[2])
def stop_when_vaeguard_is_gone():
    os.read(alive, 1)
    os.kill(os.getpid(), signal.SIGTERM)
threading.Thread(target=stop_when_vaeguard_is_gone, daemon=True).start()
import uvicorn
from prefect.server.api.server import create_app
uvicorn.Server(uvicorn.Config(create_app(ephemeral=True, final=True), log_level="error")).run(sockets=[listener])
"""

# The least time the server gets to answer: in a new PREFECT_HOME it first creates its SQLite
# database (7-8 s on 2 busy cores), where Prefect's own default allows 20 s in all.
STARTUP_SECONDS = 120


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """SIGINT and SIGTERM wait until the block ends, and threads started in it never take them.

    Unlike pipeline.signals.signals_held, the signals are blocked at the thread level
    (pthread_sigmask), because what must not take them is the processes those threads spawn.

    A LocalCluster made in the block spawns its worker processes (restarted ones too) from its
    event-loop thread, and a process starts with the signals its spawning thread blocks.
    """
    received: list[int] = []
    handlers = {}
    if threading.current_thread() is threading.main_thread():  # where Python runs signal handlers
        handlers = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in SIGNALS}
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        for signum in received:
            signal.raise_signal(signum)


def shielded_local_cluster(**kwargs):
    """A distributed.LocalCluster whose worker processes ignore the signals sent to vaeguard's group."""
    from multiprocessing import resource_tracker

    from distributed import LocalCluster

    # Started first from the cluster's thread, multiprocessing's resource tracker would unblock
    # the signals there again (CPython's resource_tracker.ensure_running does).
    resource_tracker.ensure_running()
    with signals_blocked():
        return LocalCluster(**kwargs)


def dask_task_runner(address: str | None, verbose: bool = False):
    """The scheduler at ``address``, or a local cluster of 2 single-threaded worker processes.

    Without ``verbose`` the local workers log only Dask's critical errors (a stopped run's workers
    log tracebacks of connections closed under them), and each runs dask_setup below when it starts.
    """
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    quiet = {} if verbose else {"preload": [__name__]}  # this module, for its dask_setup
    return DaskTaskRunner(cluster_class=shielded_local_cluster,
                          cluster_kwargs={"n_workers": 2, "threads_per_worker": 1, **quiet, **NO_DASHBOARD,
                                          "silence_logs": logging.WARNING if verbose else logging.CRITICAL})


# No dashboard: nothing of ours prints its address. The scheduler still serves HTTP (its health and
# metrics routes), by default on 127.0.0.1:8787: a second cluster at once found the port taken and
# warned (UserWarning: Port 8787 is already in use) before it took another. Any free port will do.
NO_DASHBOARD = {"dashboard_address": None, "scheduler_kwargs": {"dashboard_address": "127.0.0.1:0"}}


_WORKER_CONSOLE = contextlib.ExitStack()


def dask_setup(worker) -> None:
    """Run by Dask in each worker process of a local cluster started without --verbose (its
    ``preload``), whose console is the user's terminal: a file that fails with our error is then
    reported by the CLI's one line alone, not also by the worker's Prefect records and traceback."""
    from prefect.logging.configuration import ensure_logging_setup

    from pipeline.console import quiet_console

    ensure_logging_setup()  # Prefect's console handler, which the worker's first task would set up after this
    _WORKER_CONSOLE.enter_context(quiet_console(verbose=False))


def dask_teardown(worker) -> None:
    _WORKER_CONSOLE.close()


@contextlib.contextmanager
def prefect_api(address: str | None) -> Iterator[None]:
    """Without PREFECT_API_URL, a Dask run reports to a temporary server of its own, in a session
    of its own (temporary_prefect_server).

    On a local cluster, the workers report to it too: Prefect would otherwise start one in the
    flow's process and one in each worker process (about 10 s each). The URL reaches the workers in
    the settings Prefect sends with each task. Workers of a scheduler named by ``address`` may be
    on other machines, where this server's 127.0.0.1 is not this machine: they keep Prefect's
    default, and the server stands in for the one Prefect would start in this process.
    """
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield
        return
    with temporary_prefect_server() as (url, server):
        # Not in the settings that travel with each task: this process alone reports to it, where
        # Prefect would start its own, which a terminal's Ctrl-C stops mid-run (the flow then could
        # not record its end and failed with a ConnectError after a minute of retries).
        with (prefects_temporary_server(url, server) if address else temporary_settings({PREFECT_API_URL: url})):
            try:
                yield
            finally:
                send_pending_reports()


@contextlib.contextmanager
def prefects_temporary_server(url: str, server: subprocess.Popen) -> Iterator[None]:
    """The server at ``url`` serves as the temporary server Prefect starts in this process when no
    PREFECT_API_URL is set (for its client, logs and events), so none is started."""
    from prefect.server.api.server import SubprocessASGIServer

    prefects = SubprocessASGIServer()  # one per process, which Prefect starts when first asked
    if prefects.running:
        yield
        return
    prefects.port, prefects.server_process, prefects.running = urllib.parse.urlsplit(url).port, server, True
    try:
        yield
    finally:  # as it was: Prefect would start one of its own when asked again
        prefects.port, prefects.server_process, prefects.running = None, None, False


def send_pending_reports() -> None:
    """Send the logs and events Prefect still holds while the server is up: sent at exit, after
    it stopped, they would be retried for a minute or more (as prefect_test_harness does too)."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    with contextlib.suppress(RuntimeError):  # no log was sent, so there is no worker to drain
        APILogWorker.instance().drain()
    EventsWorker.drain_all()


@contextlib.contextmanager
def temporary_prefect_server() -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield the API URL and the process of a Prefect server in a session of its own, stopped when the block ends."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, get_current_settings

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    alive, keep_alive = os.pipe()
    # Closed however the block ends (Popen failing, a signal anywhere, a second Ctrl-C cutting the
    # wait below short): the server sees the pipe end and stops itself.
    try:
        env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}
        with tempfile.TemporaryFile() as log:
            try:
                server = subprocess.Popen([sys.executable, "-c", _SERVE, str(listener.fileno()), str(alive)],
                                          pass_fds=(listener.fileno(), alive), start_new_session=True, env=env,
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
            finally:
                listener.close()
                os.close(alive)
            try:
                timeout = max(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value(), STARTUP_SECONDS)
                _wait_until_serving(server, url, timeout, log)
                yield url, server
            finally:
                try:
                    server.terminate()
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    server.kill()
                    server.wait()
    finally:
        os.close(keep_alive)


def _wait_until_serving(server: subprocess.Popen, url: str, timeout: float, log) -> None:
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1, whatever http_proxy says
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with direct.open(f"{url}/health", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    log.seek(0)
    said = " ".join(log.read().decode(errors="replace").split()[-40:])
    how = f"exited with status {server.returncode}" if server.poll() is not None else f"did not answer in {timeout} s"
    raise ConfigError(f"the temporary Prefect server for the Dask run {how}" + (f" ({said})" if said else "")
                      + "; start one with `prefect server start` and set PREFECT_API_URL to its API "
                        "(e.g. http://127.0.0.1:4200/api)")


def stop_tasks(futures: list) -> bool:
    """End this flow run's Dask tasks without waiting for those running (a file may take minutes).

    On the cluster this run started, the workers are restarted: the tasks they run end at once and
    those not started are cancelled. On a scheduler named by address, whose workers are not this
    run's to restart, the run's futures are cancelled: tasks not started never start, and those
    running (Dask can't stop them) run to their end with their results dropped.

    False for another task runner, whose running tasks must be waited for.
    """
    from prefect.context import FlowRunContext

    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        return False
    context = FlowRunContext.get()
    runner = context.task_runner if context else None
    if not isinstance(runner, DaskTaskRunner):
        return False
    if runner.client.cluster is None:
        runner.client.cancel([future.wrapped_future for future in futures])
    else:
        runner.client.restart(wait_for_workers=False)
    return True
