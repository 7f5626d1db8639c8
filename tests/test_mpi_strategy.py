"""The mpi strategy: after K steps on 2 ranks, parameters are identical on both ranks and equal to
single-process training on the union of both ranks' batches; metrics cover the whole validation set."""

import pytest
import torch
import torch.nn.functional as F
from reference_training import fit_one_process, in_step_order
from tiny_models import TinyData, TinyRegressor


def single_process_reference(ranks: int, batch_size: int):
    """One process where step k sees the union of what every rank saw at step k (Lightning shards training
    data with a shuffling DistributedSampler, seed 0 without seed_everything); its final state, its number of
    steps, and its metrics on the whole validation set."""
    data = TinyData(batch_size)
    trainer, model = fit_one_process(TinyRegressor, in_step_order(data.train_set, ranks, batch_size, drop_last=True))
    x, ids, y = data.val_set[:]
    with torch.no_grad():
        pred = model(x, ids)
    return (
        model.state_dict(),
        trainer.global_step,
        {"val/mae": (pred - y).abs().mean().item(), "val/loss_sum": F.mse_loss(pred, y, reduction="sum").item()},
    )


@pytest.mark.parametrize("bucket_size_mb", [25.0, 0.0001])  # one bucket; one bucket per parameter
def test_two_ranks_equal_single_process_on_union(mpirun, tmp_path, bucket_size_mb):
    mpirun(
        2, "train_tiny.py", "--out", str(tmp_path / "out"), "--strategy", "mpi", "--bucket-size-mb", str(bucket_size_mb)
    )
    ranks = [torch.load(tmp_path / "out" / f"rank{r}.pt") for r in range(2)]
    reference, steps, metrics = single_process_reference(ranks=2, batch_size=4)
    for result in ranks:
        assert result["steps"] == steps
        assert result["sparse_grad_seen"] == [True] * steps  # sparse stayed sparse through the strategy
        for name, value in reference.items():
            assert torch.equal(result["state"][name], ranks[0]["state"][name]), f"{name} differs between ranks"
            assert torch.allclose(result["state"][name], value, atol=1e-5), name
        for name, value in metrics.items():  # the whole validation set, on every rank
            assert result["metrics"][name] == pytest.approx(value, abs=1e-5), name


def test_one_rank_in_process_matches_plain_sgd(tmp_path):
    """World size 1 runs without mpirun (MPI singleton) and is plain training."""
    from conftest import run_alone

    proc = run_alone("train_tiny.py", "--out", str(tmp_path / "out"), "--strategy", "mpi", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = torch.load(tmp_path / "out" / "rank0.pt")
    reference, steps, _ = single_process_reference(ranks=1, batch_size=4)
    assert result["steps"] == steps
    for name, value in reference.items():
        assert torch.allclose(result["state"][name], value, atol=1e-6), name
