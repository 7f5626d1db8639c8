"""Hybrid data + pipeline parallelism (``--strategy hybrid``).

The world of P x D processes is split twice (MPI ``Comm.Split``): a pipeline of P processes holds
one copy of the model, cut into P stages of about equal parameter count (a stage is one or more of
the model's ``pipeline_blocks()``); the D replicas of a stage average its gradients with the
bucketed allreduce of the ``mpi`` strategy (``AveragedGradients``, over the smaller group). Each
process keeps only its own stage's parameters and optimizer state, about 1/P of the model. A model
built in the strategy's ``tensor_init_context`` (``trainer.init_module()``; train.py does) gets its
parameters on the meta device and each process materialises only its own stage's
(``lightning_xd.parallel.stage_parameters``); ``deferred_init=False`` builds whole, for models whose
construction reads their own parameters.

A training step splits the batch into M micro-batches and runs the pipeline schedule (``gpipe`` or
``1f1b``, ``lightning_xd.parallel.pipeline``) inside Lightning's automatic optimization:
``training_step`` runs every forward in the precision plugin's ``train_step_context`` and every
backward through the plugin, each micro-batch's loss weighted by its share of the batch's samples
and scaled by the plugin's GradScaler if it has one; the gradients are set aside while Lightning
zeroes gradients, and ``backward`` runs what Lightning's backward runs around them, once per step:
``on_before_backward(loss)``, the gradients put back and averaged over the replicas,
``on_after_backward``. The stages agree on overflows and clip by the whole model's gradient norm
(``lightning_xd.parallel.pipeline_gradients``).

Loss and metrics are computed on the last stage, whose outputs are shared with the other stages so
every process logs the same values. ``trainer.predict`` returns the last stage's output on every
process of a pipeline. Checkpoints are plain checkpoints of the whole model, every stage's part
gathered; they are loaded after set-up, when each process knows its stage.

    python train.py --model mpnn --strategy hybrid --nprocs 4 --pipeline-stages 2 --microbatches 4
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn
from typing_extensions import override

from lightning_xd.comm.communicator import Communicator
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.mpi_strategy import MPIStrategy
from lightning_xd.parallel.averaged_gradients import AveragedGradients
from lightning_xd.parallel.deferred_init import DeferredInit
from lightning_xd.parallel.gradient_buckets import GradientBuckets
from lightning_xd.parallel.microbatch import sample_shares, split_batch
from lightning_xd.parallel.pipeline import PipelineStage
from lightning_xd.parallel.pipeline_checks import check_pipeline_settings, check_pipeline_trainer
from lightning_xd.parallel.pipeline_gradients import agree_on_overflow, clip_by_global_norm
from lightning_xd.parallel.pipeline_report import pipeline_summary
from lightning_xd.parallel.stage_parameters import (
    gather_optimizer_states,
    gather_state_dict,
    keep_own_stage,
    load_own_state,
)


@STRATEGIES.register("hybrid")
class HybridPipelineStrategy(AveragedGradients, MPIStrategy):
    """P pipeline stages x D data-parallel replicas; rank = replica * P + stage."""

    def __init__(
        self,
        pipeline_stages: int = 2,
        microbatches: int = 4,
        schedule: str = "1f1b",
        deferred_init: bool = True,
        **kwargs: Any,
    ):
        super().__init__(**kwargs)
        self.check_settings(self.comm.size, pipeline_stages, microbatches, schedule)
        self.batch_sharing_processes = pipeline_stages  # every stage of a pipeline works on each batch
        self.stage_count, self.microbatches, self.schedule = pipeline_stages, microbatches, schedule
        self.stage, self.replica = self.comm.rank % pipeline_stages, self.comm.rank // pipeline_stages
        self.pipe: Communicator = self.comm.split(color=self.replica, key=self.stage)
        self._replicas: Communicator = self.comm.split(color=self.stage, key=self.replica)
        self.deferred_init = deferred_init
        self._deferred = DeferredInit()
        self.own_stage: PipelineStage | None = None  # what this process runs of each step
        self.own_blocks: list[nn.Module] = []
        self.own_state_keys: list[str] = []  # state_dict keys of this process's blocks
        self._gradients_of_step: list[tuple[nn.Parameter, Tensor | None]] = []
        self._summary: dict[str, Any] = {}

    check_settings = staticmethod(check_pipeline_settings)  # before any process starts, and on every rank

    @property
    def replicas(self) -> Communicator:
        """This stage's replicas: the processes that hold the same blocks."""
        return self._replicas

    @property
    @override
    def restore_checkpoint_after_setup(self) -> bool:
        """A checkpoint is loaded once set-up has decided (and materialised) this process's stage."""
        return True

    # ---- building: parameters on the meta device, this process's stage materialised at set-up ---------
    @override
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        recording = self._deferred.recording() if self.deferred_init else nullcontext()
        with super().tensor_init_context(empty_init), recording:
            yield

    @override
    def setup(self, trainer) -> None:
        model = self.lightning_module
        self.check_settings(self.comm.size, self.stage_count, self.microbatches, self.schedule, model)
        if trainer.state.fn == TrainerFn.FITTING:
            check_pipeline_trainer(trainer, model)
        if not self.own_blocks:  # decided once: the other stages' parameters never come back
            self.own_blocks, self.own_state_keys = keep_own_stage(model, self.stage_count, self.stage, self._deferred)
        super().setup(trainer)  # device, optimizers over our parameters, broadcast within the replicas
        if self.gradients is not None:
            self.gradients.enabled = False  # on only for the last backward of each schedule
        self.own_stage = PipelineStage(self.own_blocks, model, self.pipe)
        self._gradients_of_step = []
        # Lightning clips through the precision plugin: by norm, that must be the norm of the whole model
        self.precision_plugin.clip_grad_by_norm = lambda optimizer, clip_val: clip_by_global_norm(
            self.pipe, self.precision_plugin.main_params(optimizer), clip_val
        )

    @override
    def model_to_device(self) -> None:
        # the other stages' parameters have no values to move: only the rest goes to the device
        device = self.root_device
        self.model._apply(lambda t: t if t.is_meta else t.to(device))
        _update_properties(self.model, device=device)  # what LightningModule.to() records, as Lightning does

    def gradient_sync(self) -> GradientBuckets:
        return GradientBuckets(
            nn.ModuleList(self.own_blocks), self.replicas, self.bucket_size_mb, self.find_unused_parameters
        )

    @override
    def teardown(self) -> None:
        vars(self.precision_plugin).pop("clip_grad_by_norm", None)
        module = self.lightning_module
        # Lightning's teardown moves the whole module to the CPU; the other stages cannot move: done here
        self._lightning_module = None
        try:
            super().teardown()
        finally:
            self._lightning_module = module
        if module is not None:
            module._apply(lambda t: t if t.is_meta else t.cpu())
            _update_properties(module, device=torch.device("cpu"))

    def _own_parameters(self) -> list[nn.Parameter]:
        return list(nn.ModuleList(self.own_blocks).parameters())

    # ---- steps -----------------------------------------------------------------------------------
    def _microbatches(self, batch: Any) -> list:
        split = getattr(self.lightning_module, "split_microbatches", None)
        return split(batch, self.microbatches) if callable(split) else split_batch(batch, self.microbatches)

    @override
    def training_step(self, batch: Any, batch_idx: int, *args: Any) -> Tensor:
        """One pipeline schedule over the batch's micro-batches: forward and backward, gradients
        accumulated over the micro-batches and set aside until Lightning calls backward().
        Returns the batch's mean loss (the micro-batches' losses weighted by their shares)."""
        params = self._own_parameters()
        for p in params:
            p.grad = None
        microbatches = self._microbatches(batch)
        shares = sample_shares(microbatches)
        context = self.precision_plugin.train_step_context
        outputs, losses = self.own_stage.train_step(
            microbatches, self.schedule, shares, context, self._backward_pass, self._before_last_backward
        )
        self._gradients_of_step = [(p, p.grad) for p in params]
        for p in params:  # Lightning zeroes gradients between training_step and backward
            p.grad = None
        if not self.own_stage.last:  # the last stage computed and logged them inside the schedule
            with context(), torch.no_grad():
                losses = [self.lightning_module.pipeline_loss(o, mb, "train") for o, mb in zip(outputs, microbatches)]
        return sum(share * loss for share, loss in zip(shares, losses))

    def _backward_pass(self, tensor: Tensor, grad: Tensor | None) -> None:
        """One backward of the schedule, through the precision plugin: a micro-batch's loss (``grad`` None)
        is scaled first, as the plugin's ``pre_backward`` scales a loss, without running the step's hooks."""
        scaler = getattr(self.precision_plugin, "scaler", None)
        if grad is None and scaler is not None:
            tensor = scaler.scale(tensor)
        optimizer = self.optimizers[0] if self.optimizers else None
        self.precision_plugin.backward(tensor, self.lightning_module, optimizer, grad)

    def _before_last_backward(self, tensor: Tensor) -> None:
        if self.gradients is not None:
            self.gradients.enabled = True
            self.pre_backward(tensor)  # the buckets follow requires_grad; unused parameters found from here

    @override
    def backward(self, closure_loss: Tensor, optimizer, *args: Any, **kwargs: Any) -> Tensor:
        """The schedule ran the backward passes; here what Lightning runs around a backward, once per step."""
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)  # on_before_backward
        for p, grad in self._gradients_of_step:
            p.grad = grad
        self._gradients_of_step = []
        self.post_backward(closure_loss)  # averaged over the replicas
        if self.gradients is not None:
            self.gradients.enabled = False  # until the last backward of the next schedule
        closure_loss = self.precision_plugin.post_backward(closure_loss, module)  # on_after_backward
        if getattr(self.precision_plugin, "scaler", None) is not None and self.comm.size > 1:
            agree_on_overflow(self.comm, self._own_parameters())
        return closure_loss

    def _forward_only(self, batch: Any, context: Callable[[], AbstractContextManager]) -> tuple[list, list[Tensor]]:
        microbatches = self._microbatches(batch)
        return microbatches, self.own_stage.eval_step(microbatches, context)

    def _evaluate(self, batch: Any, split: str, context: Callable[[], AbstractContextManager]) -> None:
        microbatches, outputs = self._forward_only(batch, context)
        with context(), torch.no_grad():
            for output, microbatch in zip(outputs, microbatches):
                self.lightning_module.pipeline_loss(output, microbatch, split)

    @override
    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "val", self.precision_plugin.val_step_context)

    @override
    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "test", self.precision_plugin.test_step_context)

    @override
    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Tensor:
        """The last stage's output for the batch (its micro-batches' outputs concatenated), on every stage."""
        _, outputs = self._forward_only(batch, self.precision_plugin.predict_step_context)
        return torch.cat([o.reshape(1) if o.dim() == 0 else o for o in outputs])

    # ---- what it cost ---------------------------------------------------------------------------
    @override
    def on_train_end(self) -> None:
        own_params = sum(p.numel() for p in self._own_parameters())
        self._summary = pipeline_summary(
            self.comm, self.own_stage.recorded, own_params, self.stage_count, self.microbatches, self.schedule
        )
        trainer = self.lightning_module.trainer
        if trainer.logger is not None:
            shown = ("pipeline/bubble_measured", "pipeline/bubble_theory")
            trainer.logger.log_metrics({k: self._summary[k] for k in shown}, step=trainer.global_step)

    def summary_metrics(self) -> dict[str, Any]:
        return dict(self._summary)

    # ---- checkpoints: every stage's part, gathered into one plain checkpoint ----------------
    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return gather_state_dict(self.comm, self.lightning_module, self.own_state_keys, self.replica == 0)

    @override
    def optimizer_state(self, optimizer) -> dict[str, Any]:
        return gather_optimizer_states(self.comm, optimizer, self.replica == 0, self.stage_count)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        load_own_state(self.lightning_module, checkpoint["state_dict"], self.own_state_keys)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state["pipeline_stages"][self.stage])
            _optimizer_to_device(optimizer, self.root_device)
