"""The run's events in one process: recorded at their steps, written to TensorBoard as they happen,
and kept across a restart with the dashboard's curves (a real Trainer, checkpoints and resume)."""

import json
import time
from pathlib import Path

import cv2
from dashboard_pixels import marker_columns, plot_area, step_x
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny_models import TinyData, TinyRegressor

from lightning_xd.callbacks import FaultTolerantCheckpoint, RunEvents
from lightning_xd.fault_tolerance.checkpoints import VerifiedCheckpointIO
from lightning_xd.fault_tolerance.supervisor import ATTEMPTS_FILE
from lightning_xd.viz import TrainingDashboard

STEPS_PER_EPOCH = 6  # 36 samples in batches of 6


def _fit(run_dir: Path, epochs: int, resume: Path | None = None) -> tuple[RunEvents, TrainingDashboard]:
    events = RunEvents(run_dir)
    dashboard = TrainingDashboard(run_dir, every_n_steps=0, events=events)
    trainer = Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=TensorBoardLogger(run_dir, name="tensorboard"),
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[events, dashboard, FaultTolerantCheckpoint(run_dir / "checkpoints", every_n_steps=4)],
        plugins=[VerifiedCheckpointIO(keep_last=10)],
        default_root_dir=str(run_dir),
    )
    trainer.fit(TinyRegressor(), TinyData(batch_size=6, n_train=36), ckpt_path=str(resume) if resume else None)
    return events, dashboard


def _story(events: RunEvents) -> list[tuple[int, str]]:
    return sorted((e["step"], e["label"]) for e in events.events)


def test_events_are_recorded_at_their_steps_and_written_to_tensorboard(tmp_path):
    events, _ = _fit(tmp_path, epochs=2)
    assert _story(events) == [
        (4, "checkpoint"),
        (6, "checkpoint"),  # the epoch's end
        (6, "epoch 1"),
        (8, "checkpoint"),
        (12, "checkpoint"),  # the end of training
    ]
    logs = EventAccumulator(str(next((tmp_path / "tensorboard").glob("version_*")))).Reload()
    texts = {
        kind: [(e.step, e.tensor_proto.string_val[0].decode()) for e in logs.Tensors(f"events/{kind}/text_summary")]
        for kind in ("checkpoint", "epoch")
    }
    assert texts["epoch"] == [(6, "step 6: epoch 1")]
    assert texts["checkpoint"] == [(step, f"step {step}: checkpoint") for step in (4, 6, 8, 12)]
    sizes = [(s.step, s.value) for s in logs.Scalars("events/world_size")]
    assert sizes == [(step, 1.0) for step in range(1, 2 * STEPS_PER_EPOCH + 1)]


def test_a_restart_draws_the_curves_and_events_it_resumes_and_itself(tmp_path, monkeypatch):
    _fit(tmp_path, epochs=2)
    # the supervisor's record: attempt 0 reached step 10 and died; attempt 1 resumes from the epoch end at step 6
    failed = {"attempt": 0, "started_step": 0, "global_step": 10, "updated_at": time.time()}
    (tmp_path / ATTEMPTS_FILE).write_text(json.dumps([{**failed, "training_started_at": failed["updated_at"] - 5}]))
    monkeypatch.setenv("XD_ATTEMPT", "1")
    events, dashboard = _fit(tmp_path, epochs=3, resume=tmp_path / "checkpoints" / "step-000000006.ckpt")
    assert dashboard.series["step"] == list(range(1, 3 * STEPS_PER_EPOCH + 1)), "steps 1-6 restored, 7-18 trained"
    story = _story(events)
    assert (6, "restart 1: 4 steps redone") in story
    assert [step for step, label in story if label == "checkpoint"] == [4, 6, 8, 12, 16, 18]
    resumed_logs = EventAccumulator(str(tmp_path / "tensorboard" / "version_1")).Reload()
    [restart] = resumed_logs.Tensors("events/restart/text_summary")
    assert (restart.step, restart.tensor_proto.string_val[0].decode()) == (
        6,
        "step 6: restart 1: 4 steps redone (failed at step 10)",
    )
    image = cv2.imread(str(tmp_path / "dashboard.png"))
    expected = step_x(plot_area(image, 0), 6, (1, 3 * STEPS_PER_EPOCH))
    found = marker_columns(image, 0, "restart")
    assert found and all(abs(x - expected) <= 2 for x in found), (found, expected)
