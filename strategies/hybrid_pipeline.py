"""Hybrid data + pipeline parallelism (``--strategy hybrid``).

The world of P x D processes is split twice (MPI ``Comm.Split``): a pipeline group of P processes
holds one copy of the model, cut into P parts of about equal parameter count; a data-parallel
group of D processes holds the same part and averages its gradients with the bucketed allreduce
of the ``mpi`` strategy (reused: the same class, over the smaller group). Each process keeps
only its own part's parameters and optimizer state, about 1/P of the model.

A training step splits the batch into M micro-batches and runs the pipeline schedule (``gpipe``
or ``1f1b``, see ``lightning_xd.pipeline``); loss and metrics are computed on the last stage,
whose outputs are then shared with the other stages of its pipeline so every process logs the
same values. Checkpoints hold every part: the state of each stage is gathered to one file, which
is a plain checkpoint of the whole model.

    python train.py --model mpnn --strategy hybrid --nprocs 4 --pipeline-stages 2 --microbatches 4
"""
from __future__ import annotations

import resource
from typing import Any, Mapping, Optional

import torch
from torch import nn

from lightning_xd.comm import Communicator
from lightning_xd.errors import UserError
from lightning_xd.gradient_buckets import GradientBuckets
from lightning_xd.microbatch import split_batch
from lightning_xd.pipeline import SCHEDULES, PipelineStage, StepTimes, partition
from lightning_xd.registry import STRATEGIES
from strategies.mpi_allreduce import MPIAllReduceStrategy

PIPELINE_METHODS = ("pipeline_stages", "pipeline_input", "pipeline_loss")


@STRATEGIES.register("hybrid")
class HybridPipelineStrategy(MPIAllReduceStrategy):
    """P pipeline stages x D data-parallel replicas; rank = replica * P + stage."""

    strategy_name = "hybrid"
    supports_ulfm = False  # a lost stage breaks its pipeline; the supervisor restarts the job

    def __init__(self, pipeline_stages: int = 2, microbatches: int = 4, schedule: str = "1f1b", **kwargs: Any):
        super().__init__(**kwargs)
        self.check_settings(self.comm.size, pipeline_stages, microbatches, schedule)
        self.stages, self.microbatches, self.schedule = pipeline_stages, microbatches, schedule
        self.stage, self.replica = self.comm.rank % pipeline_stages, self.comm.rank // pipeline_stages
        self.pipe: Communicator = self.comm.split(color=self.replica, key=self.stage)
        self._replicas: Communicator = self.comm.split(color=self.stage, key=self.replica)
        self.collective_comm = self._replicas
        self.runner: Optional[PipelineStage] = None
        self.own_modules: list[nn.Module] = []
        self.stage_keys: list[str] = []  # state_dict keys of the stages this process runs
        self._summary: dict[str, Any] = {}

    @staticmethod
    def check_settings(nprocs: int, pipeline_stages: int = 2, microbatches: int = 4, schedule: str = "1f1b",
                       model: Optional[nn.Module] = None) -> None:
        """Checked before any process starts (with the model), and again by every rank."""
        if model is not None:
            missing = [m for m in PIPELINE_METHODS if not callable(getattr(model, m, None))]
            if missing:
                raise UserError(f"model {type(model).__name__} cannot be split into pipeline stages (it has no "
                                f"{', '.join(missing)}); use --strategy mpi")
            count = len(list(model.pipeline_stages()))
            if pipeline_stages > count:
                raise UserError(f"--pipeline-stages {pipeline_stages} but {type(model).__name__} has only {count} "
                                "stages; use fewer")
        if schedule not in SCHEDULES:
            raise UserError(f"unknown --schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        if pipeline_stages < 1 or microbatches < 1:
            raise UserError("--pipeline-stages and --microbatches must be at least 1")
        if nprocs % pipeline_stages:
            raise UserError(f"{nprocs} processes cannot form pipelines of {pipeline_stages} stages; "
                            f"use a multiple of {pipeline_stages} for --nprocs")

    @property
    def replicas(self) -> Communicator:
        return self._replicas

    @property
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        """Every stage of a pipeline reads the same batches: data is split over the replicas only."""
        return {"num_replicas": self.comm.size // self.stages, "rank": self.replica}

    # ---- set-up: keep only this process's stages ------------------------------------------------
    def setup(self, trainer) -> None:
        model = self.lightning_module
        self.check_settings(self.comm.size, self.stages, self.microbatches, self.schedule, model)
        stages = list(model.pipeline_stages())
        if not self.own_modules:  # decided once: after fit, other stages' parameters are gone
            parts = partition([sum(p.numel() for p in s.parameters()) for s in stages], self.stages)
            self.own_modules = [stages[i] for i in parts[self.stage]]
            self._release_other_stages(model, [s for i, s in enumerate(stages) if i not in parts[self.stage]])
        super().setup(trainer)  # device, optimizers over our parameters, broadcast within the replicas
        if self.gradients is not None:
            self.gradients.enabled = False  # on only for the last backward of each schedule
        if trainer.accumulate_grad_batches != 1:
            raise UserError("the hybrid strategy accumulates over micro-batches; use --microbatches instead of "
                            "accumulating gradients over batches")
        self.runner = PipelineStage(self.own_modules, model, self.pipe)
        self._gradients_of_step: list = []

    def _release_other_stages(self, model: nn.Module, others: list[nn.Module]) -> None:
        """Free the parameters of the stages other processes run: they are never used here."""
        # by tensor, not by module name: a model may build its stages afresh around its own layers (MPNN)
        own = {id(t) for m in self.own_modules for t in [*m.parameters(), *m.buffers()]}
        self.stage_keys = [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in own]
        for module in others:
            for p in module.parameters():
                p.data = torch.empty(0, dtype=p.dtype, device=p.device)
                p.requires_grad_(False)

    def gradient_sync(self) -> Optional[GradientBuckets]:
        return GradientBuckets(nn.ModuleList(self.own_modules), self.replicas, self.bucket_size_mb)

    # ---- steps -----------------------------------------------------------------------------------
    def _microbatches(self, batch: Any) -> list:
        split = getattr(self.lightning_module, "split_microbatches", None)
        return split(batch, self.microbatches) if callable(split) else split_batch(batch, self.microbatches)

    def training_step(self, batch: Any, batch_idx: int, *args: Any) -> torch.Tensor:
        """One pipeline schedule over the batch's micro-batches: forward and backward, gradients
        accumulated over the micro-batches and set aside until Lightning calls backward()."""
        params = [p for m in self.own_modules for p in m.parameters()]
        for p in params:
            p.grad = None
        microbatches = self._microbatches(batch)
        outputs, losses = self.runner.train_step(microbatches, self.schedule, self._before_last_backward)
        self._gradients_of_step = [(p, p.grad) for p in params]
        for p in params:  # Lightning zeroes gradients between training_step and backward
            p.grad = None
        if not self.runner.last:  # the last stage computed and logged them inside the schedule
            with torch.no_grad():
                losses = [self.lightning_module.pipeline_loss(o, mb, "train") for o, mb in zip(outputs, microbatches)]
        return torch.stack(losses).mean()

    def _before_last_backward(self) -> None:
        if self.gradients is not None:
            self.gradients.enabled = True

    def backward(self, closure_loss: torch.Tensor, optimizer, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Backward already ran inside the schedule; what is left is averaging over the replicas."""
        for p, grad in self._gradients_of_step:
            p.grad = grad
        self.post_backward(closure_loss)
        if self.gradients is not None:
            self.gradients.enabled = False  # until the last backward of the next schedule
        return closure_loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        microbatches = self._microbatches(batch)
        outputs = self.runner.eval_step(microbatches)
        with torch.no_grad():
            for output, microbatch in zip(outputs, microbatches):
                self.lightning_module.pipeline_loss(output, microbatch, stage)

    def validation_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int, *args: Any) -> None:
        self._evaluate(batch, "test")

    # ---- what it cost ---------------------------------------------------------------------------
    def on_train_end(self) -> None:
        steps = self.runner.recorded[1:] or self.runner.recorded  # the first step includes warm-up
        idle = sum(t.idle_fraction for t in steps) / max(1, len(steps))
        own_params = sum(p.numel() for m in self.own_modules for p in m.parameters())
        last = self.runner.recorded[-1] if self.runner.recorded else StepTimes()
        per_rank = self.comm.allgather_object({
            "bubble": idle, "params": own_params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "timeline": last.timeline, "step_s": last.total})
        total_params = sum(r["params"] for r in per_rank[: self.stages])
        p, m = self.stages, self.microbatches
        self._summary = {
            "pipeline/stages": p, "pipeline/microbatches": m, "pipeline/schedule": self.schedule,
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
            logger.log_metrics({"pipeline/bubble_measured": self._summary["pipeline/bubble_measured"],
                                "pipeline/bubble_theory": self._summary["pipeline/bubble_theory"]},
                               step=self.lightning_module.trainer.global_step)

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
            raise UserError(f"checkpoint lacks this stage's parameters ({', '.join(missing[:3])} ...); it was not "
                            "written by this model")
        self.lightning_module.load_state_dict({k: state[k] for k in self.stage_keys}, strict=False)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"]):
            optimizer.load_state_dict(state["pipeline_stages"][self.stage])
