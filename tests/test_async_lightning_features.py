"""Lightning features under the async strategy, as a user who did not write our code reaches for them.

Two MPI jobs, each running several fits one after the other (tests/mpi_scripts/train_async_features.py):
on 2 ranks (the server and one worker) accumulation, clipping, 16-mixed with a GradScaler and bf16-mixed,
each equal step by step to Lightning's own training in one process; on 3 ranks the refusal of what needs
validation during training (on every rank alike), Lightning's BoringModel (fit, checkpoint, validate,
test, predict), LR schedules, accumulation over two workers, and a worker that stops on its own.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_mpi_job
from mpi_scripts.train_async_features import EPOCHS, reference_run

ONE_WORKER_CASES = ["accumulate", "clip", "amp16", "bf16"]  # accumulate first: it finishes even on the old code
THREE_RANK_CASES = ["refusals", "boring", "onecycle", "accumulate_two_workers", "worker_stops"]
SAMPLES, BATCH = 32, 4  # TinyData's training set
BORING_SAMPLES = 64  # BoringModel's RandomDataset(32, 64), batches of 1


def _job(tmp_path_factory, n: int, cases: list[str], timeout: float) -> tuple[Path, str]:
    """Run the cases on ``n`` ranks; the results of the cases that finished, and the job's output."""
    out = tmp_path_factory.mktemp(f"async_features_{n}_ranks")
    return out, run_mpi_job(REPO / "tests" / "mpi_scripts" / "train_async_features.py", n, out, cases, timeout)


@pytest.fixture(scope="module")
def one_worker(tmp_path_factory):
    return _job(tmp_path_factory, 2, ONE_WORKER_CASES, timeout=240)


@pytest.fixture(scope="module")
def three_ranks(tmp_path_factory):
    return _job(tmp_path_factory, 3, THREE_RANK_CASES, timeout=300)


def results(job: tuple[Path, str], case: str, n: int) -> list[dict]:
    out, log = job
    files = [out / case / f"rank{r}.pt" for r in range(n)]
    if not all(f.exists() for f in files):
        pytest.fail(f"case {case!r} did not finish on every rank\n{log}")
    return [torch.load(f, weights_only=False) for f in files]


def assert_same_steps(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want), f"{len(got)} training batches, one process trained {len(want)}"
    for step, (a, b) in enumerate(zip(got, want)):
        for name in b:
            assert torch.allclose(a[name], b[name], atol=1e-6), f"batch {step}: {name} differs"


def assert_ends_with_server_parameters(ranks: list[dict]) -> None:
    for rank in ranks[1:]:
        for name, value in ranks[0]["state"].items():
            assert torch.equal(rank["state"][name], value), name


# ---- one worker: equal to one process, step by step ----------------------------------------------
def test_accumulation_trains_the_asked_epochs_and_no_more(one_worker, tmp_path):
    server, worker = results(one_worker, "accumulate", 2)
    seen = Counter(worker["seen"])
    assert sum(seen.values()) == EPOCHS * SAMPLES, (
        f"the worker trained {sum(seen.values()) / SAMPLES:g} epochs of its shard, asked for {EPOCHS}"
    )
    assert seen == {i: EPOCHS for i in range(SAMPLES)}  # every sample once per epoch
    steps = EPOCHS * math.ceil(SAMPLES // BATCH / 3)  # 8 batches per epoch in steps of 3, 3, 2
    assert server["summary"]["global_step"] == server["summary"]["async/updates"] == steps
    reference = reference_run("accumulate", str(tmp_path))
    assert reference["global_step"] == steps
    assert_same_steps(worker["snapshots"], reference["snapshots"])
    assert_ends_with_server_parameters([server, worker])


def test_gradient_clipping_is_applied_on_the_worker_before_the_push(one_worker, tmp_path):
    server, worker = results(one_worker, "clip", 2)
    clipped, plain = reference_run("clip", str(tmp_path / "clip")), reference_run("plain", str(tmp_path / "plain"))
    final = clipped["snapshots"][-1]
    assert any(not torch.allclose(final[k], plain["snapshots"][-1][k], atol=1e-3) for k in final), (
        "the clipping value must change training for this test to mean anything"
    )
    assert_same_steps(worker["snapshots"], clipped["snapshots"])
    assert server["summary"]["global_step"] == EPOCHS * SAMPLES // BATCH
    assert_ends_with_server_parameters([server, worker])


def test_16_mixed_pushes_unscaled_gradients_and_skipped_steps_keep_the_protocol(one_worker, tmp_path):
    server, worker = results(one_worker, "amp16", 2)
    reference = reference_run("amp16", str(tmp_path))
    scales = [65536.0] + reference["scales"]  # the GradScaler halves its scale at every step it skips
    skipped = sum(after < before for before, after in zip(scales, scales[1:]))
    assert skipped >= 1, "the poisoned step (inf loss) must have been skipped"
    assert worker["output_dtypes"] == ["torch.float16"]  # autocast ran
    assert worker["scales"] == reference["scales"]
    # scaled gradients would have moved the parameters by the scale (thousands of times) more
    assert_same_steps(worker["snapshots"], reference["snapshots"])
    summary = server["summary"]
    assert summary["async/skipped_steps"] == skipped
    assert summary["global_step"] == EPOCHS * SAMPLES // BATCH  # a skipped step still consumed its batch
    assert summary["async/updates"] == summary["global_step"] - skipped
    assert sum(summary["async/staleness_histogram"].values()) == summary["async/updates"]
    assert_ends_with_server_parameters([server, worker])


def test_bf16_mixed_autocasts_under_async(one_worker, tmp_path):
    server, worker = results(one_worker, "bf16", 2)
    assert worker["output_dtypes"] == ["torch.bfloat16"]
    assert_same_steps(worker["snapshots"], reference_run("bf16", str(tmp_path))["snapshots"])
    assert_ends_with_server_parameters([server, worker])


# ---- three ranks: the server and two workers -------------------------------------------------------
REFUSED = {
    "EarlyStopping": "EarlyStopping(monitor='val/loss')",
    "ModelCheckpoint": "ModelCheckpoint(monitor='val/loss')",
    "ReduceLROnPlateau": "ReduceLROnPlateau scheduler (monitor='val/loss')",
    "val_check_interval": "val_check_interval=0.5",
    "val_check_interval_batches": "val_check_interval=2",
}


def test_what_needs_validation_during_training_is_refused_alike_on_every_rank(three_ranks):
    ranks = results(three_ranks, "refusals", 3)
    for name, named in REFUSED.items():
        message = ranks[0]["messages"][name]
        assert message is not None, f"{name} was accepted, and would silently do nothing"
        assert named in message and "validates only after training" in message and "--strategy mpi" in message
        assert len(message.splitlines()) == 1
        assert [r["messages"][name] for r in ranks] == [message] * 3, "every rank refuses alike"
    results(three_ranks, "boring", 3)  # no rank was left waiting: the job went on with the next fit


def test_refused_through_train_py_before_any_rank_starts(one_line_error, tiny_data, tmp_path):
    from lightning.pytorch.callbacks import EarlyStopping

    from lightning_xd.launch.registry import MODELS
    from lightning_xd.models.gcn import GCN

    class GCNWithEarlyStopping(GCN):
        def configure_callbacks(self):
            return [EarlyStopping(monitor="val/acc", mode="max")]

    MODELS.register("gcn_early_stopping", data="cora", max_epochs=2)(GCNWithEarlyStopping)
    try:
        err = one_line_error(
            "--model",
            "gcn_early_stopping",
            "--strategy",
            "async",
            "--nprocs",
            "3",
            "--data-dir",
            str(tiny_data),
            "--run-dir",
            str(tmp_path / "run"),
        )
    finally:
        MODELS._entries.pop("gcn_early_stopping")
    assert "EarlyStopping(monitor='val/acc')" in err and "--strategy mpi" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # refused before the job started


def test_boring_model_fits_checkpoints_validates_tests_and_predicts(three_ranks):
    ranks = results(three_ranks, "boring", 3)
    steps = EPOCHS * BORING_SAMPLES  # batches of one sample over the two workers' halves
    assert ranks[0]["summary"]["global_step"] == steps
    assert ranks[0]["train_batches"] == 0 and sum(r["train_batches"] for r in ranks) == steps
    assert_ends_with_server_parameters(ranks)
    assert [(r["global_step"], r["current_epoch"]) for r in ranks] == [(steps, EPOCHS)] * 3
    # Lightning's default ModelCheckpoint: written by the server, known to every rank
    paths = {r["best_model_path"] for r in ranks}
    assert len(paths) == 1 and Path(paths.pop()).name == f"epoch={EPOCHS - 1}-step={steps}.ckpt"
    saved = ranks[0]["best_checkpoint"]
    assert saved["global_step"] == steps
    for name, value in ranks[0]["state"].items():
        assert torch.equal(saved["state_dict"][name], value), name
    # after training, evaluation covers every sample over all ranks (Lightning's padded sampler for val/test)
    assert sum(r["batches"]["predict"] for r in ranks) == BORING_SAMPLES
    for stage in ("val", "test"):
        assert all(r["batches"][stage] == math.ceil(BORING_SAMPLES / 3) for r in ranks)


def test_lr_schedules_step_on_the_server_per_epoch_and_per_step(three_ranks):
    boring = results(three_ranks, "boring", 3)  # StepLR(step_size=1, gamma=0.1), stepped per epoch
    assert [r["scheduler_steps"] for r in boring] == [EPOCHS] * 3
    assert [r["lr"] for r in boring] == [pytest.approx(0.1 * 0.1**EPOCHS)] * 3
    onecycle = results(three_ranks, "onecycle", 3)  # OneCycleLR(total_steps=estimated_stepping_batches)
    steps = EPOCHS * 2 * math.ceil(BORING_SAMPLES // 2 / 2)  # two workers, accumulating 2 batches a step
    assert onecycle[0]["summary"]["global_step"] == steps
    assert [r["total_steps"] for r in onecycle] == [steps] * 3, "the estimate counts the run's steps"
    assert [r["scheduler_steps"] for r in onecycle] == [steps] * 3, "stepped once per server step, to the end"
    assert len({r["lr"] for r in onecycle}) == 1


def test_accumulation_over_two_workers_counts_the_run_in_steps(three_ranks):
    ranks = results(three_ranks, "accumulate_two_workers", 3)
    per_worker = SAMPLES // 2 // BATCH  # 4 batches per worker and epoch, in steps of 2
    assert ranks[0]["summary"]["global_step"] == EPOCHS * 2 * per_worker // 2
    assert sum(r["batches"]["train"] for r in ranks[1:]) == EPOCHS * 2 * per_worker
    assert_ends_with_server_parameters(ranks)


def test_a_worker_that_stops_on_its_own_stops_the_run(three_ranks):
    ranks = results(three_ranks, "worker_stops", 3)  # on the old code the job hung here
    assert ranks[2]["batches"]["train"] == 3  # it set trainer.should_stop after its third batch
    assert ranks[0]["summary"]["global_step"] < 5 * SAMPLES // BATCH  # long before the 5 epochs asked
    assert_ends_with_server_parameters(ranks)
