"""train.py end to end (generated Cora in Planetoid format) and its one-line errors."""

import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lightning_xd.launch.cli import parse_args


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.parametrize("strategy", ["mpi", "ddp"])
def test_two_processes_train_log_and_test(train, tiny_data, tmp_path, strategy):
    """--nprocs 2 starts mpirun itself; the run learns, logs to TensorBoard and writes metrics.json."""
    run_dir = tmp_path / "run"
    proc = train(
        "--model",
        "gcn",
        "--strategy",
        strategy,
        "--nprocs",
        "2",
        "--max-epochs",
        "30",
        "--data-dir",
        str(tiny_data),
        "--run-dir",
        str(run_dir),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["world_size"] == 2 and metrics["epochs"] == 30 and metrics["global_step"] == 30
    assert metrics["test/acc"] >= 0.8, metrics  # the generated classes are visible in the features
    assert metrics["samples_per_s"] > 0 and metrics["epoch_time_s_mean"] > 0
    events = list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))  # fit, then test
    assert len({e.name.split(".")[-2] for e in events}) == 1, "only rank 0 writes TensorBoard logs"
    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()
    assert {"train/loss", "val/acc", "test/acc", "perf/rank_samples_per_s"} <= set(tags["scalars"])
    assert "dashboard" in tags["images"] and (run_dir / "dashboard.png").stat().st_size > 10_000
    assert proc.stdout.count("Test metric") == 1, "only rank 0 prints"


@pytest.mark.parametrize("flag, name", [("--model", "resnet9000"), ("--data", "mnist"), ("--strategy", "magic")])
def test_unknown_names(one_line_error, flag, name):
    args = {"--model": "gcn", flag: name}
    err = one_line_error(*[x for kv in args.items() for x in kv])
    assert f"unknown {flag[2:]} {name!r}" in err and "valid" in err


def test_missing_data_names_the_files(data_error, tmp_path, monkeypatch):
    monkeypatch.setenv("XD_DOWNLOAD", "0")
    err = data_error("gcn", tmp_path / "empty")
    assert "ind.cora.x" in err and "planetoid_raw" in err


def test_corrupt_data_file(data_error, tiny_data, tmp_path):
    import shutil

    broken = tmp_path / "data"
    shutil.copytree(tiny_data, broken)
    (broken / "cora" / "planetoid_raw" / "ind.cora.allx").write_bytes(b"not a pickle")
    err = data_error("gcn", broken)
    assert "could not be read" in err


def test_impossible_world_size(one_line_error):
    err = one_line_error("--model", "gcn", "--strategy", "single", "--nprocs", "2")
    assert "at most 1" in err
    err = one_line_error("--model", "gcn", "--nprocs", "0")
    assert "at least 1" in err


def test_exit_code_of_the_script(train):
    proc = train("--model", "nope")
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [proc.stderr.strip()]


def test_config_file_and_command_line_precedence(tmp_path, one_line_error):
    config = tmp_path / "c.yaml"
    config.write_text("model: gcn\nmax-epochs: 7\nlr: 0.5\nhidden_channels: 32\ndropout: 0.1\n")
    args = parse_args(["--config", str(config), "--lr", "0.1", "--hidden-channels", "64"])
    assert (args.model, args.max_epochs, args.lr) == ("gcn", 7, 0.1)
    assert args.extra == {"hidden_channels": "64", "dropout": 0.1}
    config.write_text("model: gcn\nhiden_channels: 32\n")
    err = one_line_error("--config", str(config))
    assert "unknown flag(s) --hiden-channels" in err and "--list" in err


def test_model_flags_reach_the_constructor_with_their_type(train, tiny_data, tmp_path):
    proc = train(
        "--model",
        "gcn",
        "--max-epochs",
        "1",
        "--hidden-channels",
        "5",
        "--data-dir",
        str(tiny_data),
        "--run-dir",
        str(tmp_path / "run"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    hparams = next((tmp_path / "run").rglob("hparams.yaml"))
    assert "hidden_channels: 5\n" in hparams.read_text()
    err = train("--model", "gcn", "--hidden-channels", "five").stderr.strip()
    assert err == "error: --hidden-channels 'five' is not a valid int"
