"""Emulated hosts on one machine: network namespaces with their own addresses on a private bridge.

Each host is a namespace ``<prefix>N`` reached at ``10.77.0.(N+1)``; the root namespace is
``10.77.0.1`` on the bridge. Open MPI 5 starts its remote daemons through PRRTE's launch agent,
here a script that runs the command inside the host's namespace. Traffic stays on loopback and
on the bridge; everything is removed on ``close()``.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

SUBNET = "10.77.0.0/24"
BRIDGE_MAC = "02:00:0a:4d:00:01"  # locally administered, fixed for the life of the bridge


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def netns_permitted() -> tuple[bool, str]:
    """Whether this machine lets us create namespaces (root, iproute2); if not, why."""
    if os.geteuid() != 0:
        return False, "creating network namespaces needs root"
    probe = "xdprobe"
    try:
        _ip("netns", "add", probe)
    except (OSError, subprocess.CalledProcessError) as err:
        return False, f"ip netns add is not permitted here ({getattr(err, 'stderr', err)!s})".strip()
    _ip("netns", "delete", probe, check=False)
    return True, ""


class EmulatedHosts:
    def __init__(self, count: int, workdir: Path, prefix: str = "xdh"):
        self.names = [f"{prefix}{i}" for i in range(1, count + 1)]
        self.addresses = [f"10.77.0.{i + 1}" for i in range(1, count + 1)]
        self.bridge = f"{prefix}br"
        self.workdir = Path(workdir)
        self._up()
        self.agent = self._write_agent()

    def _up(self) -> None:
        self.close()
        # A fixed address: a Linux bridge otherwise takes the lowest of its ports' and changes it when a
        # killed host's port goes, leaving the other hosts' ARP entry for 10.77.0.1 pointing nowhere
        # for a minute or two (relaunches then stalled 55-108 s in the chaos benchmark).
        _ip("link", "add", self.bridge, "address", BRIDGE_MAC, "type", "bridge")
        _ip("addr", "add", "10.77.0.1/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for name, address in zip(self.names, self.addresses):
            _ip("netns", "add", name)
            _ip("link", "add", f"{name}v", "type", "veth", "peer", "name", f"{name}p")
            _ip("link", "set", f"{name}p", "netns", name)
            _ip("link", "set", f"{name}v", "master", self.bridge)
            _ip("link", "set", f"{name}v", "up")
            _ip("-n", name, "addr", "add", f"{address}/24", "dev", f"{name}p")
            _ip("-n", name, "link", "set", f"{name}p", "up")
            _ip("-n", name, "link", "set", "lo", "up")

    def _write_agent(self) -> Path:
        """PRRTE calls ``agent HOST COMMAND...``: run COMMAND in that host's namespace."""
        cases = "\n".join(f"  {a}) ns={n} ;;" for n, a in zip(self.names, self.addresses))
        script = self.workdir / "netns-agent.sh"
        script.write_text(
            f'#!/bin/sh\nhost="$1"; shift\ncase "$host" in\n{cases}\n  *) exit 255 ;;\nesac\n'
            'exec ip netns exec "$ns" sh -c "$*"\n'
        )
        script.chmod(0o755)
        return script

    def hostfile(self, slots: int = 1) -> Path:
        path = self.workdir / "hostfile"
        path.write_text("".join(f"{a} slots={slots}\n" for a in self.addresses))
        return path

    @staticmethod
    def mpi_environment() -> dict[str, str]:
        """Open MPI settings for these hosts: TCP on the namespace subnet only, no shared-memory collectives."""
        return {
            "OMPI_MCA_btl": "tcp,self",
            "OMPI_MCA_coll": "^han",
            "OMPI_MCA_btl_tcp_if_include": SUBNET,
            "OMPI_MCA_oob_tcp_if_include": SUBNET,
            "PRTE_MCA_oob_tcp_if_include": SUBNET,
        }

    def kill_host(self, index: int) -> None:
        """Every process of that host dies at once, and the host stops answering."""
        name = self.names[index]
        pids = _ip("netns", "pids", name, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        _ip("netns", "delete", name, check=False)

    def close(self) -> None:
        for name in self.names:
            for pid in _ip("netns", "pids", name, check=False).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
            _ip("netns", "delete", name, check=False)
            _ip("link", "delete", f"{name}v", check=False)
        _ip("link", "delete", self.bridge, check=False)
