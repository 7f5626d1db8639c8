"""Hybrid data + pipeline parallelism (``--strategy hybrid``).

The world of P x D processes is split twice (MPI ``Comm.Split``): a pipeline group of P processes
holds one copy of the model, cut into P parts of about equal parameter count; a data-parallel
group of D processes holds the same part and averages its gradients with the bucketed allreduce
of the ``mpi`` strategy (reused: the same class, over the smaller group). Each process keeps
only its own part's parameters and optimizer state, about 1/P of the model.

Building. A model built under ``trainer.init_module()`` (train.py builds every model in the strategy's
``tensor_init_context``) gets its parameters on the meta device, their initialisation recorded
(``lightning_xd.parallel.deferred_init``); at set-up each process materialises only its own stages' parameters
(and any outside the stages) by replaying that initialisation, so they start from exactly the values
the unsplit model would, and the other stages' parameters never get storage: the most parameter memory a
process allocates is its share, plus one parameter at a time while building. A model built whole anyway
is cut at set-up (the other stages' parameters move to the meta device). ``deferred_init=False`` builds
whole, for models whose construction reads their own parameters.

A training step splits the batch into M micro-batches and runs the pipeline schedule (``gpipe``
or ``1f1b``, see ``lightning_xd.parallel.pipeline``) inside Lightning's automatic optimization:
``training_step`` runs every forward in the precision plugin's ``train_step_context`` (autocast for
bf16-/16-mixed) and every backward through the plugin, each micro-batch's loss weighted by its share
of the batch's samples (the step's gradient is that of the batch's mean loss, whatever the sizes) and
scaled by the plugin's GradScaler if it has one; the gradients are then set aside while Lightning
zeroes gradients, and ``backward`` runs what Lightning's backward runs around them, once per step on
every process: ``on_before_backward(loss)`` with the step's loss (scaled under a GradScaler, as
Lightning passes it), the gradients put back and averaged over the replicas, ``on_after_backward``
(seeing averaged gradients, as under DDP). The schedule interleaves the micro-batches' forwards and
backwards, so no moment lies between the step's forward and its backward: the hooks bracket the moment
the step's gradients appear. Under a GradScaler an overflow on any process makes every process skip
the step, so all stages keep one scale; clipping by norm uses the norm over all stages' gradients.

Loss and metrics are computed on the last stage, whose outputs are shared with the other stages of its
pipeline so every process logs the same values. ``trainer.predict`` returns the last stage's output
(the micro-batches' outputs concatenated) on every process of a pipeline, each replica for its share
of the samples (a model's own ``predict_step`` is not called: it would run the whole model here).
Checkpoints hold every part: the state of each stage is gathered to one file, which is a plain
checkpoint of the whole model; it is loaded after set-up, when each process knows its stages.

    python train.py --model mpnn --strategy hybrid --nprocs 4 --pipeline-stages 2 --microbatches 4
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Generator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from lightning.fabric.utilities.device_dtype_mixin import _update_properties
from lightning.fabric.utilities.optimizer import _optimizer_to_device
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor, nn

from lightning_xd.comm.communicator import Communicator, wait_all
from lightning_xd.errors import UserError
from lightning_xd.launch.registry import STRATEGIES
from lightning_xd.parallel.deferred_init import DeferredInit
from lightning_xd.parallel.gradient_buckets import GradientBuckets
from lightning_xd.parallel.microbatch import sample_shares, split_batch
from lightning_xd.parallel.pipeline import SCHEDULES, PipelineStage, StepTimes, partition
from lightning_xd.strategies.mpi import MPIAllReduceStrategy

PIPELINE_METHODS = ("pipeline_stages", "pipeline_input", "pipeline_loss")


@STRATEGIES.register("hybrid")
class HybridPipelineStrategy(MPIAllReduceStrategy):
    """P pipeline stages x D data-parallel replicas; rank = replica * P + stage."""

    strategy_name = "hybrid"
    supports_ulfm = False  # a lost stage breaks its pipeline; the supervisor restarts the job

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
        self.stages, self.microbatches, self.schedule = pipeline_stages, microbatches, schedule
        self.stage, self.replica = self.comm.rank % pipeline_stages, self.comm.rank // pipeline_stages
        self.pipe: Communicator = self.comm.split(color=self.replica, key=self.stage)
        self._replicas: Communicator = self.comm.split(color=self.stage, key=self.replica)
        self.collective_comm = self._replicas
        self.deferred_init = deferred_init
        self._deferred = DeferredInit()
        self.runner: PipelineStage | None = None
        self.own_modules: list[nn.Module] = []
        self.stage_keys: list[str] = []  # state_dict keys of the stages this process runs
        self._gradients_of_step: list[tuple[nn.Parameter, Tensor | None]] = []
        self._summary: dict[str, Any] = {}

    @staticmethod
    def check_settings(
        nprocs: int,
        pipeline_stages: int = 2,
        microbatches: int = 4,
        schedule: str = "1f1b",
        model: nn.Module | None = None,
    ) -> None:
        """Checked before any process starts (with the model), and again by every rank."""
        if model is not None:
            missing = [m for m in PIPELINE_METHODS if not callable(getattr(model, m, None))]
            if missing:
                raise UserError(
                    f"model {type(model).__name__} cannot be split into pipeline stages (it has no "
                    f"{', '.join(missing)}); use --strategy mpi"
                )
            count = len(list(model.pipeline_stages()))
            if pipeline_stages > count:
                raise UserError(
                    f"--pipeline-stages {pipeline_stages} but {type(model).__name__} has only {count} stages; use fewer"
                )
        if schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        if pipeline_stages < 1 or microbatches < 1:
            raise UserError("--pipeline-stages and --microbatches must be at least 1")
        if nprocs % pipeline_stages:
            raise UserError(
                f"{nprocs} processes cannot form pipelines of {pipeline_stages} stages; "
                f"use a multiple of {pipeline_stages} for --nprocs"
            )

    @staticmethod
    def check_trainer(trainer, model: nn.Module) -> None:
        """What the pipeline schedule cannot train with, refused on every rank alike."""
        if not getattr(model, "automatic_optimization", True):
            raise UserError(
                "the hybrid strategy runs each step's backward passes itself, in its pipeline schedule: "
                "it needs Lightning's automatic optimization; use --strategy mpi for manual optimization"
            )
        if trainer.accumulate_grad_batches != 1:
            raise UserError(
                "the hybrid strategy accumulates over micro-batches; use --microbatches instead of "
                "accumulating gradients over batches"
            )

    @property
    def replicas(self) -> Communicator:
        return self._replicas

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every stage of a pipeline reads the same batches: data is split over the replicas only."""
        return {"num_replicas": self.comm.size // self.stages, "rank": self.replica}

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        """A checkpoint is loaded once set-up has decided (and materialised) this process's stages."""
        return True

    # ---- building: parameters on the meta device, this process's stages materialised at set-up ---------
    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Generator[None, None, None]:
        recording = self._deferred.recording() if self.deferred_init else nullcontext()
        with super().tensor_init_context(empty_init), recording:
            yield

    def setup(self, trainer) -> None:
        model = self.lightning_module
        self.check_settings(self.comm.size, self.stages, self.microbatches, self.schedule, model)
        if trainer.state.fn == TrainerFn.FITTING:
            self.check_trainer(trainer, model)
        if not self.own_modules:  # decided once: the other stages' parameters never come back
            self._keep_own_stages(model)
        super().setup(trainer)  # device, optimizers over our parameters, broadcast within the replicas
        if self.gradients is not None:
            self.gradients.enabled = False  # on only for the last backward of each schedule
        self.runner = PipelineStage(self.own_modules, model, self.pipe)
        self._gradients_of_step = []
        # Lightning clips through the precision plugin: by norm, that must be the norm of the whole model
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_global_norm

    def _keep_own_stages(self, model: nn.Module) -> None:
        """Materialise what this process runs; the other stages' parameters stay on (or move to) meta."""
        stages = list(model.pipeline_stages())
        parts = partition([sum(p.numel() for p in s.parameters()) for s in stages], self.stages)
        own = [stages[i] for i in parts[self.stage]]
        # by tensor, not by module name: a model may build its stages afresh around its own layers (MPNN)
        own_ids = {id(p) for m in own for p in m.parameters()}
        others = {
            id(p): p
            for i, s in enumerate(stages)
            if i not in parts[self.stage]
            for p in s.parameters()
            if id(p) not in own_ids
        }
        modules = [model, *stages]
        everything = {id(p): p for m in modules for p in m.parameters()}
        names = {id(p): name for name, p in model.named_parameters()}
        replacements = self._deferred.materialise([p for key, p in everything.items() if key not in others], names)
        for key, p in others.items():
            replacements[key] = DeferredInit.on_meta_only(p)
        _replace_parameters(modules, replacements)
        self._deferred.forget()
        self.own_modules = own
        own_tensors = {id(t) for m in own for t in [*m.parameters(), *m.buffers()]}
        self.stage_keys = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in own_tensors]

    def model_to_device(self) -> None:
        # the other stages' parameters have no values to move: only the rest goes to the device
        device = self.root_device
        self.model._apply(lambda t: t if t.is_meta else t.to(device))
        _update_properties(self.model, device=device)  # what LightningModule.to() records, as Lightning does

    def broadcast_module_state(self, src: int = 0) -> None:
        tensors = [t for t in self.model.state_dict(keep_vars=True).values() if isinstance(t, Tensor) and not t.is_meta]
        with torch.no_grad():
            wait_all([self.replicas.ibroadcast(t.data, root=src) for t in tensors])

    def gradient_sync(self) -> GradientBuckets | None:
        return GradientBuckets(
            nn.ModuleList(self.own_modules), self.replicas, self.bucket_size_mb, self.find_unused_parameters
        )

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
        return list(nn.ModuleList(self.own_modules).parameters())

    # ---- steps -----------------------------------------------------------------------------------
    def _microbatches(self, batch: Any) -> list:
        split = getattr(self.lightning_module, "split_microbatches", None)
        return split(batch, self.microbatches) if callable(split) else split_batch(batch, self.microbatches)

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
        outputs, losses = self.runner.train_step(
            microbatches, self.schedule, shares, context, self._backward_pass, self._before_last_backward
        )
        self._gradients_of_step = [(p, p.grad) for p in params]
        for p in params:  # Lightning zeroes gradients between training_step and backward
            p.grad = None
        if not self.runner.last:  # the last stage computed and logged them inside the schedule
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
        self._agree_on_overflow()
        return closure_loss

    def _agree_on_overflow(self) -> None:
        """Under a GradScaler: if any process has an inf/nan gradient, every process skips the step.

        Each process's scaler checks its own gradients only; a stage that stepped while another skipped
        would leave the model inconsistent and the stages' scales apart. An overflow elsewhere is made
        visible to this process's scaler by an inf in one of its gradients (the step is skipped anyway)."""
        if getattr(self.precision_plugin, "scaler", None) is None or self.comm.size == 1:
            return
        grads = [p.grad for p in self._own_parameters() if p.grad is not None]
        values = [g.coalesce().values() if g.is_sparse else g for g in grads]
        here = any(not bool(torch.isfinite(v).all()) for v in values)
        anywhere = bool(self.comm.allreduce(torch.tensor([int(here)], dtype=torch.int32), "max")[0])
        if anywhere and not here and values:
            values[0].fill_(float("inf"))

    def _clip_grad_by_global_norm(self, optimizer, clip_val: float) -> None:
        """Clip by the norm of the whole model's gradient: the stages' shares of it, summed over the pipeline
        (replicas hold the same averaged gradients, so each stage counts once)."""
        params = [p for p in self.precision_plugin.main_params(optimizer) if p.grad is not None]
        local = torch.nn.utils.get_total_norm([p.grad for p in params], norm_type=2.0)
        squared = self.pipe.allreduce(local.detach().double().pow(2).cpu().reshape(1), "sum")
        total = squared.sqrt().to(local.device, local.dtype).reshape(())
        torch.nn.utils.clip_grads_with_norm_(params, clip_val, total)

    def _forward_only(self, batch: Any, context: Callable[[], AbstractContextManager]) -> tuple[list, list[Tensor]]:
        microbatches = self._microbatches(batch)
        return microbatches, self.runner.eval_step(microbatches, context)

    def _evaluate(self, batch: Any, stage: str, context: Callable[[], AbstractContextManager]) -> None:
        microbatches, outputs = self._forward_only(batch, context)
        with context(), torch.no_grad():
            for output, microbatch in zip(outputs, microbatches):
                self.lightning_module.pipeline_loss(output, microbatch, stage)

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "val", self.precision_plugin.val_step_context)

    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "test", self.precision_plugin.test_step_context)

    def predict_step(self, batch: Any, batch_idx: int, *args: Any) -> Tensor:
        """The last stage's output for the batch (its micro-batches' outputs concatenated), on every stage."""
        _, outputs = self._forward_only(batch, self.precision_plugin.predict_step_context)
        return torch.cat([o.reshape(1) if o.dim() == 0 else o for o in outputs])

    # ---- what it cost ---------------------------------------------------------------------------
    def on_train_end(self) -> None:
        steps = self.runner.recorded[1:] or self.runner.recorded  # the first step includes warm-up
        idle = sum(t.idle_fraction for t in steps) / max(1, len(steps))
        own_params = sum(p.numel() for m in self.own_modules for p in m.parameters())
        last = self.runner.recorded[-1] if self.runner.recorded else StepTimes()
        per_rank = self.comm.allgather_object(
            {
                "bubble": idle,
                "params": own_params,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "timeline": last.timeline,
                "step_s": last.total,
            }
        )
        total_params = sum(r["params"] for r in per_rank[: self.stages])
        p, m = self.stages, self.microbatches
        self._summary = {
            "pipeline/stages": p,
            "pipeline/microbatches": m,
            "pipeline/schedule": self.schedule,
            "pipeline/bubble_measured": sum(r["bubble"] for r in per_rank) / len(per_rank),
            "pipeline/bubble_theory": (p - 1) / (m + p - 1),
            "pipeline/bubble_per_rank": [r["bubble"] for r in per_rank],
            "pipeline/params_per_rank": [r["params"] for r in per_rank],
            "pipeline/params_total": total_params,
            "pipeline/param_fraction_max": max(r["params"] for r in per_rank) / max(1, total_params),
            "pipeline/peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in per_rank],
            "pipeline/timelines": {r: info["timeline"] for r, info in enumerate(per_rank)},
            "pipeline/last_step_s": {r: info["step_s"] for r, info in enumerate(per_rank)},
        }
        logger = self.lightning_module.trainer.logger
        if logger is not None:
            logger.log_metrics(
                {
                    "pipeline/bubble_measured": self._summary["pipeline/bubble_measured"],
                    "pipeline/bubble_theory": self._summary["pipeline/bubble_theory"],
                },
                step=self.lightning_module.trainer.global_step,
            )

    def summary_metrics(self) -> dict[str, Any]:
        return dict(self._summary)

    # ---- checkpoints: every stage's part, gathered into one plain checkpoint ----------------
    def lightning_module_state_dict(self) -> dict[str, Any]:
        state = self.lightning_module.state_dict()
        own = {k: v.detach().cpu() for k, v in state.items() if k in self.stage_keys} if self.replica == 0 else {}
        merged = {k: v for k, v in state.items() if k not in self._all_stage_keys()}
        for part in self.comm.allgather_object(own):
            merged.update(part)
        return merged

    def _all_stage_keys(self) -> set[str]:
        return {k for part in self.comm.allgather_object(self.stage_keys) for k in part}

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        own = optimizer.state_dict() if self.replica == 0 else None
        parts = self.comm.allgather_object(own)
        return {"pipeline_stages": [parts[s] for s in range(self.stages)]}

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        state = checkpoint["state_dict"]
        missing = [k for k in self.stage_keys if k not in state]
        if missing:
            raise UserError(
                f"checkpoint lacks this stage's parameters ({', '.join(missing[:3])} ...); it was not "
                "written by this model"
            )
        held = {k for k, t in self.lightning_module.state_dict(keep_vars=True).items() if not t.is_meta}
        self.lightning_module.load_state_dict({k: v for k, v in state.items() if k in held}, strict=False)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state["pipeline_stages"][self.stage])
            _optimizer_to_device(optimizer, self.root_device)


def _replace_parameters(modules: list[nn.Module], replacements: dict[int, nn.Parameter]) -> None:
    """Put each new parameter wherever the one it replaces was registered (tied weights stay tied)."""
    seen: set[int] = set()
    for root in modules:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in list(module.named_parameters(recurse=False)):
                if id(p) in replacements:
                    setattr(module, name, replacements[id(p)])  # through __setattr__: RNNs update their weight lists
