"""The MPI job this process runs in: read from the launcher's variables, or from our communicator.

Before MPI starts (and in processes that never start it: the launching process, a datamodule
preparing data, a progress bar) the job is known only from the variables its launcher set:
Open MPI's ``OMPI_COMM_WORLD_RANK``/``_SIZE``, a PMIx launcher's ``PMIX_RANK`` and a PMI-1/2 one's
``PMI_RANK``/``PMI_SIZE``, read in that order by ``rank_from_environment`` and
``size_from_environment`` (a PMIx launcher other than Open MPI's sets no size). They never import
mpi4py, so asking them starts no MPI.

``MPIEnvironment`` is Lightning's view of a running job, read from our communicator. It is passed
to the Trainer explicitly: Lightning's own MPI detection imports mpi4py and can hang a Trainer
outside an MPI job (Lightning issue 20049), and it would not follow a communicator that the
fault-tolerant strategies shrink after a failure.
"""

from __future__ import annotations

import os
import socket

from lightning.fabric.plugins.environments import ClusterEnvironment

from lightning_xd.comm.communicator import Communicator

_RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK")
_SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def _first_number(names: tuple[str, ...]) -> int | None:
    for name in names:
        value = os.environ.get(name, "").strip()
        if value.isdigit():
            return int(value)
    return None


def rank_from_environment() -> int | None:
    """This process's rank in the job its launcher started; None outside an MPI job."""
    return _first_number(_RANK_VARIABLES)


def size_from_environment() -> int | None:
    """The number of processes of the job its launcher started; None outside one, or where the
    launcher does not say (a PMIx launcher other than Open MPI's)."""
    return _first_number(_SIZE_VARIABLES)


def in_mpi_job() -> bool:
    """True when this process was started by mpirun (or another PMIx or PMI launcher)."""
    return rank_from_environment() is not None or size_from_environment() is not None


def is_first_process() -> bool:
    """True for rank 0 of the job, and for a process outside any job."""
    return rank_from_environment() in (None, 0)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class MPIEnvironment(ClusterEnvironment):
    """Ranks, hosts and the rendezvous address of the processes in ``comm``.

    Every rank must construct it at the same point: it runs a few collectives to learn which
    ranks share a host (MPI's shared-memory split, so emulated hosts on one machine count apart).
    """

    def __init__(self, comm: Communicator):
        self.comm = comm
        host = comm.local()
        self._local_rank = host.rank
        leader = host.broadcast_object(comm.rank)  # global rank of this host's first process
        leaders = sorted(set(comm.allgather_object(leader)))
        self._node_rank = leaders.index(leader)
        self.num_nodes = len(leaders)  # hosts of the job
        self.local_size = host.size  # processes on this host
        one_host = self.num_nodes == 1
        address = os.environ.get("MASTER_ADDR", "127.0.0.1" if one_host else socket.gethostname())
        port = int(os.environ.get("MASTER_PORT", 0)) or _free_port()
        self._main_address, self._main_port = comm.broadcast_object((address, port))

    @property
    def creates_processes_externally(self) -> bool:
        return True

    @property
    def main_address(self) -> str:
        return self._main_address

    @property
    def main_port(self) -> int:
        return self._main_port

    @staticmethod
    def detect() -> bool:
        return in_mpi_job()

    def world_size(self) -> int:
        return self.comm.size

    def set_world_size(self, size: int) -> None:
        if size != self.comm.size:
            raise RuntimeError(f"Lightning expects {size} processes but the MPI job has {self.comm.size}")

    def global_rank(self) -> int:
        return self.comm.rank

    def set_global_rank(self, rank: int) -> None:
        if rank != self.comm.rank:
            raise RuntimeError(f"Lightning computed rank {rank} for MPI rank {self.comm.rank}")

    def local_rank(self) -> int:
        return self._local_rank

    def node_rank(self) -> int:
        return self._node_rank


def device_for(local_rank: int):
    """The device a process uses: its own GPU when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
