"""What a pipeline-parallel run cannot work with, refused with one line: before any process starts
(the settings and the model), and on every rank alike at set-up (the Trainer's switches).

A model can be pipelined when it names its blocks in order (``pipeline_blocks()``), how a batch enters
the first (``pipeline_input``) and how the last one's output becomes the loss and metrics
(``pipeline_loss``).
"""

from __future__ import annotations

from torch import nn

from lightning_xd.errors import UserError
from lightning_xd.parallel.pipeline import SCHEDULES

PIPELINE_METHODS = ("pipeline_blocks", "pipeline_input", "pipeline_loss")


def check_pipeline_settings(
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
        count = len(list(model.pipeline_blocks()))
        if pipeline_stages > count:
            raise UserError(
                f"--pipeline-stages {pipeline_stages} but {type(model).__name__} has only {count} blocks; use fewer"
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


def check_pipeline_trainer(trainer, model: nn.Module) -> None:
    """What the pipeline schedule cannot train with, refused on every rank alike."""
    if not model.automatic_optimization:
        raise UserError(
            "the hybrid strategy runs each step's backward passes itself, in its pipeline schedule: "
            "it needs Lightning's automatic optimization; use --strategy mpi for manual optimization"
        )
    if trainer.accumulate_grad_batches != 1:
        raise UserError(
            "the hybrid strategy accumulates over micro-batches; use --microbatches instead of "
            "accumulating gradients over batches"
        )
