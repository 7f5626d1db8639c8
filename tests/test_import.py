"""Importing our packages changes nothing for Lightning: a plain Trainer still works after it, and
no MPI starts until a communicator is asked for (the process that launches mpirun never joins MPI).
The project's wheel installs one name, ``lightning_xd``."""

import os
import shutil
import subprocess
import sys
import zipfile

from conftest import REPO, _env

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


INSTALLED_LAYOUT = """
import importlib, pathlib, sys
import lightning_xd.strategies, lightning_xd.models, lightning_xd.datamodules
root = pathlib.Path(sys.argv[1]).resolve()
for name in ("lightning_xd", "lightning_xd.strategies", "lightning_xd.models", "lightning_xd.datamodules"):
    where = pathlib.Path(sys.modules[name].__file__).resolve()
    assert where.is_relative_to(root), f"{name} imported from {where}, not from the wheel"
for name in ("models", "strategies", "datamodules"):
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as err:
        assert err.name == name, err
    else:
        raise AssertionError(f"import {name} worked: the wheel installs a top-level {name}")
print("layout OK")
"""


def test_the_wheel_installs_one_name(tmp_path):
    """A wheel of the project installs ``lightning_xd`` alone: its models, datamodules and strategies are
    ``lightning_xd.models``, ``.datamodules`` and ``.strategies``, and no top-level ``models``, ``strategies``
    or ``datamodules`` comes with it. Built from a copy of the sources (setuptools writes build/ next to
    pyproject.toml), without build isolation (the venv's setuptools: no download)."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for package in ("lightning_xd", "models", "datamodules", "strategies"):
        shutil.copytree(REPO / package, source / package, ignore=skip)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("lightning_xd-*.whl")
    unpacked = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(unpacked)
    assert {p.name for p in unpacked.iterdir() if not p.name.endswith(".dist-info")} == {"lightning_xd"}
    outside = tmp_path / "elsewhere"  # neither the checkout nor the copy is on the path from here
    outside.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    proc = subprocess.run(
        [sys.executable, "-c", INSTALLED_LAYOUT, str(unpacked)],
        cwd=outside,
        env={**env, "PYTHONPATH": str(unpacked)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "layout OK" in proc.stdout, proc.stderr[-3000:]
