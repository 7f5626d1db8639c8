"""Lightning features under the hybrid strategy (2 pipeline stages x 2 replicas); saves what every rank saw.

usage: train_hybrid_features.py --out DIR --cases CASE [CASE ...]
Each CASE builds a fresh strategy, Trainer and model and saves OUT_DIR/<case>/rank<r>.pt; a case that
raises saves {"error": traceback} instead and the next case still runs (the test shows the error).
- main: built under ``trainer.init_module()``, batches of 7 (micro-batches of unequal sizes, a last
  batch of 2 with fewer micro-batches than asked), 1f1b, a StepLR schedule, the module's and a
  callback's backward hooks recorded; then validate, test and predict;
- clip: ``gradient_clip_val`` small enough to clip every step (gpipe);
- bf16: ``precision="bf16-mixed"``; the stages record whether autocast was on and their output dtype;
- amp16: 16-mixed with an explicit CPU GradScaler, one step's gradient made inf on one rank only;
- resume: ModelCheckpoint + EarlyStopping on val/loss, a StepLR; 3 epochs in one run, and 1 epoch,
  a checkpoint, then 2 more epochs from it (``ckpt_path=``);
- memory: a wider model built under ``trainer.init_module()``: allocated bytes from its construction
  to the end of the strategy's set-up, which parameters have real storage;
- refusals: what the strategy cannot do is one line (accumulation, manual optimization).
"""

import traceback
from pathlib import Path

import torch
from conformance.harness import job_arguments
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.plugins.precision import MixedPrecision
from tiny_models import TinyData, TinyPipelined, _Block
from torch import nn
from torch.optim.lr_scheduler import StepLR
from torch.profiler import ProfilerActivity, profile
from torch.utils.data import DataLoader

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.comm.communicator import world
from lightning_xd.launch.registry import STRATEGIES

STAGES, MICROBATCHES = 2, 4
CLIP = 0.02
POISON_STEP = 1  # amp16: the step whose gradient is made inf on rank 0 only
INIT_SCALE = 2.0**8  # amp16: small enough that no gradient overflows but the poisoned one
WIDE = 256  # memory: hidden width of the wider model


def own_grad_sumsq(module) -> "float | None":
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return sum(float(g.double().pow(2).sum()) for g in grads) if grads else None


class HookedPipelined(TinyPipelined):
    """TinyPipelined that records Lightning's backward hooks and halves its learning rate every 2 steps."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def test_step(self, batch, batch_idx):
        self.pipeline_loss(self(batch[0]), batch, "test")

    def on_before_backward(self, loss):
        self.calls.append(("module", "before", self.trainer.global_step, float(loss), own_grad_sumsq(self)))

    def on_after_backward(self):
        self.calls.append(("module", "after", self.trainer.global_step, None, own_grad_sumsq(self)))

    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": StepLR(optimizer, 2, 0.5), "interval": "step"}}


class ScheduledPipelined(TinyPipelined):
    def configure_optimizers(self):
        optimizer = super().configure_optimizers()
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": StepLR(optimizer, 2, 0.5), "interval": "step"}}


class PoisonedPipelined(TinyPipelined):
    """Makes one step's gradient inf on global rank 0 only, after backward (the others see finite ones)."""

    def on_after_backward(self):
        if self.trainer.global_step == POISON_STEP and self.trainer.global_rank == 0:
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.fill_(float("inf"))
                    break


class ManualPipelined(TinyPipelined):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False


class WidePipelined(TinyPipelined):
    """Ten stages of width 256: no parameter holds more than an eighth of the model."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.stages = nn.ModuleList(
            [_Block(4, WIDE), *[_Block(WIDE, WIDE) for _ in range(8)], _Block(WIDE, 1, last=True)]
        )


class FeatureData(TinyData):
    """TinyData whose samples carry their index; tests on the validation set; predicts it in batches of 3."""

    def __init__(self, batch_size: int):
        super().__init__(batch_size, with_index=True)

    def test_dataloader(self):
        return self.val_dataloader()

    def predict_dataloader(self):
        return DataLoader(self.val_set, batch_size=3)


class HookRecorder(Callback):
    def __init__(self):
        self.calls = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.calls.append(("callback", "before", trainer.global_step, float(loss), own_grad_sumsq(pl_module)))

    def on_after_backward(self, trainer, pl_module):
        self.calls.append(("callback", "after", trainer.global_step, None, own_grad_sumsq(pl_module)))


class AtFitStart(Callback):
    """Which parameters have real storage, and this stage's values, once the strategy is set up."""

    def __init__(self, strategy):
        self.strategy, self.meta, self.initial = strategy, None, None

    def on_fit_start(self, trainer, pl_module):
        self.meta = {name: p.is_meta for name, p in pl_module.named_parameters()}
        self.initial = {
            k: v.detach().clone() for k, v in pl_module.state_dict().items() if k in self.strategy.own_state_keys
        }


class Predicted(Callback):
    def __init__(self):
        self.indices = []

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        self.indices.append(batch[3].tolist())


class EveryEpoch(Callback):
    def __init__(self):
        self.val_losses, self.lrs = [], []

    def on_validation_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.val_losses.append(float(trainer.callback_metrics["val/loss"]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


class Scales(Callback):
    def __init__(self):
        self.scales = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


def hybrid(schedule: str):
    return STRATEGIES.build("hybrid", {"pipeline_stages": STAGES, "microbatches": MICROBATCHES, "schedule": schedule})


def trainer_for(out: Path, strategy, **kwargs) -> Trainer:
    settings = dict(
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    return Trainer(strategy=strategy, **{**settings, **kwargs})


def own_state(model, strategy) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k in strategy.own_state_keys}


def attempt(run):
    """(what ``run()`` returned, None), or (None, its traceback): what went before is saved all the same."""
    try:
        return run(), None
    except Exception:  # noqa: BLE001  (shown by the test)
        return None, traceback.format_exc()


def case_main(out: Path) -> dict:
    strategy = hybrid("1f1b")
    recorder, start, predicted = HookRecorder(), AtFitStart(strategy), Predicted()
    trainer = trainer_for(out, strategy, callbacks=[recorder, start, predicted])
    with trainer.init_module():
        model = HookedPipelined()
    data = FeatureData(batch_size=7)
    trainer.fit(model, data)
    validated = trainer.validate(model, data, verbose=False)[0]
    tested = trainer.test(model, data, verbose=False)[0]
    predictions, predict_error = attempt(lambda: trainer.predict(model, data))
    return {
        "own": own_state(model, strategy),
        "stage_keys": strategy.own_state_keys,
        "steps": trainer.global_step,
        "meta_at_start": start.meta,
        "initial": start.initial,
        "hooks": model.calls + recorder.calls,
        "val": validated,
        "test": tested,
        "predict_error": predict_error,
        "predictions": [p.detach().float() for p in predictions or []],
        "predicted_indices": predicted.indices,
    }


def case_clip(out: Path) -> dict:
    strategy = hybrid("gpipe")
    trainer = trainer_for(out, strategy, gradient_clip_val=CLIP)
    model = TinyPipelined()
    trainer.fit(model, FeatureData(batch_size=8))
    return {"own": own_state(model, strategy), "stage_keys": strategy.own_state_keys}


def case_bf16(out: Path) -> dict:
    strategy = hybrid("1f1b")
    trainer = trainer_for(out, strategy, precision="bf16-mixed")
    model = TinyPipelined()
    seen = []
    for stage in model.stages:
        stage.register_forward_hook(
            lambda m, args, output: seen.append(
                (trainer.state.stage.value, torch.is_autocast_enabled("cpu"), str(output.dtype))
            )
        )
    data = FeatureData(batch_size=8)
    trainer.fit(model, data)
    trainer.validate(model, data, verbose=False)
    predictions, predict_error = attempt(lambda: trainer.predict(model, data))
    return {
        "own": own_state(model, strategy),
        "stage_keys": strategy.own_state_keys,
        "forwards": sorted(set(seen)),
        "predict_error": predict_error,
        "prediction_dtypes": sorted({str(p.dtype) for p in predictions or []}),
    }


def case_amp16(out: Path) -> dict:
    strategy = hybrid("gpipe")
    scales = Scales()
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=INIT_SCALE))
    trainer = trainer_for(out, strategy, plugins=[plugin], callbacks=[scales])
    model = PoisonedPipelined()
    trainer.fit(model, FeatureData(batch_size=8))
    return {"own": own_state(model, strategy), "stage_keys": strategy.own_state_keys, "scales": scales.scales}


def _fit_resumable(out: Path, name: str, epochs: int, ckpt_path=None):
    strategy = hybrid("gpipe")
    best = ModelCheckpoint(dirpath=out / name, monitor="val/loss", mode="min", save_top_k=1)
    stop, every_epoch = EarlyStopping(monitor="val/loss", mode="min", patience=5), EveryEpoch()
    trainer = trainer_for(
        out, strategy, max_epochs=epochs, callbacks=[best, stop, every_epoch], enable_checkpointing=True
    )
    with trainer.init_module():
        model = ScheduledPipelined()
    trainer.fit(model, FeatureData(batch_size=8), ckpt_path=ckpt_path)
    return trainer, strategy, model, best, stop, every_epoch


def case_resume(out: Path) -> dict:
    trainer, strategy, model, best, stop, every_epoch = _fit_resumable(out, "whole", 3)
    whole = {
        "own": own_state(model, strategy),
        "val_losses": every_epoch.val_losses,
        "lrs": every_epoch.lrs,
        "best_score": float(best.best_model_score),
        "best_path_exists": Path(best.best_model_path).is_file(),
        "stop_best": float(stop.best_score),
        "stop_wait": stop.wait_count,
        "steps": trainer.global_step,
    }
    trainer, *_ = _fit_resumable(out, "first", 1)
    trainer.save_checkpoint(out / "after_epoch_1.ckpt")
    trainer, strategy, model, best, stop, every_epoch = _fit_resumable(out, "rest", 3, out / "after_epoch_1.ckpt")
    return {
        "stage_keys": strategy.own_state_keys,
        "whole": whole,
        "resumed": own_state(model, strategy),
        "resumed_lrs": every_epoch.lrs,
        "resumed_steps": trainer.global_step,
    }


def _peak_and_held(prof) -> tuple[int, int]:
    """The most CPU memory allocated and not yet freed at any moment of the profile, and at its end."""
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    held = peak = 0
    for event in events:
        held += event.self_cpu_memory_usage
        peak = max(peak, held)
    return peak, held


def case_memory(out: Path) -> dict:
    strategy = hybrid("gpipe")
    prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)

    class StopAfterSetup(Callback):
        def on_validation_start(self, trainer, pl_module):
            prof.stop()
            self.real = {name: (not p.is_meta and p.numel() > 0) for name, p in pl_module.named_parameters()}

    stopper = StopAfterSetup()
    trainer = trainer_for(out, strategy, callbacks=[stopper], limit_val_batches=1)
    prof.start()
    with trainer.init_module():
        model = WidePipelined()
    trainer.validate(model, DataLoader(TinyData(8).val_set, batch_size=3), verbose=False)
    peak, held = _peak_and_held(prof)
    whole = WidePipelined()
    return {
        "peak_bytes": peak,
        "held_bytes": held,
        "real": stopper.real,
        "stage_keys": strategy.own_state_keys,
        "param_bytes": {n: p.numel() * p.element_size() for n, p in whole.named_parameters()},
        "own_equal_whole": {
            k: bool(torch.equal(v, whole.state_dict()[k])) for k, v in own_state(model, strategy).items()
        },
    }


def case_refusals(out: Path) -> dict:
    messages = {}
    for name, model, kwargs in [
        ("accumulate", TinyPipelined(), {"accumulate_grad_batches": 2}),
        ("manual", ManualPipelined(), {}),
    ]:
        trainer = trainer_for(out / name, hybrid("gpipe"), **kwargs)
        try:
            trainer.fit(model, FeatureData(batch_size=8))
            messages[name] = None
        except Exception as err:  # noqa: BLE001  (the message is what the test checks)
            messages[name] = f"{type(err).__name__}: {err}"
    return {"messages": messages}


CASES = {
    "main": case_main,
    "clip": case_clip,
    "bf16": case_bf16,
    "amp16": case_amp16,
    "resume": case_resume,
    "memory": case_memory,
    "refusals": case_refusals,
}

if __name__ == "__main__":
    args = job_arguments(__doc__)
    root = args.out
    rank = world().rank
    for case in args.cases:
        out = root / case
        try:
            result = CASES[case](out)
        except Exception:  # noqa: BLE001  (saved for the test to show; the next case still runs)
            result = {"error": traceback.format_exc()}
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / f"rank{rank}.pt")
        world().barrier()
