"""A training loader with ``drop_last=True``: every epoch ends with validation, under every strategy that
wraps the loader to resume mid-epoch (``single``, ``ddp``, ``mpi``)."""

import json

import pytest
from conftest import run_alone, run_mpi


def check(result: dict, batches_per_epoch: int) -> None:
    assert result["trained_epochs"] == 3 and result["steps"] == 3 * batches_per_epoch, result
    assert result["validated_epochs"] == 3, f"validation ran after {result['validated_epochs']} of 3 epochs"
    assert result["best_model_path"].endswith(".ckpt") and result["early_stopping_best"] is not None, result


def test_single_process(tmp_path):
    proc = run_alone("fit_drop_last.py", "--out", str(tmp_path), "--strategies", "single", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check(json.loads((tmp_path / "single.json").read_text()), batches_per_epoch=70 // 8)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("drop-last")
    run_mpi(2, "fit_drop_last.py", "--out", str(out), "--strategies", "mpi", "ddp", cwd=out, timeout=180)
    return out


@pytest.mark.parametrize("strategy", ["mpi", "ddp"])
def test_two_processes(two_ranks, strategy):
    check(json.loads((two_ranks / f"{strategy}.json").read_text()), batches_per_epoch=35 // 8)
