"""Importing our packages changes nothing for Lightning: a plain Trainer still works after it, and
no MPI starts until a communicator is asked for (the process that launches mpirun never joins MPI)."""

import subprocess
import sys

from conftest import _env

PLAIN_TRAINER_AFTER_IMPORT = """
import sys
import lightning_xd, lightning_xd.comm.communicator, lightning_xd.comm.ulfm
import lightning_xd.strategies, lightning_xd.models, lightning_xd.datamodules
print("MPI imported:", "mpi4py.MPI" in sys.modules)
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
trainer = Trainer(max_steps=2, limit_val_batches=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False)
trainer.fit(BoringModel())
print("steps", trainer.global_step)
"""


def test_a_plain_trainer_works_after_importing_lightning_xd(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-c", PLAIN_TRAINER_AFTER_IMPORT],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "steps 2" in proc.stdout, proc.stderr[-3000:]
    assert "MPI imported: False" in proc.stdout, "importing lightning_xd started MPI"
