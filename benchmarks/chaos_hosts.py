"""The chaos benchmark's ``hosts`` mode: whole emulated hosts die, the supervisor restarts on the rest.

The hosts are network namespaces built by ``tests/netns_hosts.py`` (imported by path, so the
benchmark and the multi-host test share one definition); that needs root. A host is killed, its
processes and daemon at once, when the job's ``progress.json`` reaches the trial's step. Every
trial builds its hosts afresh and removes them afterwards, under a prefix of its own (``xdc``) so
that it never touches the tests' namespaces.
"""

from __future__ import annotations

import importlib.util
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from benchmarks.chaos_jobs import Job
from benchmarks.common import REPO

PREFIX = "xdc"
BRIDGE_ADDRESS = "10.77.0.1/"  # the root namespace's end of netns_hosts' private subnet


def _netns_hosts():
    spec = importlib.util.spec_from_file_location("netns_hosts", REPO / "tests" / "netns_hosts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def unavailable() -> str | None:
    """Why emulated hosts cannot be built here now (None when they can)."""
    permitted, why = _netns_hosts().netns_permitted()
    if not permitted:
        return why
    addresses = subprocess.run(["ip", "-br", "addr"], capture_output=True, text=True).stdout
    if BRIDGE_ADDRESS in addresses:
        return "the emulated hosts' subnet 10.77.0.0/24 is in use (is a multi-host test running?); try later"
    return None


def leftover_namespaces() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    return [name for name in listed if name.startswith(PREFIX)]


@contextmanager
def emulated_hosts(count: int, workdir: Path) -> Iterator:
    """``count`` fresh hosts, removed on the way out (an error if any namespace is left behind)."""
    workdir.mkdir(parents=True, exist_ok=True)
    hosts = _netns_hosts().EmulatedHosts(count, workdir, prefix=PREFIX)
    try:
        yield hosts
    finally:
        hosts.close()
        left = leftover_namespaces()
        if left:
            raise RuntimeError(
                f"network namespaces left behind: {', '.join(left)}; remove them with `ip netns delete NAME`"
            )


def host_flags(hosts, count: int) -> list[str]:
    """train.py flags that spread the job's ``count`` processes over the hosts, one each, and let it
    restart on those that remain."""
    return ["--hostfile", str(hosts.hostfile()), "--launch-agent", str(hosts.agent), "--min-nprocs", str(count - 1)]


class HostKiller:
    """A job watcher: kills host ``index`` once the first attempt has reached ``step`` (never after the
    job has finished)."""

    def __init__(self, hosts, index: int, step: int):
        self.hosts, self.index, self.step = hosts, index, step

    def __call__(self, job: Job) -> None:
        from lightning_xd.fault_tolerance.progress_marker import read_progress

        if "killed_at" in job.extra or job.completed:  # killing a finished job would test nothing
            return
        progress = read_progress(job.run_dir)
        if progress.get("attempt") == 0 and progress.get("global_step", -1) >= self.step:
            job.extra.update(killed_at=time.time(), killed_step=progress["global_step"])
            self.hosts.kill_host(self.index)
