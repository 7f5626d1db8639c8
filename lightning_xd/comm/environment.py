"""Lightning's view of an MPI job, read from our communicator.

Passed to the Trainer explicitly: Lightning's own MPI detection imports mpi4py and can hang a
Trainer outside an MPI job (Lightning issue 20049), and it would not follow a communicator that
the fault-tolerant strategies shrink after a failure.
"""

from __future__ import annotations

import os
import socket

from lightning.fabric.plugins.environments import ClusterEnvironment

from lightning_xd.comm.communicator import Communicator


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
        self._local_rank, self._local_size = host.rank, host.size
        leader = host.broadcast_object(comm.rank)  # global rank of this host's first process
        leaders = sorted(set(comm.allgather_object(leader)))
        self._node_rank = leaders.index(leader)
        self._num_nodes = len(leaders)
        one_host = self._num_nodes == 1
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
        from lightning_xd.launch.launcher import in_mpi_job

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

    @property
    def local_size(self) -> int:
        return self._local_size

    @property
    def num_nodes(self) -> int:
        return self._num_nodes


def device_for(local_rank: int):
    """The device a process uses: its own GPU when there are GPUs, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")
