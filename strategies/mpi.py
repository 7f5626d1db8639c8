"""Synchronous data parallelism over MPI (``--strategy mpi``).

Every rank holds the whole model and its own shard of the data. At setup rank 0's parameters
and buffers are broadcast; during backward each gradient bucket starts a non-blocking allreduce
as soon as it is complete; after backward we wait for the buckets and average, so every rank
takes the same optimizer step. Lightning's reduce / all_gather / broadcast / barrier run over
MPI, so logged and torchmetrics epoch metrics cover the whole dataset on every rank.

With ``--fault-tolerance ulfm`` (the default when train.py starts the job) a killed process is
survived inside the job: the others shrink the communicator, redo the interrupted step and go on
with the rest of the epoch re-sharded over them (``lightning_xd.fault_tolerance.recovery``).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lightning_xd.comm import ulfm
from lightning_xd.comm.collectives import MPICollectives, attach_metric_sync
from lightning_xd.comm.communicator import Communicator, wait_all, world
from lightning_xd.comm.environment import MPIEnvironment, device_for
from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.recovery import InJobRecovery
from lightning_xd.fault_tolerance.resumable import ResumableTrainingData
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.parallel.gradient_buckets import GradientBuckets


@STRATEGIES.register("mpi", ulfm=True)
class MPIAllReduceStrategy(InJobRecovery, ResumableTrainingData, MPICollectives, ParallelStrategy):
    """Bucketed, overlapped gradient allreduce; the MPI counterpart of Lightning's DDP."""

    strategy_name = "mpi"

    def __init__(
        self,
        bucket_size_mb: float | None = None,
        find_unused_parameters: bool = False,
        overlap: bool = True,
        fault_tolerance: str | None = None,
        collective_timeout: float = 300.0,
        **kwargs: Any,
    ):
        self.comm: Communicator = world()
        self.collective_comm: Communicator = self.comm
        environment = MPIEnvironment(self.comm)
        super().__init__(
            parallel_devices=[device_for(environment.local_rank())], cluster_environment=environment, **kwargs
        )
        self.bucket_size_mb, self.find_unused_parameters, self.overlap = bucket_size_mb, find_unused_parameters, overlap
        self.gradients: GradientBuckets | None = None
        self._num_nodes_asked = environment.num_nodes
        self.enable_recovery(fault_tolerance, collective_timeout)

    @property
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
    def is_distributed(self) -> bool:
        return True  # makes Lightning shard the training data with a DistributedSampler

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": self.world_size, "rank": self.global_rank}

    def setup_environment(self) -> None:
        self.check_trainer_matches_job(self.lightning_module.trainer)
        super().setup_environment()
        rank_zero_only.rank = fabric_rank_zero_only.rank = self.global_rank

    def check_trainer_matches_job(self, trainer) -> None:
        """The Trainer's ``devices`` / ``num_nodes`` must describe the MPI job the processes really form:
        the job, not the Trainer, decides how many processes there are."""
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
        asked = len(devices) if isinstance(devices, (list, tuple)) else int(devices)
        if asked not in (-1, connector.accelerator.auto_device_count(), environment.local_size):
            raise UserError(
                f"Trainer(devices={devices!r}) but this MPI job runs {environment.local_size} "
                f"process(es) on this host, one device each; pass devices={environment.local_size} "
                "or devices='auto', and choose the processes with mpirun -np / --nprocs"
            )

    def setup(self, trainer) -> None:
        if self._layer_sync is not None and trainer.state.fn == TrainerFn.FITTING:
            from lightning_xd.parallel.sync_batchnorm import MPISyncBatchNorm

            # Lightning hands us its torch.distributed SyncBatchNorm, which needs a process group (and a GPU)
            self._layer_sync = MPISyncBatchNorm(lambda: self.replicas)
            self.model = self._layer_sync.apply(self.model)
        super().setup(trainer)  # device, precision, optimizers
        self.check_recovery_applies(self.lightning_module)
        self.with_recovery(lambda: self.broadcast_module_state(src=0), "the first broadcast of parameters")
        attach_metric_sync(self.model, self.collective_comm, self.metrics_can_sync, self.metric_sync_guard)
        if trainer.state.fn == TrainerFn.FITTING:
            self.gradients = self.gradient_sync()

    def gradient_sync(self) -> GradientBuckets | None:
        """What averages gradients after backward: the bucketed, overlapped allreduce."""
        return GradientBuckets(
            self.model, self.replicas, self.bucket_size_mb, self.find_unused_parameters, self.overlap
        )

    def metric_sync_guard(self):
        """A metric's gather is watched like any collective; a process lost there (during validation or
        test, which are not redone on the survivors) ends the job, for the supervisor to restart."""
        return ulfm.detect() if self.ulfm else nullcontext()

    def metrics_can_sync(self) -> bool:
        """Whether torchmetrics may gather their states over the ranks now."""
        return self.collective_comm.size > 1

    def model_to_device(self) -> None:
        self.model.to(self.root_device)

    def broadcast_module_state(self, src: int = 0) -> None:
        """Give every rank of the data-parallel group ``src``'s parameters and buffers."""
        tensors = [t for t in self.model.state_dict(keep_vars=True).values() if isinstance(t, torch.Tensor)]
        with torch.no_grad():
            wait_all([self.replicas.ibroadcast(t.data, root=src) for t in tensors])

    @property
    def replicas(self) -> Communicator:
        """The ranks that hold copies of the same parameters and average their gradients."""
        return self.comm

    def broadcast_buffers(self) -> None:
        """As DDP's ``broadcast_buffers``: running statistics (BatchNorm) follow the first replica."""
        buffers = [b for b in self.model.buffers() if b.is_floating_point()]
        if buffers:
            with torch.no_grad():
                wait_all([self.replicas.ibroadcast(b, root=0) for b in buffers])

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self.with_recovery(self.broadcast_buffers, "broadcasting buffers")

    def evaluate_with_first_replicas_buffers(self) -> None:
        """Each rank's last training batch moved its own running statistics; validation, test and predict
        use the first replica's on every rank (DDP's first forward there broadcasts them too)."""
        with self.metric_sync_guard():
            self.broadcast_buffers()

    def on_validation_start(self) -> None:
        super().on_validation_start()
        self.evaluate_with_first_replicas_buffers()

    def on_test_start(self) -> None:
        super().on_test_start()
        self.evaluate_with_first_replicas_buffers()

    def on_predict_start(self) -> None:
        super().on_predict_start()
        self.evaluate_with_first_replicas_buffers()

    def pre_backward(self, closure_loss: torch.Tensor) -> None:
        """Before backward: the buckets follow the parameters that now require gradients."""
        if self.gradients is not None:
            self.gradients.prepare_for_backward(closure_loss)

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """Wait for the gradient buckets and average: every rank now holds the same gradients."""
        if self.gradients is not None and self.gradients.active:  # not while gradients accumulate
            self.gradients.synchronize()
            self.after_gradient_sync()

    def use_communicator(self, comm: Communicator) -> None:
        """Go on over ``comm`` (the survivors, after a failure): everything that depends on it follows."""
        self.comm = self.collective_comm = comm
        self.cluster_environment = MPIEnvironment(comm)
        rank_zero_only.rank = fabric_rank_zero_only.rank = comm.rank
        if self.gradients is not None:
            self.gradients.remove()
            self.gradients = self.gradient_sync()
        attach_metric_sync(self.model, self.collective_comm, self.metrics_can_sync, self.metric_sync_guard)

    def summary_metrics(self) -> dict[str, Any]:
        return self.recovery_metrics()

    @contextmanager
    def block_backward_sync(self):
        """No gradient exchange while gradients accumulate over several batches."""
        if self.gradients is None:
            yield
            return
        self.gradients.enabled = False
        try:
            yield
        finally:
            self.gradients.enabled = True

    def teardown(self) -> None:
        if self.gradients is not None:
            self.gradients.remove()
            self.gradients = None
        if self._layer_sync is not None and self.model is not None:
            self.model = self._layer_sync.revert(self.model)
        self.stop_recovery()
        super().teardown()
