"""The ``async`` strategy's cases, in one MPI job of 2 ranks (the server and one worker: deterministic, compared
with one process by the tests) or 3 ranks (the server and two workers: checked for the strategy's invariants).

usage: async_job.py --out DIR --cases CASE/STRATEGY [CASE/STRATEGY ...]
The cases of conformance.cases, and the async strategy's own:
- refusals: what needs validation during training (EarlyStopping, ModelCheckpoint(monitor=...),
  ReduceLROnPlateau, val_check_interval) on the classifier: each fit must end in the same one-line error on
  every rank and leave the ranks in step for the next fit;
- straggler: the classifier for 2 epochs while rank 2 is 20 ms slower per batch, then validate, test, predict.
"""

import time

from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from tiny_models import on_plateau

from conformance.cases import CASES, case_classifier, trainer_for
from conformance.harness import job_arguments, run, user_error_of
from conformance.models import ClassifierData, MetricClassifier

PlateauClassifier = on_plateau(MetricClassifier, "val_loss")


class SlowOnRank2(MetricClassifier):
    def on_train_batch_start(self, batch, batch_idx):
        if self.trainer.global_rank == 2:
            time.sleep(0.02)


def case_refusals(folder, strategy):
    fits = {
        "EarlyStopping": (MetricClassifier, {"callbacks": [EarlyStopping(monitor="val_loss")]}),
        "ModelCheckpoint": (
            MetricClassifier,
            {"callbacks": [ModelCheckpoint(monitor="val_loss")], "enable_checkpointing": True},
        ),
        "ReduceLROnPlateau": (PlateauClassifier, {}),
        "val_check_interval": (MetricClassifier, {"val_check_interval": 0.5}),
    }
    return {
        "messages": {
            name: user_error_of(
                lambda: trainer_for(folder / name, strategy, max_epochs=1, **settings).fit(  # noqa: B023 (called at once)
                    model_class(),  # noqa: B023 (called at once, inside the loop)
                    ClassifierData(),
                )
            )
            for name, (model_class, settings) in fits.items()
        }
    }


def case_straggler(folder, strategy):
    return case_classifier(folder, strategy, SlowOnRank2)


if __name__ == "__main__":
    args = job_arguments(__doc__)
    run(args.out, {**CASES, "refusals": case_refusals, "straggler": case_straggler}, args.cases)
