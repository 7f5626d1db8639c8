"""Autoencoder on generated ECG5000-format beats: train.py end to end, the stratified split with
normal beats only in training, and one-line errors for bad beat files."""

import numpy as np
import pytest
import torch
from conftest import ready_datamodule
from generators.ecg import COUNTS, write_ecg5000
from reference_training import one_process_trainer

from lightning_xd.datamodules.ecg import ECGDataModule
from lightning_xd.models.autoencoder import DenseAutoencoder


@pytest.fixture(scope="module")
def ecg_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ecg")
    write_ecg5000(root)
    return root


def test_learns_to_tell_abnormal_beats(ecg_data, tmp_path):
    datamodule = ECGDataModule(str(ecg_data), str(tmp_path / "cache"))
    model = DenseAutoencoder(**datamodule.model_kwargs())
    trainer = one_process_trainer(max_epochs=20, limit_val_batches=0)
    trainer.fit(model, datamodule=datamodule)
    metrics = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    assert metrics["test/auroc"] > 0.9, metrics
    assert metrics["test/mse_normal"] < metrics["test/mse_anomalous"]


def test_auroc_ranks_scores_alike_whatever_batch_they_come_in():
    """Errors above 1 in one rank's batch and below 1 in another's must still be compared as errors."""
    from sklearn.metrics import roc_auc_score

    from lightning_xd.models.autoencoder import ScoreMetrics

    scores = ScoreMetrics()
    low = torch.tensor([0.1, 0.2, 0.5, 0.6])
    high = torch.tensor([0.3, 0.4, 2.0, 3.0])
    anomalous = torch.tensor([False, False, True, True])
    scores.update(low, anomalous)
    scores.update(high, anomalous)
    expected = roc_auc_score(torch.cat([anomalous, anomalous]).numpy(), torch.cat([low, high]).numpy())
    assert float(scores.auroc.compute()) == pytest.approx(expected)


def test_split_is_stratified_fixed_and_trains_on_normal_beats_only(ecg_data, tmp_path):
    def split(**options):
        return ready_datamodule(ECGDataModule, ecg_data, tmp_path, **options).datasets

    parts = split()
    classes = {name: dataset.tensors[1].numpy() for name, dataset in parts.items()}
    assert set(classes["train"]) == {1}
    for label, count in COUNTS.items():
        assert (classes["test"] == label).sum() == round(count * 0.3)
        assert (classes["val"] == label).sum() == round(count * 0.2)
    assert (classes["train"] == 1).sum() == COUNTS[1] - round(COUNTS[1] * 0.3) - round(COUNTS[1] * 0.2)
    beats = {name: {tuple(b) for b in dataset.tensors[0].numpy().round(5)} for name, dataset in parts.items()}
    assert not (beats["train"] & beats["val"]) and not (beats["train"] & beats["test"])
    assert not (beats["val"] & beats["test"])
    again, other_seed = split(), split(split_seed=1)
    assert np.array_equal(again["test"].tensors[0].numpy(), parts["test"].tensors[0].numpy())
    assert not np.array_equal(other_seed["test"].tensors[0].numpy(), parts["test"].tensors[0].numpy())


def _row(label: float, length: int = 140) -> str:
    return "".join(f"{v:15.7e}" for v in [label, *np.zeros(length)])


@pytest.mark.parametrize(
    "content, expected",
    [
        (None, "missing ECG5000_TRAIN.txt"),
        (_row(1) + "\n" + _row(2, 139) + "\n", "could not be read"),
        (_row(1, 100) + "\n", "has 101 columns"),
        (_row(1) + "\n" + _row(7) + "\n", "row 2 has class 7"),
        ("not numbers at all\n", "could not be read"),
    ],
)
def test_bad_beat_file_is_one_line(bad_file_error, content, expected):
    err = bad_file_error("autoencoder", "ecg/ecg5000/ECG5000_TRAIN.txt", content)
    assert expected in err and "ECG5000_TRAIN.txt" in err
