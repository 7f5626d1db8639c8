"""Small residual CNN of conv-BN-ReLU blocks for CIFAR-10, trained from scratch.

A ResNet-9-like layout (Page's DAWNBench net) with widths w, 2w, 4w, 4w instead of w .. 8w, so that
its four blocks hold similar numbers of parameters. SGD with Nesterov momentum, weight
decay, a one-cycle learning rate and label smoothing; cross-entropy loss; accuracy.
Reference: ~75-80% test accuracy for a small CNN with batch norm and crop/flip augmentation
(the PyTorch "blitz" CNN without them: ~54%). Trained on the 9,000 of our 10,000 training images
left after validation, this net's measured result is in its worked example's README.

Pipeline contract (``lightning_xd.models.pipelined``): ``pipeline_blocks()`` are the four blocks in order, each
called as ``block(h, batch)``; ``pipeline_input(batch)`` the images; ``pipeline_loss`` the loss and
metrics. The training, validation and test steps run through exactly these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_xd.launch.registry import MODELS
from lightning_xd.models.pipelined import PipelinedModule, PlainBlock, run_blocks


def conv_bn_relu(c_in: int, c_out: int, pool: bool = False) -> nn.Sequential:
    layers = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, *([nn.MaxPool2d(2)] if pool else []))


class Residual(nn.Module):
    """Two conv-BN-ReLU layers with an identity shortcut."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn_relu(channels, channels), conv_bn_relu(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


@MODELS.register("cnn", data="cifar10", max_epochs=30)
class CNN(PipelinedModule):
    dashboard_units = {"loss": "cross-entropy, nats"}  # axis labels of the training dashboard

    def __init__(
        self,
        num_classes: int,
        width: int = 16,
        lr: float = 0.2,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        label_smoothing: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        w1, w2, w3 = width, 2 * width, 4 * width
        self.blocks = nn.ModuleList(
            [
                PlainBlock(
                    conv_bn_relu(3, w1),
                    conv_bn_relu(w1, w2, pool=True),
                    Residual(w2),  # 32x32 -> 16x16
                    conv_bn_relu(w2, w3, pool=True),
                ),  # -> 8x8
                PlainBlock(Residual(w3)),
                PlainBlock(conv_bn_relu(w3, w3, pool=True)),  # -> 4x4
                PlainBlock(Residual(w3), nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(w3, num_classes)),
            ]
        )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def pipeline_blocks(self) -> list[nn.Module]:
        return list(self.blocks)

    def pipeline_input(self, batch) -> torch.Tensor:
        images, _ = batch
        return images

    def pipeline_loss(self, output: torch.Tensor, batch, split: str) -> torch.Tensor:
        _, target = batch
        # label smoothing regularises training only; validation and test report the plain loss
        smoothing = self.hparams.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(output, target, label_smoothing=smoothing)
        n = target.numel()
        accuracy = getattr(self, f"{split}_acc")
        accuracy(output, target)
        self.log(f"{split}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=n)
        self.log(f"{split}/acc", accuracy, on_step=False, on_epoch=True, prog_bar=split == "val", batch_size=n)
        return loss

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of images (the blocks need nothing else of a batch)."""
        return run_blocks(self.blocks, images, None)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(
            self.parameters(),
            lr=self.hparams.lr,
            momentum=self.hparams.momentum,
            nesterov=True,
            weight_decay=self.hparams.weight_decay,
        )
        # one cycle: warm up to lr, then anneal to ~0 by the last step; fast convergence in few epochs
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
