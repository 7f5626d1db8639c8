"""``TrainingDashboard``: gathers every rank's figures to rank 0 and renders the dashboard.

Every rank records, each training step: its loss, its wall-clock throughput and where the step's
time went (``StepClock``: computing, waiting for data, waiting for peers), and the values of the
tracked series it logged (by default every ``train/running_*`` key the module logs: a stream's
running errors and their baselines; logged without ``sync_dist``, so each rank's own). Every
``every_n_steps`` steps (synchronous strategies) and when fit ends, the ranks hand their figures to
rank 0 through the strategy's collectives; rank 0 draws them with the run's events (``RunEvents``)
as markers, saves ``dashboard.png`` in the run dir, logs the image to TensorBoard and, if asked,
appends a frame to ``dashboard.mp4``. Strategies add their own figures: the async server's staleness
histogram, the hybrid pipeline's timeline of one step.

The figures so far are kept in every checkpoint (every rank's, gathered, as ``state_dict``): a run
resumed after a restart draws the curves of the history it resumes, each rank going on from its own.
A rank the resumed job no longer has (restarted on fewer processes) keeps its curve up to the
restart, drawn by rank 0. Units come from the module's ``dashboard_units`` (a dict, series name ->
unit: ``{"loss": "MSE", "train/running_rmse": "°C"}``), where it has one.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xd.callbacks.run_events import RunEvents
from lightning_xd.callbacks.run_summary import batch_size_of
from lightning_xd.comm.collectives import gather_objects
from lightning_xd.contract import declared
from lightning_xd.viz.dashboard import render
from lightning_xd.viz.step_clock import StepClock, peer_waits_counted


class TrainingDashboard(Callback):
    def __init__(
        self,
        run_dir: str | Path,
        every_n_steps: int = 50,
        video: bool = False,
        tracked: Sequence[str] = ("train/running_*",),
        events: RunEvents | None = None,
    ):
        """``tracked``: patterns (``fnmatch``) of logged keys drawn per rank; ``events``: the run's
        events, drawn as markers."""
        self.path = Path(run_dir) / "dashboard.png"
        self.every_n_steps, self.video, self.tracked = every_n_steps, video, tuple(tracked)
        self.events = events
        self.series: dict[str, list[float]] = {"step": [], "loss": []}
        self.earlier_ranks: dict[int, dict[str, list[float]]] = {}  # rank 0: ranks of an earlier, larger job
        self.clock = StepClock()
        self._writer: cv2.VideoWriter | None = None
        self._trainer = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._trainer = trainer

    # ---- recording (every rank, its own figures) ---------------------------------------------
    def on_train_start(self, trainer, pl_module) -> None:
        self.clock.restart(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.clock.restart(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.clock.restart(trainer)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.clock.step_started(trainer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        figures = {
            "step": trainer.global_step,
            "loss": float(loss) if isinstance(loss, torch.Tensor) else math.nan,
            **self.clock.step_ended(trainer, batch_size_of(batch)),
            **{key: float(value) for key, value in trainer.callback_metrics.items() if self._is_tracked(key)},
        }
        self._append(figures)
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and self._synchronous(trainer):
            self.publish(trainer)
            # Drawing is no training step's time (as validation is not): every rank waits until rank 0 has
            # drawn, then starts the next step's clock.
            trainer.strategy.barrier("dashboard drawn")
            self.clock.restart(trainer)

    def _is_tracked(self, key: str) -> bool:
        return any(fnmatch.fnmatchcase(key, pattern) for pattern in self.tracked)

    def _append(self, figures: dict[str, float]) -> None:
        """One value per series for this step: a series first seen now starts with gaps (NaN), one
        not given now gets a gap, so every series stays aligned with ``step``."""
        steps = len(self.series["step"])
        for key in figures.keys() - self.series.keys():
            self.series[key] = [math.nan] * steps
        for key, values in self.series.items():
            values.append(figures.get(key, math.nan))

    @staticmethod
    def _synchronous(trainer) -> bool:
        """Gathering mid-training needs every rank at the same step (not so for asynchronous workers)."""
        return declared(trainer.strategy).is_synchronous

    def on_fit_end(self, trainer, pl_module) -> None:
        self.publish(trainer)
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    # ---- kept in every checkpoint --------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Every rank's series, by rank (a collective: every rank saves). Rank 0 writes the file."""
        trainer = self._trainer
        gathered = gather_objects(trainer.strategy, self.series) if trainer is not None else [self.series]
        return {"series": {**self.earlier_ranks, **dict(enumerate(gathered))}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("series", {})
        rank = self._trainer.global_rank if self._trainer is not None else 0
        world = self._trainer.world_size if self._trainer is not None else 1
        self.series = {key: list(values) for key, values in saved.get(rank, self.series).items()}
        self.earlier_ranks = {r: s for r, s in saved.items() if r >= world} if rank == 0 else {}

    # ---- gathering and drawing (rank 0) -----------------------------------------------------
    def figures(self, trainer, per_rank: list) -> dict:
        summary = declared(trainer.strategy).summary_metrics()
        title = (
            f"{type(trainer.lightning_module).__name__} - {type(trainer.strategy).__name__} - "
            f"{trainer.world_size} process(es) - step {trainer.global_step}"
        )
        ranks = {**self.earlier_ranks, **dict(enumerate(per_rank))}
        synchronous = self._synchronous(trainer)
        return {
            "title": title,
            "ranks": {r: s for r, s in sorted(ranks.items()) if s.get("step")},
            # ranks that do not step together count their own steps: the run's events are in other steps
            "events": list(self.events.events) if self.events is not None and synchronous else [],
            "steps": "step" if synchronous else "the worker's own steps",
            "units": dict(getattr(trainer.lightning_module, "dashboard_units", {})),
            "peer_waits_uncounted_by": None if peer_waits_counted(trainer) else type(trainer.strategy).__name__,
            "staleness": summary.get("async/staleness_histogram"),
            "timeline": summary.get("pipeline/timelines"),
        }

    def publish(self, trainer) -> None:
        per_rank = gather_objects(trainer.strategy, {k: list(v) for k, v in self.series.items()})
        if not trainer.is_global_zero:
            return
        image = render(self.figures(trainer, per_rank))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(self.path), image)
        if isinstance(trainer.logger, TensorBoardLogger):
            trainer.logger.experiment.add_image(
                "dashboard", image[:, :, ::-1].copy(), trainer.global_step, dataformats="HWC"
            )
        if self.video:
            self._frame(image)

    def _frame(self, image) -> None:
        if self._writer is None:
            height, width = image.shape[:2]
            self._writer = cv2.VideoWriter(
                str(self.path.with_suffix(".mp4")), cv2.VideoWriter_fourcc(*"mp4v"), 4, (width, height)
            )
        self._writer.write(image)
