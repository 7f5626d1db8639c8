"""The ``hybrid`` strategy with modules nobody here wrote.

A pipeline needs a model cut into stages; Lightning's demo models and the classifier as they are cannot
be, and must be refused in one line naming what is missing, on every rank. With the three methods a user
adds (``conformance.models.PipelinedClassifier``), the classifier trained on one pipeline of two stages
with one micro-batch per batch is one process training it on the same batches: same parameters and
BatchNorm statistics after two epochs, validation metrics equal to their global values, predictions
equal to the model's outputs.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch

from conformance.jobs import launch
from conformance.test_mpi import assert_states_equal, refused_alike


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return launch(tmp_path_factory, "hybrid_job.py", 2, ["refusals/hybrid_by_name", "pipelined/hybrid"], timeout=120)


@cache
def one_process(threads: int) -> dict:
    from reference_training import in_step_order

    from conformance.models import BATCH, ClassifierData, PipelinedClassifier
    from conformance.references import fit_and_summarise

    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return fit_and_summarise(PipelinedClassifier, in_step_order(ClassifierData().sets["train"], 1, BATCH), epochs=2)
    finally:
        torch.set_num_threads(own)


def test_foreign_modules_are_refused_in_one_line_naming_what_is_missing(job):
    ranks = job.ok("refusals", "hybrid_by_name")
    for name in ranks[0]["messages"]:
        message = refused_alike(ranks, "messages", name)
        assert "cannot be split into pipeline stages" in message, message
        assert "pipeline_blocks" in message and "--strategy mpi" in message, message


def test_a_pipelined_classifier_trains_as_one_process(job):
    ranks = job.ok("pipelined", "hybrid")
    reference = one_process(ranks[0]["threads"])
    for rank, result in enumerate(ranks):
        assert_states_equal(result["state"], reference["state"], f"rank {rank} vs one process", 1e-5)
        assert (result["global_step"], result["current_epoch"]) == (32, 2), f"rank {rank}"


def test_validation_metrics_and_predictions_are_the_whole_models(job):
    from conformance.models import ClassifierData, PipelinedClassifier, global_metrics

    ranks = job.ok("pipelined", "hybrid")
    model = PipelinedClassifier()
    model.load_state_dict(ranks[0]["state"])
    data = ClassifierData().sets
    want = global_metrics(model.eval(), data["val"])
    with torch.no_grad():
        logits = model(data["predict"].tensors[0])
    for rank, result in enumerate(ranks):
        assert result["validated"]["val_loss"] == pytest.approx(want["loss"], abs=1e-5), f"rank {rank}"
        assert result["validated"]["val_acc"] == pytest.approx(want["acc"], abs=1e-6), f"rank {rank}"
        assert torch.allclose(result["predicted"], logits, atol=1e-5), f"rank {rank}: predictions"
