"""The ``hybrid`` strategy's cases, in one MPI job of 2 ranks (one pipeline of 2 stages).

usage: hybrid_job.py --out DIR --cases CASE/STRATEGY [CASE/STRATEGY ...]
- refusals: Lightning's BoringModel and Transformer LM and the torchmetrics classifier as they are, under
  ``Trainer(strategy="hybrid")``: none can be cut into stages, each fit must end in one line naming what
  is missing, on every rank;
- pipelined: the classifier with the three pipeline methods a user adds (``PipelinedClassifier``), one
  micro-batch per batch: fit 2 epochs, validate, predict; the whole model gathered from the stages.
"""

import torch
from lightning.pytorch import Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from torch.utils.data import DataLoader

import lightning_xd  # noqa: F401  (registers our names with Lightning's StrategyRegistry)
import lightning_xd.strategies  # noqa: F401
from conformance.cases import trainer_for
from conformance.harness import QUIET, job_arguments, run, user_error_of
from conformance.models import (
    ClassifierData,
    MetricClassifier,
    PipelinedClassifier,
    boring_loader,
    token_data,
    transformer,
)
from lightning_xd.launch.registry import STRATEGIES


def case_refusals(folder, strategy):
    fits = {
        "BoringModel": (BoringModel, boring_loader),
        "LightningTransformer": (transformer, lambda: DataLoader(token_data(), batch_size=4)),
        "MetricClassifier": (MetricClassifier, ClassifierData),
    }
    return {
        "messages": {
            name: user_error_of(
                lambda: trainer_for(folder / name, strategy, max_epochs=1).fit(make_model(), make_data())  # noqa: B023 (called at once, inside the loop)
            )
            for name, (make_model, make_data) in fits.items()
        }
    }


def case_pipelined(folder, strategy):
    model, data = PipelinedClassifier(), ClassifierData()
    trainer = Trainer(
        strategy=STRATEGIES.build("hybrid", {"pipeline_stages": 2, "microbatches": 1}),
        default_root_dir=str(folder),
        max_epochs=2,
        **QUIET,
    )
    trainer.fit(model, data)
    whole = {k: v.detach().cpu().clone() for k, v in trainer.strategy.lightning_module_state_dict().items()}
    fitted = {
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items()},
    }
    validated = trainer.validate(model, data, verbose=False)[0]
    predicted = torch.cat(trainer.predict(model, data))
    return {
        "state": whole,
        **fitted,
        "validated": validated,
        "predicted": predicted,
        "threads": torch.get_num_threads(),
    }


if __name__ == "__main__":
    args = job_arguments(__doc__)
    run(args.out, {"refusals": case_refusals, "pipelined": case_pipelined}, args.cases)
