"""The CPU cores this process may use, and the threads torch and onnxruntime get from them.

A machine's core count overstates them twice over: CPU affinity (taskset, a container's cpuset)
and a container's CPU quota (`docker run --cpus`, a Kubernetes CPU limit) each leave fewer, and
threads beyond them only wait.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from pathlib import Path

log = logging.getLogger("vaeguard")

# Where Linux mounts the cgroup hierarchies and where it says which ones this process is in;
# module constants so tests can point them at a fake tree.
CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


def available_cores() -> int:
    """The cores this process may use: its CPU affinity (taskset, a container's cpuset), which can
    be fewer than the machine's, and at most its cgroup CPU quota rounded up (`docker run --cpus 2`,
    a Kubernetes CPU limit). The affinity does not show a quota: a 2-CPU container on 16 cores sees
    all 16, and threads beyond the quota only wait to be throttled."""
    try:
        cores = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # no affinity outside Linux
        cores = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(CGROUP_ROOT, SELF_CGROUP)
    return min(cores, quota) if quota else cores


@functools.cache  # read once per process: the quota is set as the container starts; every session asks
def _cgroup_cpu_quota(root: Path, self_cgroup: Path) -> int | None:
    """This process's cgroup CPU quota in whole cores, or None where there is none or it cannot be
    read (not Linux, no cgroup files, a malformed one): v2's cpu.max ("200000 100000" is 2 cores,
    "max 100000" none), v1's cpu.cfs_quota_us over cpu.cfs_period_us (-1 is none).

    Its parent cgroups count too: their quota binds it as well, and a container that mounts its own
    cgroup as the root while /proc names the host's path finds it at the top of the walk."""
    quotas = []
    for line in _read_kernel_file(self_cgroup).splitlines():
        match = re.fullmatch(r"\d+:([^:]*):(/.*)", line)  # hierarchy-id:controllers:path
        if not match:
            continue
        controllers, path = match.groups()
        v1 = "cpu" in controllers.split(",")
        if controllers and not v1:  # a v1 hierarchy of another controller (memory, pids, ...)
            continue
        # v1 mounts the hierarchy as cpu (often a link to cpu,cpuacct) or only by its controllers' names.
        mounts = dict.fromkeys([root / "cpu", root / controllers] if v1 else [root])
        for own in (mount / path.lstrip("/") for mount in mounts):
            for directory in (own, *own.parents[:len(Path(path).parts) - 1]):
                if v1:
                    quota = _read_kernel_file(directory / "cpu.cfs_quota_us")
                    period = _read_kernel_file(directory / "cpu.cfs_period_us")
                else:
                    quota, _, period = _read_kernel_file(directory / "cpu.max").partition(" ")
                quotas.append(_whole_cores(quota, period))
    return min((q for q in quotas if q), default=None)


def _read_kernel_file(path: Path) -> str:
    """A kernel file's text, or "" where it is missing or unreadable (which means no quota)."""
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError):
        return ""


def _whole_cores(quota: str, period: str) -> int | None:
    """A CPU quota over its period (microseconds) in whole cores, rounded up: 1.5 CPUs of time can keep
    2 threads busy. None for no quota ("max", -1) and for anything that is not two positive integers."""
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:
        return None
    return -(-quota_us // period_us) if quota_us > 0 and period_us > 0 else None  # ceil, in integers


def resolve_threads(threads: int | None) -> int:
    """The threads torch or onnxruntime get: None, every core up to 4; a number above the cores,
    the cores, with a warning. The cores are those this process may use (`available_cores`: its
    CPU affinity and its container's CPU quota), not the machine's.

    Capped rather than refused: one config file, flow parameter or deployment runs on machines of
    several sizes (a Dask worker may have fewer cores than the machine that built the job), and
    threads beyond the cores never help. On 2 cores they only cost: scoring 50,000 rows took
    0.7 s with 2 threads, 3.5 s with 64, 14 s with 1,000, and had not ended after 11 minutes with
    10,000 (7,000 threads and 900 MB by then); training 20 epochs took 0.3 s with 2, 177 s with 10,000.
    """
    cores = available_cores()
    if not threads or threads < 1:
        return max(1, min(cores, 4))
    if threads > cores:
        _warn_capped(threads, cores)
        return cores
    return threads


@functools.cache  # once per process and value: a run builds several sessions, a worker many runs
def _warn_capped(threads: int, cores: int) -> None:
    log.warning("threads %d is more than the %d CPU core(s) this process may use; using %d, as more threads than "
                "cores only slow torch and onnxruntime down; set --threads (in training, training.threads) to at most %d, "
                "or leave it out for the default", threads, cores, cores, cores)
