"""Lightning features under the async strategy; saves what every rank saw.

usage: train_async_features.py --out DIR --cases CASE [CASE ...]
Each CASE trains with a fresh strategy and Trainer and saves OUT_DIR/<case>/rank<r>.pt. The cases run
one after the other in one MPI job: a refused fit must leave every rank ready for the next one.
- on 2 ranks (one worker, compared step by step with one process by the test): accumulate, clip,
  amp16 (16-mixed with a GradScaler, one step poisoned with inf), bf16;
- on 3 ranks: refusals, boring (Lightning's BoringModel: fit, validate, test, predict), onecycle
  (a OneCycleLR sized by ``estimated_stepping_batches``), accumulate_two_workers, worker_stops (one
  worker sets ``trainer.should_stop`` on its own).
The test imports this file for the model and the one-process reference (``reference_run``).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from conformance.harness import job_arguments
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.plugins.precision import MixedPrecision
from reference_training import StateAfterEachBatch, fit_one_process, in_step_order
from tiny_models import TinyData, on_plateau
from torch import nn

EPOCHS = 2


class DenseRegressor(LightningModule):
    """A small MLP that records which samples it trained on and in which dtype its forward ran."""

    def __init__(self, lr: float = 0.1, poison_call: int = -1):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
        self.lr, self.poison_call = lr, poison_call
        self.seen: list[int] = []
        self.output_dtypes: set[str] = set()
        self.calls = 0

    def training_step(self, batch, batch_idx):
        x, _, y, index = batch
        out = self.net(x)
        self.output_dtypes.add(str(out.dtype))
        self.seen.extend(index.tolist())
        loss = F.mse_loss(out.float(), y)
        if self.calls == self.poison_call:  # inf/nan gradients: the GradScaler skips this step
            loss = loss * float("inf")
        self.calls += 1
        return loss

    def validation_step(self, batch, batch_idx):
        x, _, y, _ = batch
        self.log("val/loss", F.mse_loss(self.net(x).float(), y), sync_dist=True, batch_size=len(y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.5)


PlateauRegressor = on_plateau(DenseRegressor, "val/loss")


class StopsOnItsOwn(DenseRegressor):
    """Rank 2 stops its own training after three batches, as a Timer or a module may."""

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.trainer.global_rank == 2 and batch_idx == 2:
            self.trainer.should_stop = True


class OneCycleBoring(BoringModel):
    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        self.total_steps = self.trainer.estimated_stepping_batches
        schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.1, total_steps=self.total_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class Record(StateAfterEachBatch):
    """Parameters after every training batch, the GradScaler's scale, and the batches of each stage."""

    def __init__(self):
        super().__init__()
        self.scales = []
        self.batches = {"train": 0, "val": 0, "test": 0, "predict": 0}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self.scales.append(scaler.get_scale() if scaler is not None else None)
        self.batches["train"] += 1

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches["val"] += 1

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches["test"] += 1

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.batches["predict"] += 1


def one_worker_case(name: str) -> tuple[dict, dict]:
    """(Trainer settings, model settings) of a case compared with one process; plugins are new each time."""
    if name == "plain":
        return {"max_epochs": EPOCHS}, {}
    if name == "accumulate":
        return {"max_epochs": EPOCHS, "accumulate_grad_batches": 3}, {}
    if name == "clip":
        return {"max_epochs": EPOCHS, "gradient_clip_val": 0.05}, {}
    if name == "amp16":  # on CPU Lightning turns precision="16-mixed" into bf16: the scaler path needs the plugin
        plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
        return {"max_epochs": EPOCHS, "plugins": [plugin]}, {"poison_call": 3}
    if name == "bf16":
        return {"max_epochs": 1, "precision": "bf16-mixed"}, {}
    raise ValueError(name)


QUIET = dict(
    accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0
)


def result_of(trainer, model, record) -> dict:
    return {
        "snapshots": record.snapshots,
        "scales": record.scales,
        "batches": dict(record.batches),
        "seen": list(model.seen) if hasattr(model, "seen") else None,
        "output_dtypes": sorted(getattr(model, "output_dtypes", [])),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "global_step": trainer.global_step,
    }


def reference_run(name: str, root: str) -> dict:
    """The same case in one process with Lightning's own single-device training, on the one worker's batches
    in its order (Lightning's shuffling DistributedSampler over one replica)."""
    settings, model_settings = one_worker_case(name)
    record = Record()
    train = in_step_order(TinyData(with_index=True).train_set, replicas=1, batch_size=4)
    trainer, model = fit_one_process(
        lambda: DenseRegressor(**model_settings), train, callbacks=[record], default_root_dir=root, **settings
    )
    return result_of(trainer, model, record)


def async_strategy():
    from lightning_xd.launch.registry import STRATEGIES

    return STRATEGIES.build("async", {"staleness": 4})


def run_one_worker(name: str, out: Path) -> dict:
    settings, model_settings = one_worker_case(name)
    strategy, model, record = async_strategy(), DenseRegressor(**model_settings), Record()
    trainer = Trainer(
        strategy=strategy,
        callbacks=[record],
        enable_checkpointing=False,
        default_root_dir=str(out),
        **QUIET,
        **settings,
    )
    trainer.fit(model, TinyData(with_index=True))
    return {**result_of(trainer, model, record), "summary": strategy.summary_metrics()}


def run_refusals(out: Path) -> dict:
    """Each fit must raise the same one-line UserError on every rank, and leave the ranks in step."""
    from lightning_xd.errors import UserError

    cases = {
        "EarlyStopping": (DenseRegressor, {"callbacks": [EarlyStopping(monitor="val/loss")]}),
        "ModelCheckpoint": (DenseRegressor, {"callbacks": [ModelCheckpoint(monitor="val/loss")]}),
        "ReduceLROnPlateau": (PlateauRegressor, {}),
        "val_check_interval": (DenseRegressor, {"val_check_interval": 0.5}),
        "val_check_interval_batches": (DenseRegressor, {"val_check_interval": 2}),
    }
    messages = {}
    for name, (model_class, settings) in cases.items():
        trainer = Trainer(
            strategy=async_strategy(), max_epochs=1, default_root_dir=str(out / name), **QUIET, **settings
        )
        try:
            trainer.fit(model_class(), TinyData(with_index=True))
            messages[name] = None
        except UserError as err:
            messages[name] = str(err)
    return {"messages": messages}


def run_boring(out: Path, model: BoringModel, **settings) -> dict:
    strategy, record = async_strategy(), Record()
    trainer = Trainer(
        strategy=strategy, max_epochs=EPOCHS, callbacks=[record], default_root_dir=str(out), **QUIET, **settings
    )
    trainer.fit(model)
    fitted = {
        "lr": trainer.optimizers[0].param_groups[0]["lr"],
        "scheduler_steps": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
        "total_steps": getattr(model, "total_steps", None),
        "summary": strategy.summary_metrics(),
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "train_batches": record.batches["train"],
        "global_step": trainer.global_step,
        "current_epoch": trainer.current_epoch,
    }
    checkpoint = trainer.checkpoint_callback
    if checkpoint is not None and checkpoint.best_model_path:  # Lightning's default ModelCheckpoint
        saved = torch.load(checkpoint.best_model_path, weights_only=False)
        fitted["best_model_path"] = checkpoint.best_model_path
        fitted["best_checkpoint"] = {"global_step": saved["global_step"], "state_dict": saved["state_dict"]}
    validated = trainer.validate(model, verbose=False)
    tested = trainer.test(model, verbose=False)
    predicted = trainer.predict(model)
    return {
        **fitted,
        "validated": validated,
        "tested": tested,
        "predictions": len(predicted),
        "batches": dict(record.batches),
    }


def run_case(name: str, out: Path) -> dict:
    if name in ("accumulate", "clip", "amp16", "bf16"):
        return run_one_worker(name, out)
    if name == "refusals":
        return run_refusals(out)
    if name == "boring":
        return run_boring(out, BoringModel())
    if name == "onecycle":
        return run_boring(out, OneCycleBoring(), accumulate_grad_batches=2, enable_checkpointing=False)
    if name in ("accumulate_two_workers", "worker_stops"):
        strategy, record = async_strategy(), Record()
        model = DenseRegressor() if name == "accumulate_two_workers" else StopsOnItsOwn()
        settings = (
            {"accumulate_grad_batches": 2, "max_epochs": EPOCHS}
            if name == "accumulate_two_workers"
            else {"max_epochs": 5}
        )
        trainer = Trainer(
            strategy=strategy,
            callbacks=[record],
            enable_checkpointing=False,
            default_root_dir=str(out),
            **QUIET,
            **settings,
        )
        trainer.fit(model, TinyData(with_index=True))
        return {**result_of(trainer, model, record), "summary": strategy.summary_metrics(), "snapshots": None}
    raise ValueError(f"unknown case {name}")


def main(out: Path, cases: list[str]) -> None:
    import lightning_xd.strategies  # noqa: F401  (registers the names)
    from lightning_xd.comm.communicator import world

    for name in cases:
        result = run_case(name, out / name)
        (out / name).mkdir(parents=True, exist_ok=True)
        torch.save(result, out / name / f"rank{world().rank}.pt")
        print(f"rank {world().rank}: case {name} done", flush=True)


if __name__ == "__main__":
    args = job_arguments(__doc__)
    main(args.out, args.cases)
