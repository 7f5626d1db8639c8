"""The ``mpi`` strategy (2 ranks) with modules nobody here wrote, against Lightning's DDP (gloo) launched the same
way, in the same MPI job, or against one process on the union of the ranks' batches where DDP does not define
what is right (parameters unfrozen mid-training, which DDP's reducer never averages; sync_batchnorm, which
torch's SyncBatchNorm cannot do on a CPU)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conformance.jobs import launch
from conformance.references import union

MPI_RUNS = [
    "boring_fit/mpi",
    "boring_fit/mpi_by_name",
    "boring_manual/mpi",
    "step_schedule/mpi",
    "accumulate_clip/mpi",
    "drop_last/mpi",
    "unused/mpi",
    "unused/mpi_find_unused_parameters_true",
    "unfreeze/mpi",
    "gan_toggled/mpi",
    "gan_untoggled/mpi",
    "gan_untoggled/mpi_find_unused_parameters_true",
    "transformer/mpi",
    "transformer_bf16/mpi",
    "classifier/mpi",
    "checkpoint_early_stopping/mpi",
    "resume/mpi",
    "sync_batchnorm/mpi",
    "trainer_settings/mpi",
]
# after every mpi run: DDP's gloo group, once set up, stays until the job ends
DDP_RUNS = [
    "boring_fit/ddp",
    "boring_manual/ddp",
    "step_schedule/ddp",
    "accumulate_clip/ddp",
    "drop_last/ddp",
    "unused/ddp_find_unused",
    "gan_toggled/ddp_find_unused",
    "gan_untoggled/ddp_find_unused",
    "transformer/ddp",
    "transformer_bf16/ddp",
    "classifier/ddp",
    "checkpoint_early_stopping/ddp",
    "resume/ddp",
]
ATOL = 1e-6


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch(tmp_path_factory, "mpi_job.py", 2, MPI_RUNS + DDP_RUNS, timeout=240)


def assert_states_equal(got: dict, want: dict, who: str, atol: float = ATOL) -> None:
    assert got.keys() == want.keys(), who
    for name, value in want.items():
        difference = (got[name].double() - value.double()).abs().max().item()
        assert difference <= atol, f"{who}: {name} differs by {difference:.3g}"


def assert_equal_to(ranks: list[dict], reference: dict, what: str, atol: float = ATOL) -> None:
    """Every rank ends with the reference's parameters and buffers."""
    for rank, result in enumerate(ranks):
        assert_states_equal(result["state"], reference["state"], f"rank {rank} vs {what}", atol)


def assert_like_ddp(job, case: str, strategy: str = "mpi", ddp: str = "ddp", atol: float = ATOL) -> list[dict]:
    """Every rank ends as under DDP: parameters and buffers, counters, learning rates, logged metrics."""
    ranks, ddp_ranks = job.ok(case, strategy), job.ok(case, ddp)
    for rank, (got, want) in enumerate(zip(ranks, ddp_ranks)):
        assert_states_equal(got["state"], want["state"], f"rank {rank}: {strategy} vs {ddp}", atol)
    for rank, (got, want) in enumerate(zip(ranks, ddp_ranks)):
        assert (got["global_step"], got["current_epoch"]) == (want["global_step"], want["current_epoch"]), rank
        assert got["lrs"] == pytest.approx(want["lrs"]), f"rank {rank}: learning rates"
        assert got["metrics"].keys() == want["metrics"].keys(), rank
        for key, value in want["metrics"].items():
            assert got["metrics"][key] == pytest.approx(value, abs=1e-6), f"rank {rank}: logged {key}"
    return ranks


def one_line_error(ranks: list[dict]) -> str:
    errors = [r.get("error") for r in ranks]
    assert errors[0] is not None, "the case ran through; a one-line error was expected"
    assert all(r.get("error_type") == "UserError" for r in ranks), [r.get("traceback") for r in ranks]
    assert errors == [errors[0]] * len(ranks), f"ranks disagree: {errors}"
    assert "\n" not in errors[0], errors[0]
    return errors[0]


def refused_alike(ranks: list[dict], key: str, name: str) -> str:
    """The one-line error every rank saved under ``ranks[r][key][name]``: the same on all of them."""
    message = ranks[0][key][name]
    assert message is not None, f"{name} ran through; a one-line error was expected"
    assert "\n" not in message, message
    assert all(r[key][name] == message for r in ranks), f"{name}: ranks disagree"
    return message


def assert_logged_metrics_are_global(ranks: list[dict], stage: str, who: str = "") -> None:
    """Every rank's ``validate`` / ``test`` metrics equal the classifier's (rank 0's final state) on the
    whole evaluation set, computed in one process."""
    from conformance.models import ClassifierData, global_metrics

    want = global_metrics(classifier_with(ranks[0]["state"]), ClassifierData().sets[stage])
    for rank, result in enumerate(ranks):
        logged = result["validated" if stage == "val" else "tested"]
        for name, value in want.items():
            assert logged[f"{stage}_{name}"] == pytest.approx(value, abs=1e-5), f"{who}rank {rank}: {stage}_{name}"


# ---- plain fit, by name, manual optimization ---------------------------------------------------------------
def test_boring_model_fit_equals_ddp(job):
    ranks = assert_like_ddp(job, "boring_fit")
    assert ranks[0]["global_step"] == 16  # 2 epochs of 32 samples per rank in batches of 4
    assert ranks[0]["lrs"] == [pytest.approx(0.1 * 0.1**2)]  # BoringModel's StepLR, stepped per epoch


def test_trainer_strategy_mpi_by_name(job):
    by_name, built = job.ok("boring_fit", "mpi_by_name"), job.ok("boring_fit", "mpi")
    assert {r["strategy_class"] for r in by_name} == {"MPIAllReduceStrategy"}
    for rank, (got, want) in enumerate(zip(by_name, built)):
        assert_states_equal(got["state"], want["state"], f"rank {rank}", atol=0)


def test_devices_and_num_nodes_that_disagree_with_the_job_are_one_line_errors(job):
    ranks = job.ok("trainer_settings", "mpi")
    for name, fix in (("devices=3", "pass devices=2"), ("num_nodes=2", "pass num_nodes=1")):
        message = refused_alike(ranks, "refused", name)
        assert name in message and fix in message, message
    assert [r["matching_steps"] for r in ranks] == [8, 8], "devices=2, the job's processes, trains"


def test_fault_tolerance_ulfm_in_a_job_without_it_trains_and_says_it_is_off(job):
    ranks = job.ok("trainer_settings", "mpi")
    assert [r["ulfm_steps"] for r in ranks] == [8, 8]
    assert any("fault_tolerance='ulfm' is off" in w and "--with-ft ulfm" in w for w in ranks[0]["warnings"]), ranks[0][
        "warnings"
    ]


def test_manual_optimization_equals_ddp(job):
    assert_like_ddp(job, "boring_manual")


# ---- Lightning's training switches ---------------------------------------------------------------------------
def test_step_interval_schedule_equals_ddp(job):
    ranks = assert_like_ddp(job, "step_schedule")
    want = [0.1 * 0.5 ** (step // 3) for step in range(1, 9)]
    for result in ranks:
        assert result["lr_per_batch"] == pytest.approx(want)


def test_accumulation_and_clipping_equal_ddp(job):
    ranks = assert_like_ddp(job, "accumulate_clip")
    assert ranks[0]["global_step"] == 3  # 8 batches in steps of 3, 3, 2
    assert max(ranks[0]["grad_norms"]) > 0.05, "the gradients must be clipped for this case to test clipping"


def test_drop_last_equals_ddp_and_validates_every_epoch(job):
    ranks = assert_like_ddp(job, "drop_last")
    assert ranks[0]["global_step"] == 2 * (35 // 8)
    assert [len(r["epoch_metrics"]) for r in ranks] == [2, 2], "validation after each epoch"


def test_transformer_lm_equals_ddp(job):
    ranks = assert_like_ddp(job, "transformer")
    assert ranks[0]["global_step"] == 4


def test_transformer_lm_bf16_mixed_equals_ddp(job):
    assert_like_ddp(job, "transformer_bf16")
    bf16, fp32 = job.ok("transformer_bf16", "mpi")[0]["state"], job.ok("transformer", "mpi")[0]["state"]
    assert any(not torch.allclose(bf16[k], fp32[k], atol=1e-4) for k in fp32), "bf16 autocast must change training"


# ---- unused, frozen and unfrozen parameters ------------------------------------------------------------------
def test_unused_parameter_is_a_one_line_error_without_find_unused_parameters(job):
    error = one_line_error(job.results("unused", "mpi"))
    assert "unused.weight" in error and "find_unused_parameters=True" in error


def test_unused_parameter_with_find_unused_by_name_equals_ddp_and_stays_put(job):
    from conformance.models import BoringWithUnused

    ranks = assert_like_ddp(job, "unused", "mpi_find_unused_parameters_true", "ddp_find_unused")
    assert {r["strategy_class"] for r in ranks} == {"MPIAllReduceStrategy"}
    torch.manual_seed(0)
    initial = BoringWithUnused().state_dict()
    for result in ranks:  # AdamW's weight decay would have moved it under a zero gradient
        assert torch.equal(result["state"]["unused.weight"], initial["unused.weight"])


def test_backbone_unfrozen_mid_training_equals_one_process_on_the_union(job):
    ranks = job.ok("unfreeze", "mpi")
    assert_equal_to(ranks, union("unfreeze"), "one process on the union", atol=1e-5)
    assert ranks[0]["lrs"] == [pytest.approx(0.1), pytest.approx(0.05)]  # BackboneFinetuning's group added


def test_gan_with_toggle_optimizer_equals_one_process_and_ddp(job):
    assert_equal_to(job.ok("gan_toggled", "mpi"), union("gan_toggled"), "one process on the union", atol=1e-5)
    assert_like_ddp(job, "gan_toggled", ddp="ddp_find_unused")


def test_gan_without_toggle_is_a_one_line_error_naming_the_generator(job):
    error = one_line_error(job.results("gan_untoggled", "mpi"))
    assert "generator.0.weight" in error and "find_unused_parameters=True" in error


def test_gan_without_toggle_with_find_unused_equals_one_process_and_ddp(job):
    ranks = job.ok("gan_untoggled", "mpi_find_unused_parameters_true")
    assert_equal_to(ranks, union("gan_untoggled"), "one process on the union", atol=1e-5)
    assert_like_ddp(job, "gan_untoggled", "mpi_find_unused_parameters_true", "ddp_find_unused")


# ---- the classifier: BatchNorm, torchmetrics, sync_dist, evaluation --------------------------------------------
def test_classifier_with_batchnorm_fit_equals_ddp(job):
    """Every rank's parameters and BatchNorm buffers, and every metric logged during fit, as under DDP (whose
    first forward after training, validation's, gives every rank the first rank's buffers)."""
    assert_like_ddp(job, "classifier")
    for rank, (got, want) in enumerate(zip(job.ok("classifier", "mpi"), job.ok("classifier", "ddp"))):
        assert got["epoch_metrics"] == [pytest.approx(m, abs=1e-6) for m in want["epoch_metrics"]], (
            f"rank {rank}: metrics of each epoch's validation"
        )


def test_training_epoch_metrics_equal_their_global_values(job):
    ranks = job.ok("classifier", "mpi")
    last = [c for r in ranks for c in r["train_counts"] if c[0] == 1]
    samples = sum(c[2] for c in last)
    assert samples == 64
    for result in ranks:
        assert result["metrics"]["train_acc"] == pytest.approx(sum(c[1] for c in last) / samples, abs=1e-6)
        assert result["metrics"]["train_loss"] == pytest.approx(sum(c[3] for c in last) / samples, abs=1e-5)


def classifier_with(state: dict):
    from conformance.models import MetricClassifier

    model = MetricClassifier()
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.parametrize("stage", ["val", "test"])
def test_sync_dist_logs_and_torchmetrics_equal_their_global_values(job, stage):
    assert_logged_metrics_are_global(job.ok("classifier", "mpi"), stage)


def test_validate_test_and_predict_see_every_sample_once(job):
    from conformance.models import PREDICT, TEST, VAL, ClassifierData

    ranks = job.ok("classifier", "mpi")
    for stage, size in (("val", VAL), ("test", TEST), ("predict", PREDICT)):
        seen = sorted(i for r in ranks for i in r["seen"][stage])
        assert seen == list(range(size)), f"{stage}: each sample once over the ranks"
    model = classifier_with(ranks[0]["state"])
    x = ClassifierData().sets["predict"].tensors[0]
    with torch.no_grad():
        want = model(x).softmax(dim=1)
    for result in ranks:
        for index, probs in result["predicted"]:
            assert torch.allclose(probs, want[index], atol=1e-6)


def test_monitored_checkpoint_and_early_stopping_equal_ddp(job):
    ranks = assert_like_ddp(job, "checkpoint_early_stopping")
    ddp = job.ok("checkpoint_early_stopping", "ddp")
    for rank, (result, reference) in enumerate(zip(ranks, ddp)):
        assert result["stopped_epoch"] == reference["stopped_epoch"] == 1, rank  # patience 1, no epoch improves by 10
        assert result["current_epoch"] == 2, rank
        assert Path(result["best_model_path"]).name == Path(reference["best_model_path"]).name, rank
        assert result["best_model_score"] == pytest.approx(reference["best_model_score"], abs=1e-6), rank
        losses = [m["val_loss"] for m in result["epoch_metrics"]]
        best = min(range(len(losses)), key=losses.__getitem__)
        assert result["best_model_score"] == pytest.approx(losses[best]), rank
        assert result["saved"]["epoch"] == best, rank
        assert_states_equal(result["saved"]["state"], ranks[0]["epoch_states"][best], f"rank {rank}: checkpoint", 0)


def test_sync_batchnorm_equals_one_process_on_the_union(job):
    assert_equal_to(job.ok("sync_batchnorm", "mpi"), union("sync_batchnorm"), "one BatchNorm on the union", atol=1e-5)


# ---- resuming ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["mid_epoch", "epoch_end"])
def test_resume_from_ckpt_path_equals_an_uninterrupted_run(job, where):
    ranks, ddp = job.ok("resume", "mpi"), job.ok("resume", "ddp")
    for rank, (result, reference) in enumerate(zip(ranks, ddp)):
        assert_states_equal(result["whole"]["state"], reference["whole"]["state"], f"rank {rank}: mpi vs ddp")
        resumed, whole = result[where], result["whole"]
        assert resumed["global_step"] == whole["global_step"] == 16, rank
        assert resumed["lrs"] == pytest.approx(whole["lrs"]), rank
        assert_states_equal(resumed["state"], whole["state"], f"rank {rank}: resumed vs uninterrupted")
        assert math.isclose(resumed["lrs"][0], 0.1 * 0.1**2)
