"""The ``async`` strategy with modules nobody here wrote.

With one worker (2 ranks: the server and the worker) the strategy is deterministic: the worker trains on
the whole training set in its sampler's order and the server applies each of its gradients in turn, so it
must end exactly as one process of Lightning's own training does (``conformance.references.one_worker``).
With two workers (3 ranks) the order of updates depends on timing: the tests check what must hold whatever
it is (every rank ends with the server's state, the run's steps and epochs, evaluation over every sample
once, metrics equal to their global values) and that what async cannot honour is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

from conformance.jobs import launch
from conformance.references import one_worker
from conformance.test_mpi import (
    assert_equal_to,
    assert_logged_metrics_are_global,
    assert_states_equal,
    one_line_error,
    refused_alike,
)

ONE_WORKER = [
    "boring_fit",
    "step_schedule",
    "accumulate_clip",
    "drop_last",
    "unused",
    "gan_toggled",
    "classifier",
    "transformer",
    "transformer_bf16",
]
TWO_WORKERS = [
    "boring_fit/async",
    "boring_fit/async_by_name",
    "boring_manual/async",
    "gan_toggled/async",
    "classifier/async",
    "straggler/async",
    "refusals/async",
    "sync_batchnorm/async",
    "unfreeze/async",
]


@pytest.fixture(scope="module")
def one_worker_job(tmp_path_factory):
    return launch(tmp_path_factory, "async_job.py", 2, [f"{case}/async" for case in ONE_WORKER], timeout=180)


@pytest.fixture(scope="module")
def two_worker_job(tmp_path_factory):
    return launch(tmp_path_factory, "async_job.py", 3, TWO_WORKERS, timeout=180)


# ---- one worker: exactly one process's training ------------------------------------------------------------
@pytest.mark.parametrize("case", ONE_WORKER)
def test_one_worker_trains_as_one_process(one_worker_job, case):
    ranks = one_worker_job.ok(case, "async")
    reference = one_worker(case, ranks[1]["threads"])
    assert_equal_to(ranks, reference, "one process", atol=1e-5)
    for rank, result in enumerate(ranks):
        assert result["global_step"] == reference["global_step"], f"rank {rank}: the run's steps"
        assert result["current_epoch"] == reference["current_epoch"], f"rank {rank}: the run's epochs"
        assert result["lrs"] == pytest.approx(reference["lrs"]), f"rank {rank}: learning rates"


# ---- two workers: what holds whatever the order of updates --------------------------------------------------
def test_every_rank_ends_with_the_servers_state_and_the_runs_counters(two_worker_job):
    for case, strategy in (
        ("boring_fit", "async"),
        ("boring_fit", "async_by_name"),
        ("classifier", "async"),
        ("straggler", "async"),
    ):
        ranks = two_worker_job.ok(case, strategy)
        for rank, result in enumerate(ranks[1:], start=1):
            assert_states_equal(result["state"], ranks[0]["state"], f"{case}/{strategy}: rank {rank} vs server", 0)
        for rank, result in enumerate(ranks):  # 64 samples, 2 workers, batches of 4: 16 steps an epoch
            assert (result["global_step"], result["current_epoch"]) == (32, 2), f"{case}/{strategy}: rank {rank}"
    boring = two_worker_job.ok("boring_fit", "async")
    assert all(r["lrs"] == [pytest.approx(0.1 * 0.1**2)] for r in boring), "StepLR stepped once per epoch of the run"
    assert {r["strategy_class"] for r in two_worker_job.ok("boring_fit", "async_by_name")} == {
        "AsyncStaleGradientStrategy"
    }


@pytest.mark.parametrize("case, steps_per_batch", [("boring_manual", 1), ("gan_toggled", 2)])
def test_manual_optimization_ends_in_the_servers_state_after_every_workers_epoch(two_worker_job, case, steps_per_batch):
    """Each worker runs its own epoch (the server cannot know how many steps a batch makes): the run is
    every batch of both shards, each with the optimizer steps the module made on it."""
    ranks = two_worker_job.ok(case, "async")
    for rank, result in enumerate(ranks[1:], start=1):
        assert_states_equal(result["state"], ranks[0]["state"], f"{case}: rank {rank} vs server", 0)
    for rank, result in enumerate(ranks):  # 64 samples, batches of 4: 16 batches over the two workers
        assert (result["global_step"], result["current_epoch"]) == (16 * steps_per_batch, 1), f"rank {rank}"
    assert sorted(len(r["batches"]) for r in ranks) == [0, 8, 8], "each worker its shard, the server none"
    assert all(torch.isfinite(v.float()).all() for v in ranks[0]["state"].values())


@pytest.mark.parametrize("case", ["classifier", "straggler"])
def test_workers_train_their_own_shards_and_every_rank_evaluates_its_share(two_worker_job, case):
    """The run is 32 server steps; no worker waits, so a faster worker may take more of them than its
    share (it starts its shard again) while a slower one has not finished its own: within a worker's
    pass no sample repeats, and the two workers' shards do not overlap."""
    from conformance.models import PREDICT, TEST, TRAIN, VAL

    ranks = two_worker_job.ok(case, "async")
    assert ranks[0]["seen_in_fit"]["train"] == [], "the server trains on no batch"
    assert sum(len(r["seen_in_fit"]["train"]) for r in ranks) == 32, "one batch per server step"
    passes = [{}, {}]  # worker -> its pass -> the samples it trained in that pass
    for worker, result in enumerate(ranks[1:]):
        for epoch, batch in result["seen_in_fit"]["train"]:
            passes[worker].setdefault(epoch, []).extend(batch)
        for epoch, samples in passes[worker].items():
            assert len(samples) == len(set(samples)), f"worker {worker + 1}: a sample repeated in pass {epoch}"
    for epoch in set(passes[0]) & set(passes[1]):  # the shards of one epoch of the sampler
        ours, theirs = set(passes[0][epoch]), set(passes[1][epoch])
        assert not ours & theirs and ours | theirs <= set(range(TRAIN)), f"pass {epoch}: shards overlap"
    for rank, result in enumerate(ranks):  # BatchNorm counts every batch either worker trained on
        counts = {k: int(v) for k, v in result["state"].items() if k.endswith("num_batches_tracked")}
        assert counts and set(counts.values()) == {2 * 16}, f"rank {rank}: {counts}"
    for stage, size in (("val", VAL), ("test", TEST), ("predict", PREDICT)):
        seen = sorted(i for r in ranks for i in r["seen"][stage])
        assert seen == list(range(size)), f"{stage}: each sample once over the three ranks"


@pytest.mark.parametrize("stage", ["val", "test"])
def test_evaluation_metrics_equal_their_global_values(two_worker_job, stage):
    for case in ("classifier", "straggler"):
        assert_logged_metrics_are_global(two_worker_job.ok(case, "async"), stage, f"{case}: ")


def test_what_needs_validation_during_training_is_refused_in_one_line_on_every_rank(two_worker_job):
    ranks = two_worker_job.ok("refusals", "async")
    for name in ranks[0]["messages"]:
        assert "async" in refused_alike(ranks, "messages", name)


@pytest.mark.parametrize("case, names", [("sync_batchnorm", "sync_batchnorm=True"), ("unfreeze", "BackboneFinetuning")])
def test_what_async_cannot_follow_is_a_one_line_error(two_worker_job, case, names):
    assert names in one_line_error(two_worker_job.results(case, "async"))
