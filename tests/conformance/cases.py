"""The cases every strategy runs on the foreign modules, each a fresh Trainer and model: ``case_X(folder,
strategy)`` returns what this rank ended with (``conformance.harness.fit_summary`` and more).

STRATEGY names what the Trainer gets: ``mpi``, ``async`` and ``ddp`` (Lightning's DDPStrategy, as train.py
builds it) from our registry; ``ddp_find_unused`` (the same with ``find_unused_parameters=True``); or a name
Lightning's Trainer resolves itself after ``import lightning_xd`` (``mpi_by_name`` and ``async_by_name`` ->
``Trainer(strategy="mpi")`` / ``"async"``, ``mpi_find_unused_parameters_true``).
"""

from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel, ManualOptimBoringModel
from torch.utils.data import DataLoader

import lightning_xd  # noqa: F401  (registers our names with Lightning's StrategyRegistry)
import lightning_xd.strategies  # noqa: F401  (registers the names of our own registry)
from conformance.harness import QUIET, fit_summary, state_of, user_error_of
from conformance.models import (
    BoringStepSchedule,
    BoringWithBackbone,
    BoringWithUnused,
    ClassifierData,
    MetricClassifier,
    RecordTraining,
    SeedAtFirstBatch,
    TwoOptimizerGAN,
    backbone_finetuning,
    boring_loader,
    token_data,
    transformer,
)
from lightning_xd.launch.registry import STRATEGIES

BY_NAME = {
    "mpi_by_name": "mpi",
    "async_by_name": "async",
    "hybrid_by_name": "hybrid",
    "mpi_find_unused_parameters_true": "mpi_find_unused_parameters_true",
}
SETTINGS = {"async": {"staleness": 2}}  # a bound small enough to matter with two workers


def strategy_for(name: str):
    if name in BY_NAME:
        return BY_NAME[name]
    if name == "ddp_find_unused":
        ddp = STRATEGIES.build("ddp", {})
        ddp._ddp_kwargs["find_unused_parameters"] = True
        return ddp
    return STRATEGIES.build(name, dict(SETTINGS.get(name, {})))


def trainer_for(folder: Path, strategy: str, **settings) -> Trainer:
    return Trainer(strategy=strategy_for(strategy), default_root_dir=str(folder), **{**QUIET, **settings})


def fit_boring(folder, strategy, model_class=BoringModel, epochs=2, train=None, callbacks=(), **settings) -> dict:
    torch.manual_seed(0)
    model, record = model_class(), RecordTraining()
    trainer = trainer_for(folder, strategy, max_epochs=epochs, callbacks=[record, *callbacks], **settings)
    trainer.fit(model, train or boring_loader(), boring_loader(n=32, batch_size=8, seed=3))
    return fit_summary(trainer, model, record)


def case_boring_fit(folder, strategy):
    """BoringModel as it is: SGD and its StepLR stepped every epoch."""
    return fit_boring(folder, strategy)


def case_boring_manual(folder, strategy):
    return fit_boring(folder, strategy, ManualOptimBoringModel, epochs=1)


def case_step_schedule(folder, strategy):
    return fit_boring(folder, strategy, BoringStepSchedule, epochs=1)


def case_accumulate_clip(folder, strategy):
    return fit_boring(folder, strategy, epochs=1, accumulate_grad_batches=3, gradient_clip_val=0.05)


def case_drop_last(folder, strategy):
    return fit_boring(folder, strategy, train=boring_loader(n=70, batch_size=8, drop_last=True))


def case_unused(folder, strategy):
    return fit_boring(folder, strategy, BoringWithUnused, epochs=1)


def case_unfreeze(folder, strategy):
    return fit_boring(folder, strategy, BoringWithBackbone, callbacks=[backbone_finetuning()])


def fit_gan(folder, strategy, toggle: bool) -> dict:
    model, record = TwoOptimizerGAN(toggle=toggle), RecordTraining()
    trainer = trainer_for(folder, strategy, max_epochs=1, callbacks=[record])
    trainer.fit(model, boring_loader())
    return fit_summary(trainer, model, record)


def case_gan_toggled(folder, strategy):
    return fit_gan(folder, strategy, toggle=True)


def case_gan_untoggled(folder, strategy):
    return fit_gan(folder, strategy, toggle=False)


def fit_transformer(folder, strategy, **settings) -> dict:
    model, record = transformer(), RecordTraining()
    trainer = trainer_for(folder, strategy, max_epochs=1, callbacks=[record, SeedAtFirstBatch()], **settings)
    trainer.fit(model, DataLoader(token_data(), batch_size=4))
    return fit_summary(trainer, model, record)


def case_transformer(folder, strategy):
    return fit_transformer(folder, strategy)


def case_transformer_bf16(folder, strategy):
    return fit_transformer(folder, strategy, precision="bf16-mixed")


def case_classifier(folder, strategy, model_class=MetricClassifier):
    """Fit with per-epoch metrics, then validate, test and predict."""
    model, data, record = model_class(), ClassifierData(), RecordTraining()
    trainer = trainer_for(folder, strategy, max_epochs=2, callbacks=[record])
    trainer.fit(model, data)
    result = fit_summary(trainer, model, record)
    seen_in_fit = {stage: list(v) for stage, v in model.seen.items()}
    model.seen["val"].clear()
    validated = trainer.validate(model, data, verbose=False)[0]
    tested = trainer.test(model, data, verbose=False)[0]
    predicted = trainer.predict(model, data)
    return {
        **result,
        "seen_in_fit": seen_in_fit,
        "seen": model.seen,
        "train_counts": model.train_counts,
        "validated": validated,
        "tested": tested,
        "predicted": [(p["index"], p["probs"]) for p in predicted],
    }


def case_checkpoint_early_stopping(folder, strategy):
    """ModelCheckpoint(monitor) keeps the best epoch; EarlyStopping (no epoch can improve by 10) stops after two."""
    model, data, record = MetricClassifier(), ClassifierData(), RecordTraining()
    best = ModelCheckpoint(dirpath=folder / "checkpoints", monitor="val_loss", save_top_k=1, filename="{epoch}")
    stop = EarlyStopping(monitor="val_loss", patience=1, min_delta=10.0)
    epoch_states = []

    class StateAtEpochEnd(Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            epoch_states.append(state_of(pl_module))

    trainer = trainer_for(
        folder, strategy, max_epochs=5, callbacks=[record, StateAtEpochEnd(), best, stop], enable_checkpointing=True
    )
    trainer.fit(model, data)
    saved = torch.load(best.best_model_path, weights_only=False) if best.best_model_path else None
    return {
        **fit_summary(trainer, model, record),
        "best_model_path": best.best_model_path,
        "best_model_score": None if best.best_model_score is None else float(best.best_model_score),
        "stopped_epoch": stop.stopped_epoch,
        "epoch_states": epoch_states,
        "saved": None if saved is None else {"epoch": saved["epoch"], "state": saved["state_dict"]},
    }


def case_resume(folder, strategy):
    """Uninterrupted 2 epochs; and resumed with ``ckpt_path=`` from a checkpoint in the middle of epoch 0
    (ModelCheckpoint every 3 steps, the first run stopped at step 6 of 8) and from the end of epoch 0."""

    def fit(name, epochs, callbacks=(), ckpt_path=None, **settings):
        torch.manual_seed(0)
        model = BoringModel()
        trainer = trainer_for(folder / name, strategy, max_epochs=epochs, callbacks=list(callbacks), **settings)
        trainer.fit(model, boring_loader(shuffle=True), ckpt_path=ckpt_path)
        return fit_summary(trainer, model)

    whole = fit("whole", 2)
    every_3 = ModelCheckpoint(dirpath=folder / "steps", every_n_train_steps=3, save_top_k=-1, filename="{step}")
    fit("first", 2, [every_3], max_steps=6, enable_checkpointing=True)
    per_epoch = ModelCheckpoint(dirpath=folder / "epochs", save_top_k=-1, filename="{epoch}")
    fit("one_epoch", 1, [per_epoch], enable_checkpointing=True)
    return {
        "whole": whole,
        "mid_epoch": fit("mid", 2, ckpt_path=folder / "steps" / "step=6.ckpt"),
        "epoch_end": fit("end", 2, ckpt_path=folder / "epochs" / "epoch=0.ckpt"),
    }


def case_sync_batchnorm(folder, strategy):
    model, record = MetricClassifier(), RecordTraining()
    trainer = trainer_for(folder, strategy, max_epochs=1, callbacks=[record], sync_batchnorm=True, limit_val_batches=0)
    trainer.fit(model, ClassifierData(shuffle=False))
    return fit_summary(trainer, model, record)


def case_trainer_settings(folder, strategy):
    """What the Trainer is told about the job must be the job: ``devices`` / ``num_nodes`` that disagree are
    one line on every rank (and the ranks stay in step for the next fit); ``devices`` equal to the job's
    processes on this host trains; ``fault_tolerance="ulfm"`` in a job started without ULFM says it is off."""
    import warnings

    refused = {
        name: user_error_of(
            lambda: trainer_for(folder / name, strategy, max_epochs=1, **settings).fit(BoringModel(), boring_loader())  # noqa: B023 (called at once, inside the loop)
        )
        for name, settings in {"devices=3": {"devices": 3}, "num_nodes=2": {"num_nodes": 2}}.items()
    }
    matching = trainer_for(folder / "devices=2", strategy, max_epochs=1, devices=2)
    matching.fit(BoringModel(), boring_loader())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ulfm = Trainer(
            strategy=STRATEGIES.build(strategy, {"fault_tolerance": "ulfm"}),
            default_root_dir=str(folder / "ulfm"),
            max_epochs=1,
            **QUIET,
        )
        ulfm.fit(BoringModel(), boring_loader())
    return {
        "refused": refused,
        "matching_steps": matching.global_step,
        "ulfm_steps": ulfm.global_step,
        "warnings": [str(w.message) for w in caught],
    }


CASES = {name[len("case_") :]: f for name, f in dict(globals()).items() if name.startswith("case_")}
