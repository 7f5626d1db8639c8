"""``<run_dir>/progress.json``: how far training has got, for the supervisor that restarts it.

Written by the first process only, after every step (a tiny file): the attempt number, the step
training (re)started from, the latest step and when each happened.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from lightning.pytorch import Callback

from lightning_xd.files import write_json_atomically


class ProgressMarker(Callback):
    def __init__(self, path: str | Path, min_interval_s: float = 0.0):
        self.path, self.min_interval_s = Path(path), min_interval_s
        self._written = 0.0
        self.state: dict = {}

    def _write(self) -> None:
        write_json_atomically(self.path, self.state)  # creates the run dir (fast_dev_run has no logger to)
        self._written = time.monotonic()

    def on_train_start(self, trainer, pl_module) -> None:
        # every process keeps it: after the first process is lost (ULFM) the new first one writes it
        self.state = {
            "attempt": int(os.environ.get("XD_ATTEMPT", "0")),
            "started_step": trainer.global_step,
            "training_started_at": time.time(),
            "global_step": trainer.global_step,
            "updated_at": time.time(),
        }
        if trainer.is_global_zero:
            self._write()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.state:
            self.state.update(global_step=trainer.global_step, updated_at=time.time())
            if trainer.is_global_zero and time.monotonic() - self._written >= self.min_interval_s:
                self._write()

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.is_global_zero and self.state:
            self._write()


def read_progress(run_dir: str | Path) -> dict:
    try:
        return json.loads((Path(run_dir) / "progress.json").read_text())
    except (OSError, ValueError):
        return {}
