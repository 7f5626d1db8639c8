"""One-process references, run in the pytest process with Lightning's own single-device training.

The trainer and the step order are ``reference_training``'s (tests/reference_training.py); here, which
reference each case has.

``union``: what two ranks of a synchronous strategy must end with: one process trained on the union of each
step's batches (the mean loss over the union is the mean of the ranks' equal-sized means, and a BatchNorm
on the union is what sync_batchnorm must compute).

``one_worker``: the async strategy with one worker is one process reading the whole training set in the
order of a one-replica ``DistributedSampler``, the server applying each of its gradients in turn.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import reference_training
import torch
from reference_training import in_step_order
from torch.utils.data import DataLoader

from conformance.harness import fit_summary
from conformance.models import BATCH, RecordTraining, SeedAtFirstBatch, boring_data, token_data, transformer


def fit_and_summarise(
    make_model: Callable, train: DataLoader, epochs: int = 1, callbacks: tuple = (), **settings
) -> dict:
    """``reference_training.fit_one_process``, summarised as the MPI jobs summarise their fits."""
    record = RecordTraining()
    trainer, model = reference_training.fit_one_process(
        make_model, train, epochs=epochs, callbacks=(record, *callbacks), **settings
    )
    return fit_summary(trainer, model, record)


@cache
def union(name: str) -> dict:
    """The ``mpi`` cases whose expected result is one process on the union of both ranks' batches."""
    from conformance.models import (
        BoringWithBackbone,
        ClassifierData,
        MetricClassifier,
        TwoOptimizerGAN,
        backbone_finetuning,
    )

    if name == "unfreeze":
        return fit_and_summarise(
            BoringWithBackbone, in_step_order(boring_data(), 2, BATCH), epochs=2, callbacks=(backbone_finetuning(),)
        )
    if name in ("gan_toggled", "gan_untoggled"):
        return fit_and_summarise(
            lambda: TwoOptimizerGAN(toggle=name == "gan_toggled"), in_step_order(boring_data(), 2, BATCH)
        )
    if name == "sync_batchnorm":
        return fit_and_summarise(MetricClassifier, in_step_order(ClassifierData().sets["train"], 2, BATCH))
    raise ValueError(name)


@cache
def one_worker(name: str, threads: int) -> dict:
    """The async cases on one worker: one process on the whole training set, in order, batches of BATCH,
    computed with the worker's number of threads (another splits sums differently: the transformer then
    drifts by 1e-4 in 8 steps)."""
    own = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _one_worker(name)
    finally:
        torch.set_num_threads(own)


def _one_worker(name: str) -> dict:
    from lightning.pytorch.demos.boring_classes import BoringModel

    from conformance.models import (
        BoringStepSchedule,
        BoringWithBackbone,
        BoringWithUnused,
        ClassifierData,
        MetricClassifier,
        TwoOptimizerGAN,
        backbone_finetuning,
    )

    boring = in_step_order(boring_data(), 1, BATCH)
    if name == "boring_fit":
        return fit_and_summarise(BoringModel, boring, epochs=2)
    if name == "step_schedule":
        return fit_and_summarise(BoringStepSchedule, boring)
    if name == "accumulate_clip":
        return fit_and_summarise(BoringModel, boring, accumulate_grad_batches=3, gradient_clip_val=0.05)
    if name == "drop_last":
        return fit_and_summarise(BoringModel, in_step_order(boring_data(70), 1, 8, drop_last=True), epochs=2)
    if name == "unused":
        return fit_and_summarise(BoringWithUnused, boring)
    if name == "unfreeze":
        return fit_and_summarise(BoringWithBackbone, boring, epochs=2, callbacks=(backbone_finetuning(),))
    if name == "gan_toggled":
        return fit_and_summarise(lambda: TwoOptimizerGAN(toggle=True), boring)
    if name == "classifier":
        return fit_and_summarise(MetricClassifier, in_step_order(ClassifierData().sets["train"], 1, BATCH), epochs=2)
    if name in ("transformer", "transformer_bf16"):
        settings = {"precision": "bf16-mixed"} if name == "transformer_bf16" else {}
        return fit_and_summarise(
            transformer, in_step_order(token_data(), 1, BATCH), callbacks=(SeedAtFirstBatch(),), **settings
        )
    raise ValueError(name)


def boring_rows() -> torch.Tensor:
    return boring_data().data
