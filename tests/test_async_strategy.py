"""The async strategy: a parameter server with bounded staleness, under mpirun."""

import pytest
import torch
from reference_training import StateAfterEachBatch, fit_one_process, in_step_order
from tiny_models import TinyData, TinyRegressor


def plain_sgd_snapshots(epochs: int, batch_size: int = 4):
    """Parameters after every step of single-process SGD on the batches the one worker sees."""
    snapshots = StateAfterEachBatch()
    train = in_step_order(TinyData(batch_size).train_set, replicas=1, batch_size=batch_size)
    fit_one_process(TinyRegressor, train, epochs=epochs, callbacks=[snapshots])
    return snapshots.snapshots


def test_one_worker_and_server_follow_plain_sgd_step_by_step(mpirun, tmp_path):
    mpirun(2, "train_tiny_async.py", "--out", str(tmp_path), "--max-epochs", "2", "--staleness", "4")
    server, worker = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    reference = plain_sgd_snapshots(epochs=2)
    assert server["summary"]["global_step"] == len(reference) == 16
    assert server["summary"]["async/staleness_max"] == 0  # one worker: never stale
    assert len(worker["snapshots"]) == len(reference)
    for step, (got, want) in enumerate(zip(worker["snapshots"], reference)):
        for name in want:
            assert torch.allclose(got[name], want[name], atol=1e-6), f"step {step}: {name}"
    for name in reference[-1]:  # every rank ends with the server's parameters
        assert torch.equal(server["state"][name], worker["state"][name])


def test_slow_worker_never_exceeds_the_staleness_bound(mpirun, tmp_path):
    bound = 2
    mpirun(
        3,
        "train_tiny_async.py",
        *("--out", str(tmp_path), "--max-epochs", "3", "--staleness", str(bound), "--straggler", "2:0.05"),
        timeout=240,
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    summary = ranks[0]["summary"]
    histogram = {int(k): v for k, v in summary["async/staleness_histogram"].items()}
    assert summary["global_step"] == sum(histogram.values()) == 3 * 8  # 3 epochs of 2 x 4 batches, none dropped
    assert max(histogram) <= bound and summary["async/staleness_max"] <= bound
    assert any(s > 0 for s in histogram)  # the workers really ran apart
    fast, slow = len(ranks[1]["snapshots"]), len(ranks[2]["snapshots"])
    assert fast > slow, "the fast worker should have taken more steps than the slowed one"
    for r in (1, 2):
        for name, value in ranks[0]["state"].items():
            assert torch.equal(ranks[r]["state"][name], value)
    # evaluation ran on the server's parameters over all ranks: identical metrics everywhere
    for r in (1, 2):
        assert ranks[r]["final"] == pytest.approx(ranks[0]["final"])


def test_training_converges(mpirun, tmp_path):
    mpirun(3, "train_tiny_async.py", "--out", str(tmp_path), "--max-epochs", "12", "--staleness", "4", timeout=240)
    result = torch.load(tmp_path / "rank0.pt")
    initial, final = result["initial"]["val/loss_sum"], result["final"]["val/loss_sum"]
    # constant-rate SGD on batches of 4 plateaus at 2-8 (of 81) here, whatever the interleaving of workers
    assert final < initial / 5, (initial, final)


def test_checkpoint_resumes_server_version_and_parameters(mpirun, tmp_path):
    from lightning_xd.fault_tolerance.checkpoints import CheckpointStore

    first = tmp_path / "first"
    mpirun(2, "train_tiny_async.py", "--out", str(first), "--max-epochs", "1", "--staleness", "4")
    checkpoint, manifest = CheckpointStore(first / "checkpoints").newest_verified()
    saved = torch.load(checkpoint, weights_only=False)
    assert manifest["global_step"] == 8 and manifest["strategy"] == "AsyncStaleGradientStrategy"
    assert saved["async_server"]["version"] == 8 and saved["optimizer_states"]
    longer = tmp_path / "longer"  # one more epoch: the version goes on from 8, from the saved parameters
    mpirun(
        2,
        "train_tiny_async.py",
        *("--out", str(longer), "--max-epochs", "2", "--staleness", "4", "--ckpt-path", str(checkpoint)),
    )
    server, worker = (torch.load(longer / f"rank{r}.pt") for r in range(2))
    assert server["summary"]["global_step"] == 16 and len(worker["snapshots"]) == 8
    reference = plain_sgd_snapshots(epochs=1)[-1]
    for name, value in saved["state_dict"].items():  # what the first run ended with
        assert torch.allclose(value, reference[name], atol=1e-6), name


def test_gcn_with_async_through_train_py(train, tiny_data, tmp_path):
    import json

    run = tmp_path / "run"
    proc = train(
        "--model",
        "gcn",
        "--strategy",
        "async",
        "--nprocs",
        "3",
        "--max-epochs",
        "15",
        "--staleness",
        "2",
        "--data-dir",
        str(tiny_data),
        "--run-dir",
        str(run),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["global_step"] == 30 and metrics["async/staleness_max"] <= 2
    assert metrics["test/acc"] >= 0.8
    assert json.loads((run / "checkpoints" / "step-000000030.json").read_text())["kind"] == "end"
