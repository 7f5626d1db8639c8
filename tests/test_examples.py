"""Every ``examples/*/config.yaml`` names registered things and runs with ``--fast-dev-run`` on generated data.

Importing torch and Lightning costs a process ~9 s and an mpirun job 12-20 s, so the configs run
one after another in one subprocess (this file, run as a script), each through ``train.main``
with its own settings plus ``--fast-dev-run``: one batch of training, validation and test. They
run at world size 1, with only the changes one process forces (``at_world_size_one``); several
ranks, restarts and pipelines of several stages are tested with each strategy. Not in the pytest
process: the ``mpi`` strategy joins MPI even at world size 1, and a process that has joined MPI
must not start the mpirun jobs of later tests.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "examples").glob("*/config.yaml"))
NUM_EXAMPLES = 8


def _settings(config: Path) -> dict:
    return {key.replace("-", "_"): value for key, value in yaml.safe_load(config.read_text()).items()}


def at_world_size_one(config: Path) -> list[str]:
    """The flags that run ``config`` in one process; everything else is the config's own."""
    flags = ["--nprocs", "1", "--max-restarts", "0"]  # restarts would start the supervisor and mpirun
    if _settings(config)["strategy"] == "hybrid":
        flags += ["--pipeline-stages", "1"]  # a pipeline of P stages needs P processes
    return flags


def write_generated_data(root: Path) -> Path:
    """A data dir laid out like ../shared/data, with every dataset the examples read, small."""
    from generators.appliances import write_appliances
    from generators.cifar10 import write_cifar10_jpegs
    from generators.ecg import write_ecg5000
    from generators.hapt import write_hapt
    from generators.planetoid import write_planetoid_cora
    from generators.qm9 import write_qm9_subset
    from generators.sensor_stream import write_intel, write_occupancy

    write_planetoid_cora(root)  # cora and cora-graph
    # enough for one whole training batch at the datamodules' defaults
    write_cifar10_jpegs(root, train_per_class=101)  # the datamodule keeps 1,000 training images to validate
    write_qm9_subset(root, count=40)  # 32 of them train: one batch (the loader drops incomplete ones)
    for write in (write_appliances, write_ecg5000, write_hapt, write_occupancy, write_intel):
        write(root)
    return root


def test_there_are_eight_numbered_examples():
    names = [config.parent.name for config in CONFIGS]
    assert len(names) == NUM_EXAMPLES, names
    assert [name[:3] for name in names] == [f"{i:02d}_" for i in range(1, NUM_EXAMPLES + 1)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.parent.name)
def test_config_states_what_it_shows_and_names_registered_things(config):
    from lightning_xd import cli, runner
    from lightning_xd.registry import STRATEGIES, accepted_settings

    import datamodules  # noqa: F401  (registers the names)
    import models  # noqa: F401
    import strategies  # noqa: F401

    assert config.read_text().startswith("# "), "the first line says what the example shows"
    settings = _settings(config)
    assert {"model", "data", "strategy", "nprocs"} <= set(settings)
    assert not {"data_dir", "cache_dir", "run_dir"} & set(settings), "paths come from the environment"
    args = cli.parse_args(["--config", str(config)])
    resolved = runner.resolve(args)  # a one-line UserError for an unknown name or a flag nothing takes
    check_settings = getattr(STRATEGIES.get(args.strategy).build, "check_settings", None)
    if check_settings is not None:  # e.g. the hybrid strategy: processes a multiple of the pipeline stages
        fixed = {"nprocs": args.nprocs}  # and no model: that would need the data
        check_settings(**fixed, **accepted_settings(check_settings, resolved, exclude={**fixed, "model": None}))


def test_every_example_runs_fast_dev_run_on_generated_data(tmp_path):
    from lightning_xd.viz.dashboard import PANEL

    data, runs, results = write_generated_data(tmp_path / "data"), tmp_path / "runs", tmp_path / "results.json"
    env = {**os.environ, "XD_CACHE_DIR": str(tmp_path / "cache"), "XD_DOWNLOAD": "0",
           "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run([sys.executable, __file__, str(data), str(runs), str(results), *map(str, CONFIGS)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0 and results.exists(), proc.stderr[-3000:]
    outcomes = json.loads(results.read_text())
    failed = {name: outcome["error"] for name, outcome in outcomes.items() if outcome["code"] != 0}
    assert not failed, "\n".join(f"{name}: {error}" for name, error in failed.items())
    for config in CONFIGS:
        settings, run = _settings(config), runs / config.parent.name
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["model"], metrics["data"], metrics["strategy"], metrics["world_size"]) == \
            (settings["model"], settings["data"], settings["strategy"], 1)
        assert metrics["global_step"] >= 1, f"{config.parent.name} trained on no batch"
        assert any(key.startswith("test/") for key in metrics), config.parent.name
    # the streaming example's dashboard has panels beyond loss and throughput: the running RMSEs
    import cv2

    dashboard = cv2.imread(str(runs / "08_streaming_lstm_dashboard" / "dashboard.png"))
    assert dashboard is not None and dashboard.shape[0] > 40 + PANEL[1]


def run_examples(data: str, runs: str, results: str, configs: list[str]) -> None:
    """In one process: each config through train.main; {example: {"code", "error"}} into ``results``."""
    import train

    outcomes = {}
    for config in map(Path, configs):
        stderr, started = io.StringIO(), time.perf_counter()
        try:
            argv = ["--config", str(config), *at_world_size_one(config), "--fast-dev-run", "--data-dir", data,
                    "--run-dir", str(Path(runs) / config.parent.name)]
            with contextlib.redirect_stderr(stderr):
                code = train.main(argv)
            error = stderr.getvalue().strip()[-2000:]
        except Exception:  # a broken config must not hide the others
            code, error = 1, traceback.format_exc()[-2000:]
        outcomes[config.parent.name] = {"code": code, "error": error}
        print(f"{config.parent.name}: exit {code} in {time.perf_counter() - started:.1f} s", file=sys.__stderr__,
              flush=True)
    Path(results).write_text(json.dumps(outcomes, indent=2))


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    run_examples(sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:])
