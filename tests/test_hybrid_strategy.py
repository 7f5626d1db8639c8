"""The hybrid strategy: pipeline stages x data-parallel replicas equal single-process training."""

import pytest
import torch
import torch.nn.functional as F
from reference_training import fit_one_process, in_step_order
from tiny_models import TinyData, TinyPipelined

from lightning_xd.launch.registry import MODELS
from lightning_xd.parallel.pipeline import partition, schedule

if "tiny-pipelined" not in MODELS:  # a pipelined model for the command-line checks

    @MODELS.register("tiny-pipelined", data="cora")
    def _tiny_pipelined(num_features: int = 0, num_classes: int = 0) -> TinyPipelined:
        return TinyPipelined()


def single_process_reference(replicas: int, batch_size: int = 8):
    """The unsplit model in one process on the union of the replicas' batches; its state and validation loss."""
    data = TinyData(batch_size)
    _, model = fit_one_process(TinyPipelined, in_step_order(data.train_set, replicas, batch_size, drop_last=True))
    x, _, y = data.val_set[:]
    with torch.no_grad():
        val_loss = F.mse_loss(model(x), y).item()
    return model.state_dict(), val_loss


@pytest.mark.parametrize("ranks", [2, 4])  # 2 stages x 1 replica, 2 stages x 2 replicas
def test_stages_and_replicas_equal_single_process(mpirun, tmp_path, ranks):
    mpirun(
        ranks,
        "train_tiny_hybrid.py",
        *("--out", str(tmp_path), "--stages", "2", "--microbatches", "4", "--schedules", "gpipe", "1f1b"),
        timeout=300,
    )
    reference, val_loss = single_process_reference(replicas=ranks // 2)
    for kind in ("gpipe", "1f1b"):
        check_run(tmp_path / kind, ranks, reference, val_loss)


def check_run(out, ranks, reference, val_loss):
    results = [torch.load(out / f"rank{r}.pt") for r in range(ranks)]
    for r, result in enumerate(results):
        for name, value in result["own"].items():
            assert torch.allclose(value, reference[name], atol=1e-5), f"rank {r}: {name}"
        assert result["metrics"]["val/loss"] == pytest.approx(val_loss, abs=1e-5)
        assert result["decisions"] == {"broadcast": 0, "all_agree": False, "any_agrees": True}
    owned = [set(r["own"]) for r in results[:2]]
    assert not owned[0] & owned[1] and owned[0] | owned[1] == set(reference)  # stages split the model
    summary = results[0]["summary"]
    total = summary["pipeline/params_total"]
    assert total == sum(v.numel() for v in reference.values())
    assert all(abs(n / total - 0.5) < 0.2 for n in summary["pipeline/params_per_rank"])  # about 1/P each
    assert summary["pipeline/bubble_theory"] == pytest.approx(1 / 5)
    assert 0 < summary["pipeline/bubble_measured"] < 1
    if ranks == 2:  # the last stage's step lasts until the first stage's final backward is done
        timelines, step_s = summary["pipeline/timelines"], summary["pipeline/last_step_s"]
        _, _, first_start, first_end = timelines[0][-1]
        assert step_s[1] - timelines[1][-1][3] >= first_end - first_start - 1e-5
    checkpoint = torch.load(out / "hybrid.ckpt", weights_only=False)
    for name, value in reference.items():  # one file with every stage: a plain checkpoint of the model
        assert torch.allclose(checkpoint["state_dict"][name], value, atol=1e-5), name
    assert len(checkpoint["optimizer_states"][0]["pipeline_stages"]) == 2


def test_schedules_run_every_pass_once_and_1f1b_keeps_few_activations():
    for kind in ("gpipe", "1f1b"):
        for stage in range(4):
            ops = schedule(kind, stage, 4, 8)
            assert sorted(ops) == sorted([("F", i) for i in range(8)] + [("B", i) for i in range(8)])
            alive, peak = 0, 0
            for op, _ in ops:
                alive += 1 if op == "F" else -1
                peak = max(peak, alive)
            assert peak == (8 if kind == "gpipe" else 4 - stage)


def test_partition_balances_parameters():
    assert [list(r) for r in partition([10, 10, 10, 10], 2)] == [[0, 1], [2, 3]]
    assert [list(r) for r in partition([30, 5, 5, 5, 5], 2)] == [[0], [1, 2, 3, 4]]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--nprocs", "3", "--pipeline-stages", "2"], "3 processes cannot form pipelines of 2 stages"),
        (["--nprocs", "2", "--pipeline-stages", "2", "--schedule", "zigzag"], "unknown --schedule 'zigzag'"),
    ],
)
def test_bad_settings_are_one_line_errors_before_any_process_starts(capsys, tiny_data, tmp_path, args, message):
    import train

    code = train.main(
        [
            "--model",
            "tiny-pipelined",
            "--strategy",
            "hybrid",
            "--data-dir",
            str(tiny_data),
            "--cache-dir",
            str(tmp_path),
            *args,
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize(
    "model, message",
    [
        ("gcn", "model GCN cannot be split into pipeline stages (it has no pipeline_blocks"),
        ("tiny-pipelined", "--pipeline-stages 6 but TinyPipelined has only 5 blocks"),
    ],
)
def test_model_without_stages_and_more_stages_than_layers(capsys, tiny_data, tmp_path, model, message):
    import train

    code = train.main(
        [
            "--model",
            model,
            "--strategy",
            "hybrid",
            "--nprocs",
            "6",
            "--pipeline-stages",
            "6",
            "--data-dir",
            str(tiny_data),
            "--cache-dir",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err, err
