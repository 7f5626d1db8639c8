"""The modules of the conformance suite and their data, shared by the MPI jobs and the references in pytest.

Lightning's demo models are used as they are; where a feature needs something they lack (a backbone to
unfreeze, an unused layer, a step-interval schedule) a subclass adds only that. ``MetricClassifier`` and
``TwoOptimizerGAN`` are written the way a Lightning user writes them, knowing nothing of our strategies.

Every dataset is drawn from its own seeded generator, so every rank and the one-process references hold
the same samples whatever the global RNG has done before.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from lightning.pytorch.demos.transformer import LightningTransformer
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torchmetrics import Accuracy, MeanSquaredError

BORING_SAMPLES, BATCH = 64, 4  # two ranks: 32 samples, 8 steps an epoch each
VOCAB, SEQUENCE, TOKEN_SAMPLES = 16, 8, 32
CLASSES, FEATURES = 3, 32
TRAIN, VAL, TEST, PREDICT = 64, 60, 60, 49  # 60 splits evenly over 2 and 3 ranks; 49 over neither


def seeded(seed: int, make):
    """``make()`` under its own seed, leaving the global RNG as it was."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return make()


def boring_data(n: int = BORING_SAMPLES, seed: int = 1) -> RandomDataset:
    """BoringModel's own dataset (32-dim random vectors), the same on every process."""
    return seeded(seed, lambda: RandomDataset(32, n))


def boring_loader(n: int = BORING_SAMPLES, batch_size: int = BATCH, seed: int = 1, **kwargs) -> DataLoader:
    return DataLoader(boring_data(n, seed), batch_size=batch_size, **kwargs)


def token_data(n: int = TOKEN_SAMPLES, seed: int = 2) -> TensorDataset:
    """(inputs, next tokens) of random token streams, as the demo's WikiText2 gives them (never downloaded)."""
    stream = seeded(seed, lambda: torch.randint(0, VOCAB, (n, SEQUENCE + 1)))
    return TensorDataset(stream[:, :-1].contiguous(), stream[:, 1:].contiguous())


class RandomTokenTransformer(LightningTransformer):
    """Lightning's demo language model (its own sizes, dropout on) over a small vocabulary. Its own
    ``prepare_data`` downloads WikiText2 (on rank 0 only): replaced, the data is given to ``fit``."""

    def prepare_data(self) -> None:
        pass


def transformer() -> RandomTokenTransformer:
    return seeded(0, lambda: RandomTokenTransformer(vocab_size=VOCAB))


def classification_data(n: int, seed: int) -> TensorDataset:
    """(features, class, index): the class is a fixed function of the features, so the model can learn it."""
    x = seeded(seed, lambda: torch.randn(n, FEATURES))
    y = (x[:, :CLASSES] + 0.5 * x[:, CLASSES : 2 * CLASSES]).argmax(dim=1)
    return TensorDataset(x, y, torch.arange(n))


class ClassifierData(LightningDataModule):
    def __init__(self, batch_size: int = BATCH, shuffle: bool = True, drop_last: bool = False):
        super().__init__()
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.sets = {
            "train": classification_data(TRAIN, 10),
            "val": classification_data(VAL, 11),
            "test": classification_data(TEST, 12),
            "predict": classification_data(PREDICT, 13),
        }

    def train_dataloader(self):
        return DataLoader(
            self.sets["train"], batch_size=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last
        )

    def val_dataloader(self):
        return DataLoader(self.sets["val"], batch_size=8)

    def test_dataloader(self):
        return DataLoader(self.sets["test"], batch_size=8)

    def predict_dataloader(self):
        return DataLoader(self.sets["predict"], batch_size=8)


class MetricClassifier(LightningModule):
    """An MLP classifier with BatchNorm; epoch metrics are torchmetrics objects, other logs use sync_dist.

    Records the indices of the samples it saw in each stage (training per epoch), for the tests to count.
    """

    def __init__(self, lr: float = 0.1):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU())
        self.head = nn.Linear(16, CLASSES)
        self.lr = lr
        self.train_acc = Accuracy(task="multiclass", num_classes=CLASSES)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc", Accuracy(task="multiclass", num_classes=CLASSES))
            setattr(self, f"{stage}_mse", MeanSquaredError())
        self.seen: dict[str, list] = {"train": [], "val": [], "test": [], "predict": []}
        self.train_counts: list[tuple[int, int, int, float]] = []  # (epoch, correct, samples, summed loss) per step

    def forward(self, x):
        return self.head(self.backbone(x))

    def training_step(self, batch, batch_idx):
        x, y, index = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.seen["train"].append((self.current_epoch, index.tolist()))
        correct = int((logits.argmax(dim=1) == y).sum())
        self.train_counts.append((self.current_epoch, correct, len(y), float(loss.detach()) * len(y)))
        self.train_acc(logits, y)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def _evaluate(self, batch, stage: str):
        x, y, index = batch
        logits = self(x)
        self.seen[stage].extend(index.tolist())
        self.log(f"{stage}_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}_loss_sum", F.cross_entropy(logits, y, reduction="sum"), sync_dist=True, reduce_fx="sum")
        self.log(f"{stage}_count", float(len(y)), sync_dist=True, reduce_fx="sum")
        accuracy, mse = getattr(self, f"{stage}_acc"), getattr(self, f"{stage}_mse")
        accuracy(logits, y)
        mse(logits.softmax(dim=1), F.one_hot(y, CLASSES).float())
        self.log(f"{stage}_acc", accuracy)
        self.log(f"{stage}_mse", mse)

    def validation_step(self, batch, batch_idx):
        self._evaluate(batch, "val")

    def test_step(self, batch, batch_idx):
        self._evaluate(batch, "test")

    def predict_step(self, batch, batch_idx, dataloader_idx=0):
        x, _, index = batch
        self.seen["predict"].extend(index.tolist())
        return {"index": index, "probs": self(x).softmax(dim=1)}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class CalledWithBatch(nn.Module):
    """A part of a model called as the pipeline calls a stage, ``stage(h, batch)``."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, h, batch):
        return self.module(h)


class PipelinedClassifier(MetricClassifier):
    """What a user adds to ``MetricClassifier`` to train it under ``hybrid``: its two parts as stages (kept
    in a plain list: its state dict stays the classifier's), its input, and its loss and logs."""

    def pipeline_blocks(self):
        if "_stages" not in self.__dict__:
            self.__dict__["_stages"] = [CalledWithBatch(self.backbone), CalledWithBatch(self.head)]
        return self.__dict__["_stages"]

    def pipeline_input(self, batch):
        return batch[0]

    def pipeline_loss(self, output, batch, stage):
        _, y, _ = batch
        loss = F.cross_entropy(output, y)
        if stage == "train":
            self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        else:
            accuracy = getattr(self, f"{stage}_acc")
            accuracy(output, y)
            self.log(f"{stage}_loss", loss, sync_dist=True)
            self.log(f"{stage}_acc", accuracy)
        return loss


def global_metrics(model: MetricClassifier, data: TensorDataset) -> dict[str, float]:
    """What the classifier's logged evaluation metrics are on the whole of ``data``, in one process."""
    x, y, _ = data.tensors
    model.eval()
    with torch.no_grad():
        logits = model(x)
    probs = logits.softmax(dim=1)
    return {
        "loss": float(F.cross_entropy(logits, y)),
        "loss_sum": float(F.cross_entropy(logits, y, reduction="sum")),
        "count": float(len(y)),
        "acc": float((logits.argmax(dim=1) == y).float().mean()),
        "mse": float((probs - F.one_hot(y, CLASSES).float()).pow(2).mean()),
    }


class TwoOptimizerGAN(LightningModule):
    """A GAN-shaped module with manual optimization and two optimizers, on BoringModel's 32-dim data.

    With ``toggle`` (Lightning's recommended pattern) each step freezes the other optimizer's parameters
    (``toggle_optimizer``); without, each backward reaches only some parameters: the discriminator's loss
    never reaches the generator (it trains on ``fake.detach()``).
    """

    def __init__(self, toggle: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.generator = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 32))
        self.discriminator = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 1))
        self.toggle = toggle
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        g_opt, d_opt = self.optimizers()
        noise = batch[:, :8].flip(dims=[1])  # from the batch: no RNG, the same in every run
        self._step(g_opt, lambda: F.softplus(-self.discriminator(self.generator(noise))).mean())
        fake = self.generator(noise).detach()
        self._step(
            d_opt, lambda: (F.softplus(-self.discriminator(batch)) + F.softplus(self.discriminator(fake))).mean()
        )

    def _step(self, optimizer, loss_fn):
        if self.toggle:
            self.toggle_optimizer(optimizer)
        for opt in self.optimizers():
            opt.zero_grad()
        loss = loss_fn()
        self.manual_backward(loss)
        optimizer.step()
        if self.toggle:
            self.untoggle_optimizer(optimizer)
        self.log(f"loss_{'g' if optimizer is self.optimizers()[0] else 'd'}", loss, prog_bar=False)

    def configure_optimizers(self):
        return (
            torch.optim.SGD(self.generator.parameters(), lr=0.05, momentum=0.5),
            torch.optim.SGD(self.discriminator.parameters(), lr=0.05, momentum=0.5),
        )


class BoringStepSchedule(BoringModel):
    """BoringModel whose learning rate halves every 3 optimizer steps (a step-interval schedule)."""

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=0.1)
        schedule = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


class BoringWithUnused(BoringModel):
    """BoringModel with a layer its loss never uses, under AdamW with weight decay: a zero gradient instead of
    none would move that layer."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Linear(32, 2)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.05, weight_decay=0.5)


class BoringWithBackbone(BoringModel):
    """BoringModel behind a backbone for Lightning's BackboneFinetuning (frozen first, unfrozen at epoch 1)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Linear(32, 32), nn.Tanh())

    def forward(self, x):
        return self.layer(self.backbone(x))

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1, momentum=0.9)


def backbone_finetuning():
    from lightning.pytorch.callbacks import BackboneFinetuning

    return BackboneFinetuning(
        unfreeze_backbone_at_epoch=1,
        lambda_func=lambda epoch: 1.0,
        backbone_initial_ratio_lr=0.5,
        should_align=False,
        verbose=False,
    )


class SeedAtFirstBatch(Callback):
    """The same dropout masks in every run: the global RNG is seeded just before the first batch's forward
    (whatever drew from it before: a DataLoader iterator draws its base seed, ours restores the draw)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 0 and batch_idx == 0:
            torch.manual_seed(0)


class RecordTraining(Callback):
    """What a rank trained on (its batches, as given to training_step) and the learning rate after each batch."""

    def __init__(self):
        self.batches: list[tuple[int, torch.Tensor]] = []
        self.lrs: list[float] = []
        self.grad_norms: list[float] = []
        self.epoch_metrics: list[dict[str, float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        first = batch[0] if isinstance(batch, (list, tuple)) else batch
        self.batches.append((trainer.current_epoch, first.detach().clone()))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad.detach().flatten() for p in pl_module.parameters() if p.grad is not None]
        self.grad_norms.append(float(torch.cat(grads).norm()) if grads else 0.0)

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.epoch_metrics.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def row_indices(dataset: Dataset, rows: torch.Tensor) -> list[int]:
    """Which samples of ``dataset`` the rows of ``rows`` are (BoringModel's data carries no index)."""
    where = {tuple(dataset[i].tolist()): i for i in range(len(dataset))}
    return [where[tuple(row.tolist())] for row in rows]
