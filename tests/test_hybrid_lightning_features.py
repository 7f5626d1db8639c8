"""Lightning features under the hybrid strategy, each against the unsplit model in one process.

One MPI job of 4 ranks (2 pipeline stages x 2 replicas) runs the cases of
tests/mpi_scripts/train_hybrid_features.py one after the other: predict / validate / test through the
pipeline, the backward hooks, micro-batches of unequal sizes, building on the meta device, gradient
clipping by the norm over all stages, bf16-mixed and 16-mixed through the precision plugin, LR schedules
with ModelCheckpoint / EarlyStopping and resuming from a checkpoint, and one-line refusals.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, run_mpi_job
from mpi_scripts.train_hybrid_features import CLIP, INIT_SCALE, MICROBATCHES, POISON_STEP, STAGES
from reference_training import StepOrder
from tiny_models import TinyData, TinyPipelined
from torch.optim.lr_scheduler import StepLR

from lightning_xd.parallel.microbatch import split_batch

RANKS, REPLICAS = 4, 2
JOB_TIMEOUT = 240  # under pytest-timeout's 300 s: a hung job still shows the cases that finished
CASES = ["main", "clip", "bf16", "amp16", "resume", "memory", "refusals"]


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> tuple[Path, str]:
    """Run every case in one job; the results of the cases that finished, and the job's output."""
    out = tmp_path_factory.mktemp("hybrid_features")
    script = REPO / "tests" / "mpi_scripts" / "train_hybrid_features.py"
    return out, run_mpi_job(script, RANKS, out, CASES, JOB_TIMEOUT)


def results(job, case: str) -> list[dict]:
    out, log = job
    files = [out / case / f"rank{r}.pt" for r in range(RANKS)]
    if not all(f.exists() for f in files):
        pytest.fail(f"case {case!r} did not finish on every rank\n{log}")
    ranks = [torch.load(f, weights_only=False) for f in files]
    for r, result in enumerate(ranks):
        if "error" in result:
            pytest.fail(f"case {case!r} failed on rank {r}:\n{result['error']}")
    return ranks


def stage_of(rank: int) -> int:
    return rank % STAGES


def replica_of(rank: int) -> int:
    return rank // STAGES


# ---- the unsplit model in one process ----------------------------------------------------------------
def replica_batches(data: TinyData, batch_size: int, epoch: int):
    """Each step's batches, one per replica, as the strategy's loaders draw them."""
    order = StepOrder(len(data.train_set), REPLICAS, batch_size)
    order.set_epoch(epoch)
    shards = order.shards()
    for k in range(math.ceil(len(shards[0]) / batch_size)):
        yield [data.train_set[s[k * batch_size : (k + 1) * batch_size]] for s in shards]


def reference(
    batch_size: int,
    epochs: int = 1,
    clip: float | None = None,
    schedule: bool = False,
    microbatched: bool = False,
    autocast: torch.dtype | None = None,
    scaler=None,
    poison_step: int | None = None,
) -> tuple[dict, dict]:
    """Train TinyPipelined in one process on the union of the replicas' batches (each replica's mean loss,
    averaged), or, with ``microbatched``, as the pipeline computes it in reduced precision: each replica's
    gradient accumulated over the same micro-batches (each loss weighted by its share of the replica's
    batch, scaled by ``scaler``), then averaged over the replicas. Returns the final state and what each
    step saw."""
    data, model = TinyData(batch_size), TinyPipelined()
    optimizer = model.configure_optimizers()
    scheduler = StepLR(optimizer, 2, 0.5) if schedule else None
    params = list(model.parameters())
    log = {"replica_losses": [], "grads": [], "scales": [], "lrs": []}
    step = 0
    for epoch in range(epochs):
        for batches in replica_batches(data, batch_size, epoch):
            with torch.no_grad():
                log["replica_losses"].append([F.mse_loss(model(b[0]), b[2]).item() for b in batches])
            if microbatched:
                summed = [torch.zeros_like(p) for p in params]
                for batch in batches:
                    optimizer.zero_grad()
                    for part in split_batch(batch, MICROBATCHES):
                        with torch.autocast("cpu", dtype=autocast) if autocast else nullcontext():
                            loss = F.mse_loss(model(part[0]), part[2]) * (len(part[0]) / len(batch[0]))
                        (scaler.scale(loss) if scaler else loss).backward()
                    for total, p in zip(summed, params):
                        total += p.grad
                for total, p in zip(summed, params):
                    p.grad = total / REPLICAS
            else:
                optimizer.zero_grad()
                union_loss = sum(F.mse_loss(model(b[0]), b[2]) for b in batches) / REPLICAS
                union_loss.backward()
            if step == poison_step:
                params[0].grad.fill_(float("inf"))
            log["grads"].append({name: p.grad.clone() for name, p in model.named_parameters()})
            if scaler:
                scaler.unscale_(optimizer)
            if clip:
                torch.nn.utils.clip_grad_norm_(params, clip)
            if scaler:
                scaler.step(optimizer)
                scaler.update()
                log["scales"].append(float(scaler.get_scale()))
            else:
                optimizer.step()
            if scheduler:
                scheduler.step()
            log["lrs"].append(optimizer.param_groups[0]["lr"])  # as Lightning's on_train_batch_end sees it
            step += 1
    return model.state_dict(), log


def assert_stages_equal(ranks: list[dict], want: dict, atol: float, key: str = "own") -> None:
    for r, result in enumerate(ranks):
        assert result[key], f"rank {r} holds no parameters"
        for name, value in result[key].items():
            assert torch.allclose(value.float(), want[name], atol=atol), (
                f"rank {r} ({name}): max difference {(value.float() - want[name]).abs().max():.3g}"
            )


def unsplit_with(ranks: list[dict], key: str = "own") -> TinyPipelined:
    """The unsplit model holding the parameters the pipeline's stages ended with."""
    model = TinyPipelined()
    state = {}
    for result in ranks[:STAGES]:
        state.update(result[key])
    model.load_state_dict(state)
    return model.eval()


# ---- defect 4: micro-batches of unequal sizes -----------------------------------------------------------
def test_unequal_microbatches_weighted_by_their_samples(job):
    """Batches of 7 in micro-batches of 2/2/1/2 and a last batch of 2 (two micro-batches of 1): the step's
    gradient is the gradient of the batch's mean loss, as for the unsplit model on whole batches."""
    ranks = results(job, "main")
    want, _ = reference(batch_size=7, schedule=True)
    assert ranks[0]["steps"] == 3
    assert_stages_equal(ranks, want, atol=1e-5)


# ---- defect 2: Lightning's backward hooks --------------------------------------------------------------
def test_backward_hooks_run_once_per_step_on_every_rank(job):
    ranks = results(job, "main")
    _, log = reference(batch_size=7, schedule=True)
    steps = len(log["replica_losses"])
    for r, result in enumerate(ranks):
        own = set(result["stage_keys"])
        for who in ("module", "callback"):
            calls = [c for c in result["hooks"] if c[0] == who]
            assert [(c[1], c[2]) for c in calls] == [(h, s) for s in range(steps) for h in ("before", "after")], (
                f"rank {r}, {who} hooks: {calls}"
            )
            for step in range(steps):
                (_, _, _, loss, grads_before), (_, _, _, _, grads_after) = calls[2 * step : 2 * step + 2]
                # the loss of this replica's batch (every stage of the pipeline has it)
                assert loss == pytest.approx(log["replica_losses"][step][replica_of(r)], abs=1e-5), (r, who, step)
                assert grads_before is None, f"rank {r}: gradients before backward at step {step}"
                # after backward: this stage's gradients, averaged over the replicas
                want = sum(float(g.double().pow(2).sum()) for n, g in log["grads"][step].items() if n in own)
                assert grads_after == pytest.approx(want, rel=1e-4), (r, who, step)


# ---- defect 5: building on the meta device ------------------------------------------------------------
def test_built_on_the_meta_device_other_stages_never_materialised(job):
    ranks = results(job, "main")
    reference_model = TinyPipelined()
    for r, result in enumerate(ranks):
        own = set(result["stage_keys"])
        for name, is_meta in result["meta_at_start"].items():
            assert is_meta == (name not in own), f"rank {r}: {name} {'is' if is_meta else 'is not'} on the meta device"
        for name, value in result["initial"].items():  # the values the unsplit model starts from
            assert torch.equal(value, reference_model.state_dict()[name]), f"rank {r}: {name}"

    wide = results(job, "memory")
    total = sum(wide[0]["param_bytes"].values())
    for r, result in enumerate(wide):
        own = set(result["stage_keys"])
        assert {n for n, real in result["real"].items() if real} == own, f"rank {r}"
        assert all(result["own_equal_whole"].values()) and result["own_equal_whole"], f"rank {r}"
        own_bytes = sum(b for n, b in result["param_bytes"].items() if n in own)
        # from construction to the end of set-up: this stage, plus one other parameter at a time (and the
        # generator states recorded while building: 5 kB per random initialisation on the CPU)
        assert result["peak_bytes"] < own_bytes + max(result["param_bytes"].values()) + 0.1 * total, (
            f"rank {r}: {result['peak_bytes']} bytes allocated at the peak; this stage holds {own_bytes} of {total}"
        )
        assert result["peak_bytes"] < 0.7 * total, f"rank {r}: {result['peak_bytes']} of {total}"


# ---- defect 1: predict, validate and test through the pipeline --------------------------------------
def test_predict_validate_and_test_through_the_pipeline(job):
    ranks = results(job, "main")
    model = unsplit_with(ranks)
    val = TinyData().val_set
    x, _, y = val[:]
    with torch.no_grad():
        outputs = model(x)
        val_loss = F.mse_loss(outputs, y).item()
    seen = []
    for r, result in enumerate(ranks):
        assert result["predict_error"] is None, f"rank {r}: {result['predict_error']}"
        indices = result["predicted_indices"]
        assert len(result["predictions"]) == len(indices) > 0, f"rank {r}"
        for batch, index in zip(result["predictions"], indices):
            assert torch.allclose(batch, outputs[index], atol=1e-6), f"rank {r}, samples {index}"
        if stage_of(r) == 0:
            seen += [i for index in indices for i in index]
        else:  # every stage of a pipeline returns the same predictions
            assert indices == ranks[r - 1]["predicted_indices"]
        assert result["val"]["val/loss"] == pytest.approx(val_loss, abs=1e-5), f"rank {r}"
        assert result["test"]["test/loss"] == pytest.approx(val_loss, abs=1e-5), f"rank {r}"
    assert sorted(seen) == list(range(len(val))), "every sample predicted once"


# ---- clipping: the norm over every stage --------------------------------------------------------------
def test_gradient_clipping_uses_the_norm_over_all_stages(job):
    ranks = results(job, "clip")
    want, log = reference(batch_size=8, clip=CLIP)
    total_norms = [torch.cat([g.flatten() for g in grads.values()]).norm() for grads in log["grads"]]
    assert min(total_norms) > 2 * CLIP, "the reference must clip at every step"
    assert_stages_equal(ranks, want, atol=1e-5)


# ---- defect 3: the precision plugin -------------------------------------------------------------------
def test_bf16_mixed_forwards_run_under_autocast(job):
    ranks = results(job, "bf16")
    for r, result in enumerate(ranks):
        for stage in ("train", "validate", "predict"):
            seen = {(on, dtype) for s, on, dtype in result["forwards"] if s == stage}
            if stage == "predict":
                assert result["predict_error"] is None, f"rank {r}: {result['predict_error']}"
            assert seen == {(True, "torch.bfloat16")}, f"rank {r}, {stage}: (autocast on, output dtype) {seen}"
        assert result["prediction_dtypes"] == ["torch.bfloat16"], f"rank {r}"
    want, _ = reference(batch_size=8, microbatched=True, autocast=torch.bfloat16)
    assert_stages_equal(ranks, want, atol=1e-5)  # the same micro-batches in the same precision


def test_amp16_scales_each_microbatch_loss_and_every_rank_skips_an_overflow(job):
    """16-mixed with a GradScaler: each micro-batch's loss scaled before its backward, the plugin
    unscales; an inf gradient on one rank makes every stage and replica skip that step."""
    ranks = results(job, "amp16")
    want, log = reference(
        batch_size=8,
        microbatched=True,
        autocast=torch.float16,
        scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE),
        poison_step=POISON_STEP,
    )
    assert log["scales"] == [INIT_SCALE, INIT_SCALE / 2], "the reference skips the poisoned step, and only it"
    for r, result in enumerate(ranks):
        assert result["scales"] == log["scales"], f"rank {r}: scales {result['scales']}"
    assert_stages_equal(ranks, want, atol=1e-5)  # the same micro-batches in the same precision


# ---- the rest of a user's expectations ------------------------------------------------------------------
def test_schedules_checkpoint_early_stopping_and_resume(job):
    ranks = results(job, "resume")
    want, log = reference(batch_size=8, epochs=3, schedule=True)
    wholes = [r["whole"] for r in ranks]
    assert_stages_equal(wholes, want, atol=1e-5)
    for r, (result, whole) in enumerate(zip(ranks, wholes)):
        assert whole["lrs"] == log["lrs"], f"rank {r}"
        assert len(whole["val_losses"]) == 3 and whole["best_path_exists"], f"rank {r}"
        assert whole["best_score"] == pytest.approx(min(whole["val_losses"])), f"rank {r}"
        assert whole["stop_best"] == pytest.approx(min(whole["val_losses"])), f"rank {r}"
        # resumed after the first epoch: the same parameters and learning rates as without the break
        assert result["resumed_steps"] == whole["steps"]
        assert result["resumed_lrs"] == whole["lrs"][len(whole["lrs"]) - len(result["resumed_lrs"]) :]
        for name, value in result["resumed"].items():
            assert torch.allclose(value, whole["own"][name], atol=1e-6), f"rank {r}: {name}"


def test_what_the_pipeline_cannot_do_is_refused_in_one_line(job):
    for r, result in enumerate(results(job, "refusals")):
        messages = result["messages"]
        assert messages["accumulate"] and "use --microbatches" in messages["accumulate"], (r, messages)
        assert messages["manual"] and "automatic optimization" in messages["manual"], (r, messages)
        assert all(len(m.splitlines()) == 1 for m in messages.values()), (r, messages)
