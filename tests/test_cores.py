"""The cores a process may use: CPU affinity and the container's cgroup CPU quota."""

from __future__ import annotations

import logging
import os

import pytest

from pipeline import cores as cores_module
from pipeline.cores import available_cores, resolve_threads


@pytest.fixture
def machine(tmp_path, monkeypatch):
    """A 16-core machine whose cgroup files are a fake tree: machine(cgroups, files) writes
    /proc/self/cgroup's lines and the files (path under the cgroup root: text or bytes)."""
    root, self_cgroup = tmp_path / "sys-fs-cgroup", tmp_path / "proc-self-cgroup"
    monkeypatch.setattr(cores_module, "CGROUP_ROOT", root)
    monkeypatch.setattr(cores_module, "SELF_CGROUP", self_cgroup)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    cores_module._cgroup_cpu_quota.cache_clear()
    cores_module._warn_capped.cache_clear()

    def write(cgroups: list[str] | None, files: dict[str, str | bytes]) -> None:
        if cgroups is not None:
            self_cgroup.write_text("".join(f"{line}\n" for line in cgroups))
        for name, content in files.items():
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)

    yield write
    cores_module._cgroup_cpu_quota.cache_clear()
    cores_module._warn_capped.cache_clear()


V2_POD = "0::/kubepods/pod1/app"


@pytest.mark.parametrize("cpu_max, cores", [
    ("200000 100000\n", 2),  # docker run --cpus 2
    ("150000 100000\n", 2),  # 1.5 CPUs of time keep 2 threads busy
    ("50000 100000\n", 1),  # half a CPU: still one thread
    ("max 100000\n", 16),  # no quota
])
def test_cgroup_v2_quota_caps_the_cores(machine, cpu_max, cores):
    """A 2-CPU container on 16 cores saw all 16 (its affinity), and torch and onnxruntime got 4 threads."""
    machine([V2_POD], {"kubepods/pod1/app/cpu.max": cpu_max})
    assert available_cores() == cores


def test_cgroup_v2_quota_of_a_parent_binds_too(machine):
    machine([V2_POD], {"kubepods/pod1/app/cpu.max": "max 100000\n", "kubepods/pod1/cpu.max": "300000 100000\n",
                       "kubepods/cpu.max": "800000 100000\n"})
    assert available_cores() == 3


def test_cgroup_v2_container_that_sees_its_own_cgroup_as_the_root(machine):
    """With the host's cgroup namespace /proc names the host's path, which is not under the container's mount."""
    machine(["0::/system.slice/docker-abc.scope"], {"cpu.max": "200000 100000\n"})
    assert available_cores() == 2


@pytest.mark.parametrize("quota, cores", [("200000\n", 2), ("-1\n", 16)])
def test_cgroup_v1_quota_caps_the_cores(machine, quota, cores):
    """v1 (and hybrid: a v2 line whose tree has no cpu.max), the cpu controller mounted with cpuacct."""
    machine(["12:memory:/docker/abc", "4:cpu,cpuacct:/docker/abc", "0::/"],
            {"cpu/docker/abc/cpu.cfs_quota_us": quota, "cpu/docker/abc/cpu.cfs_period_us": "100000\n",
             "memory/docker/abc/cpu.cfs_quota_us": "100000\n", "memory/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert available_cores() == cores


def test_cgroup_v1_mounted_only_by_its_controllers_names(machine):
    """Some hosts mount v1's cpu hierarchy as cpu,cpuacct with no `cpu` link beside it."""
    machine(["4:cpu,cpuacct:/docker/abc"],
            {"cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000\n", "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n"})
    assert available_cores() == 3


@pytest.mark.parametrize("cgroups, files", [
    (None, {}),  # no /proc/self/cgroup (not Linux)
    ([V2_POD], {}),  # no cgroup files mounted
    (["not a cgroup line", "0:/kubepods", ""], {"cpu.max": "200000 100000\n"}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": "200000\n"}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": "two 100000\n"}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": "200000 0\n"}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": "200000 100000 7\n"}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": ""}),
    ([V2_POD], {"kubepods/pod1/app/cpu.max": b"\xff\xfe 100000\n"}),
    (["3:cpu:/"], {"cpu/cpu.cfs_quota_us": "200000\n"}),  # no period
    (["3:cpu:/"], {"cpu/cpu.cfs_quota_us": "0\n", "cpu/cpu.cfs_period_us": "100000\n"}),
])
def test_missing_or_malformed_cgroup_files_mean_no_quota(machine, caplog, cgroups, files):
    machine(cgroups, files)
    with caplog.at_level(logging.DEBUG):
        assert available_cores() == 16
    assert caplog.records == []


def test_a_cgroup_path_that_is_a_file_means_no_quota(machine):
    machine([V2_POD], {"kubepods/pod1": "a file where a folder should be\n"})
    assert available_cores() == 16


def test_affinity_smaller_than_the_quota_wins(machine, monkeypatch):
    machine([V2_POD], {"kubepods/pod1/app/cpu.max": "400000 100000\n"})
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert available_cores() == 2


def test_resolve_threads_caps_to_the_quota(machine, caplog):
    """`--threads 16` in a 2-CPU container ran 16 threads on 2 CPUs' worth of time."""
    machine([V2_POD], {"kubepods/pod1/app/cpu.max": "200000 100000\n"})
    with caplog.at_level(logging.WARNING, logger="vaeguard"):
        assert resolve_threads(16) == 2
    assert [r.getMessage().split(";")[0] for r in caplog.records] == [
        "threads 16 is more than the 2 CPU core(s) this process may use"]
    assert resolve_threads(None) == 2
    assert resolve_threads(1) == 1
