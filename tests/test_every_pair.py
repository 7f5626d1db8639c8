"""Every model/data pair through ``train.py`` on generated data in the real on-disk formats: with
``single``, with ``async`` at world size 1 and with ``mpi`` on 2 processes under mpirun, plus every
``examples/*/config.yaml`` at world size 1.

The world-size-1 runs share one subprocess and the two-process runs one mpirun job
(``batch_runs.py``): a process start costs ~9 s here, and there are some forty runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, _env

CONFIGS = sorted((REPO / "examples").glob("*/config.yaml"))
SMALL_GRAPH = ["--num-nodes", "400", "--num-features", "8", "--num-communities", "4"]
SHORT_QM9 = ["--max-epochs", "1", "--batch-size", "4", "--hidden-channels", "16"]  # 32 training molecules


def check_accuracy(m, world, output=""):
    assert 0 <= m["test/acc"] <= 1 and m["samples_per_s"] > 0


def check_forecast(m, world, output=""):
    for name in ("test/rmse", "test/mae", "test/rmse_persistence", "test/mae_persistence"):
        assert m[name] > 0, name
    assert "test/running_rmse" not in m  # only a stream replayed once is scored that way


def check_stream(m, world, output=""):
    for baseline in ("", "_persistence", "_seasonal_naive", "_ridge"):  # the model's, then each baseline's
        for name in ("test/running_rmse", "test/rmse", "test/mae"):
            assert m[name + baseline] > 0, name + baseline


def check_anomaly(m, world, output=""):
    assert 0 <= m["test/auroc"] <= 1 and m["test/mse"] > 0


def check_latency(m, world, output=""):
    assert 0 <= m["test/acc"] <= 1 and 0 < m["test/latency_ms_p50"] <= m["test/latency_ms_p95"]


def check_molecules(m, world, output=""):
    assert m["test/mae"] > 0 and m["test/mae_mean_predictor"] > 0
    if m["epochs"] == 1:  # PyG's loader under Lightning's sampler: each process sees its share
        assert m["global_step"] == 8 // world, m["global_step"]


def check_embeddings(m, world, output=""):
    assert 0 <= m["test/micro_f1"] <= 1
    assert {f"test/peak_rss_mb_rank{r}" for r in range(world)} <= set(m)
    if world > 1:
        assert "edge cut" in output and "owned nodes per rank" in output  # the partition, in the log
        assert "test/epochs_per_s" in m or m["epochs"] == 0


def check_communities(m, world, output=""):
    check_embeddings(m, world, output)
    if world > 1:  # communities show in features and links: the probe beats chance (0.25)
        assert m["test/micro_f1"] > 0.4, m


# name: (flags beyond --model, checks of metrics.json)
PAIRS = {
    "gcn-cora": (["--model", "gcn"], check_accuracy),
    "cnn-cifar10": (["--model", "cnn", "--batch-size", "8"], check_accuracy),
    "lstm-appliances": (["--model", "lstm"], check_forecast),
    "lstm-occupancy": (["--model", "lstm", "--data", "sensor-stream", "--source", "occupancy"], check_stream),
    "lstm-intel": (["--model", "lstm", "--data", "sensor-stream", "--source", "intel", "--window", "8"], check_stream),
    "autoencoder-ecg": (["--model", "autoencoder"], check_anomaly),
    "cnn1d-har": (["--model", "cnn1d"], check_latency),
    "mpnn-qm9": (["--model", "mpnn", *SHORT_QM9], check_molecules),
    "graphsage-cora": (["--model", "graphsage", "--data", "cora-graph", "--batch-size", "32"], check_embeddings),
    "graphsage-ppi": (
        ["--model", "graphsage", "--data", "ppi", "--max-epochs", "1", "--batch-size", "32", "--hidden-channels", "16"],
        check_embeddings,
    ),
    "graphsage-synthetic": (
        [
            "--model",
            "graphsage",
            "--data",
            "synthetic-graph",
            *SMALL_GRAPH,
            "--max-epochs",
            "1",
            "--batch-size",
            "32",
            "--hidden-channels",
            "16",
        ],
        check_communities,
    ),
}
STREAMING_STEPS = 12  # the generated recording's calibration warm-up takes 5 batches at world size 1
STREAMING_EXAMPLE = [
    "--config",
    str(REPO / "examples" / "08_streaming_lstm_dashboard" / "config.yaml"),
    "--nprocs",
    "1",
    "--max-restarts",
    "0",
    "--stream-rate",
    "0",
    "--max-steps",
    str(STREAMING_STEPS),
]
SHORT = {
    "mpnn-qm9",
    "graphsage-ppi",
    "graphsage-synthetic",
}  # a whole short epoch, not one batch: the counts are checked


def write_generated_data(root: Path) -> Path:
    """A data dir laid out like ../shared/data, with every dataset, small."""
    from generators.appliances import write_appliances
    from generators.cifar10 import write_cifar10_jpegs
    from generators.ecg import write_ecg5000
    from generators.hapt import write_hapt
    from generators.planetoid import write_planetoid_cora
    from generators.ppi import write_ppi
    from generators.qm9 import write_qm9_subset
    from generators.sensor_stream import write_intel, write_occupancy

    write_planetoid_cora(root)  # cora and cora-graph
    # enough for one whole training batch at the datamodules' defaults
    write_cifar10_jpegs(root, train_per_class=101)  # the datamodule keeps 1,000 training images to validate
    write_qm9_subset(root, count=40)  # 32 of them train: one batch (the loader drops incomplete ones)
    for write in (write_appliances, write_ecg5000, write_hapt, write_occupancy, write_intel, write_ppi):
        write(root)
    return root


def _settings(config: Path) -> dict:
    return {key.replace("-", "_"): value for key, value in yaml.safe_load(config.read_text()).items()}


def at_world_size_one(config: Path) -> list[str]:
    """The flags that run ``config`` in one process; everything else is the config's own."""
    flags = ["--nprocs", "1", "--max-restarts", "0"]  # restarts would start the supervisor and mpirun
    if _settings(config)["strategy"] == "hybrid":
        flags += ["--pipeline-stages", "1"]  # a pipeline of P stages needs P processes
    return flags


def _run_flags(name: str, strategy: str, nprocs: int, data: Path, runs: Path) -> list[str]:
    flags, _ = PAIRS[name]
    length = [] if name in SHORT else ["--fast-dev-run"]
    return [
        *flags,
        *length,
        "--strategy",
        strategy,
        "--nprocs",
        str(nprocs),
        "--data-dir",
        str(data),
        "--run-dir",
        str(runs / f"{name}-{strategy}-{nprocs}"),
    ]


def _batch(tmp: Path, name: str, spec: list[dict], ranks: int) -> dict:
    spec_path, results = tmp / f"{name}.json", tmp / f"{name}-results.json"
    spec_path.write_text(json.dumps(spec))
    script = [str(REPO / "tests" / "batch_runs.py"), "--spec", str(spec_path), "--results", str(results)]
    env = _env(tmp)
    if ranks == 1:
        cmd = [sys.executable, *script]
    else:
        from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

        cmd, env = mpirun_command(ranks, script), {**mpirun_environment(), **env}
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and results.exists(), proc.stderr[-3000:]
    return json.loads(results.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run of this file, done once: {"one": {run: outcome}, "two": {...}, "dir": runs dir}."""
    tmp = tmp_path_factory.mktemp("pairs")
    data, run_dir = write_generated_data(tmp / "data"), tmp / "runs"
    one = [{"name": f"{n}-{s}", "argv": _run_flags(n, s, 1, data, run_dir)} for n in PAIRS for s in ("single", "async")]
    one.append({"name": "gcn-cora-mpi", "argv": _run_flags("gcn-cora", "mpi", 1, data, run_dir)})
    one += [
        {
            "name": c.parent.name,
            "argv": [
                "--config",
                str(c),
                *at_world_size_one(c),
                "--fast-dev-run",
                "--data-dir",
                str(data),
                "--run-dir",
                str(run_dir / c.parent.name),
            ],
        }
        for c in CONFIGS
    ]
    one.append(
        {
            "name": "08-past-warm-up",
            "argv": [*STREAMING_EXAMPLE, "--data-dir", str(data), "--run-dir", str(run_dir / "08-past-warm-up")],
        }
    )
    two = [{"name": f"{n}-mpi", "argv": _run_flags(n, "mpi", 2, data, run_dir)} for n in PAIRS]
    return {"one": _batch(tmp, "one", one, 1), "two": _batch(tmp, "two", two, 2), "dir": run_dir}


def _metrics(runs, batch: str, run: str, directory: str) -> tuple[dict, str]:
    outcome = runs[batch][run]
    assert outcome["code"] == 0, outcome["output"]
    return json.loads((runs["dir"] / directory / "metrics.json").read_text()), outcome["output"]


@pytest.mark.parametrize("name", PAIRS)
@pytest.mark.parametrize("strategy, world", [("single", 1), ("async", 1), ("mpi", 2)])
def test_pair_trains_and_reports_its_metrics(runs, name, strategy, world):
    metrics, output = _metrics(runs, "one" if world == 1 else "two", f"{name}-{strategy}", f"{name}-{strategy}-{world}")
    assert metrics["world_size"] == world and metrics["strategy"] == strategy
    assert metrics["global_step"] >= 1, "trained on no batch"
    PAIRS[name][1](metrics, world, output)


def test_mpi_at_world_size_one_runs_in_process(runs):
    metrics, _ = _metrics(runs, "one", "gcn-cora-mpi", "gcn-cora-mpi-1")
    assert metrics["world_size"] == 1 and 0 <= metrics["test/acc"] <= 1


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.parent.name)
def test_example_config_runs_fast_dev_run(runs, config):
    settings = _settings(config)
    metrics, _ = _metrics(runs, "one", config.parent.name, config.parent.name)
    assert (metrics["model"], metrics["data"], metrics["strategy"], metrics["world_size"]) == (
        settings["model"],
        settings["data"],
        settings["strategy"],
        1,
    )
    assert metrics["global_step"] >= 1, f"{config.parent.name} trained on no batch"
    assert any(key.startswith("test/") for key in metrics)


def test_streaming_example_draws_the_running_errors(runs):
    """Past its calibration warm-up (which only learns), example 8 forecasts: each rank's running RMSE
    and its baselines' are drawn in the panel after loss, throughput and the time split."""
    import cv2

    from lightning_xd.viz.dashboard import panel_rect

    metrics, _ = _metrics(runs, "one", "08-past-warm-up", "08-past-warm-up")
    assert metrics["global_step"] == STREAMING_STEPS
    check_stream(metrics, 1)
    dashboard = cv2.imread(str(runs["dir"] / "08-past-warm-up" / "dashboard.png"))
    x, y, w, h = panel_rect(3)  # loss, throughput, rank 0's time split, then the first tracked series
    assert dashboard is not None and dashboard.shape[0] >= y + h
    assert (dashboard[y : y + h, x : x + w] < 200).any(axis=2).sum() > 1000, "no running-RMSE panel"
