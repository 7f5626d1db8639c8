"""The base of our MPI strategies: what every one of them shares, and the points where they differ.

One process per device, started by mpirun (or by train.py's launcher); the job, not the Trainer,
decides how many there are. The base owns the job's communicator (``comm``: every process), the
cluster environment read from it, the device of this process, the broadcast of rank 0's
parameters and buffers at set-up, Lightning's collectives and torchmetrics' gathers over MPI
(``MPICollectives``), and training data that resumes mid-epoch (``ResumableTrainingData``).

A strategy built on it declares what differs (``StrategyContract``'s points, and those below):
``replicas`` (the processes that hold the same parameters), ``ranks_train_apart`` (collectives
are local while it holds), ``run_collective`` and ``metric_sync_guard`` (how a collective outside a
step is watched: in-job recovery retries it) and ``after_gradient_sync``. Gradient averaging
(``lightning_xd.parallel.averaged_gradients``) and in-job recovery
(``lightning_xd.fault_tolerance.recovery``) are mixed into the strategies that use them.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TypeVar

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from typing_extensions import override

from lightning_xd.comm.collectives import MPICollectives, attach_metric_sync
from lightning_xd.comm.communicator import Communicator, wait_all, waited_seconds, world
from lightning_xd.comm.environment import MPIEnvironment, device_for
from lightning_xd.contract import StrategyContract
from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.resumable import ResumableTrainingData

T = TypeVar("T")


class MPIStrategy(StrategyContract, ResumableTrainingData, MPICollectives, ParallelStrategy):
    """A Lightning ParallelStrategy whose processes are the MPI job's."""

    def __init__(self, **kwargs: Any):
        self.comm: Communicator = world()
        environment = MPIEnvironment(self.comm)
        super().__init__(
            parallel_devices=[device_for(environment.local_rank())], cluster_environment=environment, **kwargs
        )
        self._num_nodes_asked = environment.num_nodes

    # ---- the extension points ---------------------------------------------------------------
    @property
    def replicas(self) -> Communicator:
        """The data-parallel group: the processes that hold the same parameters (here: all of them)."""
        return self.comm

    def ranks_train_apart(self) -> bool:
        """Whether the processes now train at their own pace: Lightning's collectives are then local."""
        return False

    def run_collective(self, operation: Callable[[], T], what: str = "a collective") -> T:
        """Run a collective outside a training step (in-job recovery retries it on the survivors)."""
        return operation()

    def metric_sync_guard(self) -> AbstractContextManager:
        """What a metric's gather runs inside (in-job recovery: a watchdog that ends a hung job)."""
        return nullcontext()

    def after_gradient_sync(self) -> None:
        """Called once a step's gradients are averaged on every process."""

    def peer_wait_seconds(self) -> float:
        """Seconds blocked in MPI so far (every collective, agreement and message, counted by the comm layer)."""
        return waited_seconds()

    def use_communicator(self, comm: Communicator) -> None:
        """Go on over ``comm`` (the survivors, after a failure): everything that depends on it follows."""
        self.comm = comm
        self.cluster_environment = MPIEnvironment(comm)
        rank_zero_only.rank = fabric_rank_zero_only.rank = comm.rank
        self.attach_metric_sync()

    # ---- processes, devices, hosts ----------------------------------------------------------------
    @property
    @override
    def root_device(self) -> torch.device:
        return self.parallel_devices[0]

    @property
    def num_nodes(self) -> int:
        """Hosts of the MPI job (Lightning's ``num_nodes``: set by the Trainer, checked against the job)."""
        return self.cluster_environment.num_nodes

    @num_nodes.setter
    def num_nodes(self, asked: int) -> None:
        self._num_nodes_asked = asked

    @property
    @override
    def is_distributed(self) -> bool:
        return True  # makes Lightning shard the training data with a DistributedSampler

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.replicas.size, "rank": self.replicas.rank}

    @override
    def setup_environment(self) -> None:
        self.check_trainer_matches_job(self.lightning_module.trainer)
        super().setup_environment()
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    def check_trainer_matches_job(self, trainer) -> None:
        """The Trainer's ``devices`` / ``num_nodes`` must describe the MPI job the processes really form."""
        environment = self.cluster_environment
        if self._num_nodes_asked != environment.num_nodes:
            raise UserError(
                f"Trainer(num_nodes={self._num_nodes_asked}) but this MPI job runs on "
                f"{environment.num_nodes} host(s); pass num_nodes={environment.num_nodes} (the job's "
                "hosts come from mpirun's hostfile or --nprocs)"
            )
        # Lightning resolves devices="auto" to the accelerator's device count before we see it: that value
        # cannot be told from the same number given explicitly, and is taken as "whatever the job has".
        connector = trainer._accelerator_connector
        devices = connector._devices_flag
        asked = len(devices) if isinstance(devices, list | tuple) else int(devices)
        if asked not in (-1, connector.accelerator.auto_device_count(), environment.local_size):
            raise UserError(
                f"Trainer(devices={devices!r}) but this MPI job runs {environment.local_size} "
                f"process(es) on this host, one device each; pass devices={environment.local_size} "
                "or devices='auto', and choose the processes with mpirun -np / --nprocs"
            )

    @override
    def model_to_device(self) -> None:
        self.model.to(self.root_device)

    # ---- set-up: every replica starts from rank 0's parameters ------------------------------------
    @override
    def setup(self, trainer) -> None:
        super().setup(trainer)  # device, precision, optimizers
        self.run_collective(self.broadcast_module_state, "the first broadcast of parameters")
        self.attach_metric_sync()

    def broadcast_module_state(self, src: int = 0) -> None:
        """Give every replica ``src``'s parameters and buffers (those this process holds)."""
        state = self.model.state_dict(keep_vars=True).values()
        tensors = [t for t in state if isinstance(t, torch.Tensor) and not t.is_meta]
        with torch.no_grad():
            wait_all([self.replicas.ibroadcast(t.data, root=src) for t in tensors])

    def broadcast_buffers(self) -> None:
        """As DDP's ``broadcast_buffers``: running statistics (BatchNorm) follow the first replica."""
        buffers = [b for b in self.model.buffers() if b.is_floating_point() and not b.is_meta]
        if buffers:
            with torch.no_grad():
                wait_all([self.replicas.ibroadcast(b, root=0) for b in buffers])

    # ---- metrics -------------------------------------------------------------------------------
    def attach_metric_sync(self) -> None:
        """torchmetrics in the model gather their states over the replicas."""
        attach_metric_sync(self.model, self.replicas, self.metrics_can_sync, self.metric_sync_guard)

    def metrics_can_sync(self) -> bool:
        """Whether torchmetrics may gather their states over the replicas now."""
        return self.replicas.size > 1 and not self.ranks_train_apart()

    def evaluate_with_first_replicas_buffers(self) -> None:
        """Each rank's last training batch moved its own running statistics; validation, test and predict
        use the first replica's on every rank (DDP's first forward there broadcasts them too)."""
        if not self.ranks_train_apart():
            with self.metric_sync_guard():
                self.broadcast_buffers()

    @override
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.evaluate_with_first_replicas_buffers()

    @override
    def on_test_start(self) -> None:
        super().on_test_start()
        self.evaluate_with_first_replicas_buffers()

    @override
    def on_predict_start(self) -> None:
        super().on_predict_start()
        self.evaluate_with_first_replicas_buffers()
