"""``TrainingDashboard``: gathers every rank's figures to rank 0 and renders the dashboard.

Every ``every_n_steps`` steps (synchronous strategies) and when fit ends, each rank hands its
loss, throughput and tracked series to rank 0 through the strategy's collectives; rank 0 saves
``dashboard.png`` in the run dir, logs the image to TensorBoard and, if asked, appends a frame to
``dashboard.mp4``. Strategies add their own figures: the async server's staleness histogram, the
hybrid pipeline's timeline of one step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_xd.callbacks.run_summary import batch_size_of
from lightning_xd.comm.collectives import gather_objects
from lightning_xd.contract import declared
from lightning_xd.viz.dashboard import render


class TrainingDashboard(Callback):
    def __init__(
        self,
        run_dir: str | Path,
        every_n_steps: int = 50,
        video: bool = False,
        tracked: Sequence[str] = ("train/running_rmse", "train/running_rmse_persistence"),
    ):
        self.path = Path(run_dir) / "dashboard.png"
        self.every_n_steps, self.video, self.tracked = every_n_steps, video, tuple(tracked)
        self.series: dict[str, list[float]] = {"step": [], "loss": [], "samples_per_s": []}
        self._writer: cv2.VideoWriter | None = None
        self._started = 0.0

    # ---- recording (every rank, its own figures) ---------------------------------------------
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._started = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        self.series["step"].append(trainer.global_step)
        self.series["loss"].append(float(loss) if isinstance(loss, torch.Tensor) else float("nan"))
        self.series["samples_per_s"].append(batch_size_of(batch) / max(time.perf_counter() - self._started, 1e-9))
        for key in self.tracked:  # logged without sync_dist, these are this rank's own values
            value = trainer.callback_metrics.get(key)
            if value is not None:
                self.series.setdefault(key, []).append(float(value))
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0 and self._synchronous(trainer):
            self.publish(trainer)

    @staticmethod
    def _synchronous(trainer) -> bool:
        """Gathering mid-training needs every rank at the same step (not so for asynchronous workers)."""
        return declared(trainer.strategy).is_synchronous

    def on_fit_end(self, trainer, pl_module) -> None:
        self.publish(trainer)
        if self._writer is not None:
            self._writer.release()
            self._writer = None

    # ---- gathering and drawing (rank 0) -----------------------------------------------------
    def figures(self, trainer, per_rank: list) -> dict:
        summary = declared(trainer.strategy).summary_metrics()
        title = (
            f"{type(trainer.lightning_module).__name__} - {type(trainer.strategy).__name__} - "
            f"{trainer.world_size} process(es) - step {trainer.global_step}"
        )
        return {
            "title": title,
            "ranks": {r: s for r, s in enumerate(per_rank) if s.get("step")},
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
