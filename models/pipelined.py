"""The pipeline contract, written once: a model as blocks in order, an input, and a loss.

A pipelined model is a sequence of blocks. Each block is called as ``block(h, batch)``: ``h`` is
what the previous block returned (the first gets ``pipeline_input(batch)``), ``batch`` is the
micro-batch itself, for blocks that need more of it than ``h`` (a graph's structure, the last
observed value). ``pipeline_loss(output, batch, split)`` turns the last block's output into the
loss and logs the metrics of ``split`` ("train", "val" or "test").

A pipeline strategy cuts the blocks into P stages of consecutive blocks, one stage per process,
and runs exactly this path with the stages on different processes; the training, validation and
test steps here run it in one process, so both paths compute the same thing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor, nn


class Block(nn.Module):
    """Layers run in order as one block, each called as ``layer(h, batch)``."""

    def __init__(self, *layers: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, h: Tensor, batch: Any = None) -> Tensor:
        for layer in self.layers:
            h = layer(h, batch)
        return h


class PlainBlock(nn.Sequential):
    """Plain layers run in order as one block, each called as ``layer(h)``: they need nothing of the batch."""

    def forward(self, h: Tensor, batch: Any = None) -> Tensor:
        return super().forward(h)


def run_blocks(blocks: Sequence[nn.Module], h: Tensor, batch: Any) -> Tensor:
    """``h`` through ``blocks`` in order, each called as ``block(h, batch)``."""
    for block in blocks:
        h = block(h, batch)
    return h


class PipelinedModule(LightningModule, ABC):
    """A LightningModule written to the pipeline contract: subclasses give the three methods below;
    forward and the training, validation and test steps run input -> every block -> loss."""

    @abstractmethod
    def pipeline_blocks(self) -> Sequence[nn.Module]:
        """The model's blocks in order, called as ``block(h, batch)``; a pipeline may cut between any two."""

    @abstractmethod
    def pipeline_input(self, batch: Any) -> Tensor:
        """What the first block takes from the batch."""

    @abstractmethod
    def pipeline_loss(self, output: Tensor, batch: Any, split: str) -> Tensor:
        """The loss of the last block's ``output`` on ``batch``; logs the metrics of ``split``."""

    def pipeline_output(self, batch: Any) -> Tensor:
        """The model's output on ``batch``: its input through every block, in this process."""
        return run_blocks(self.pipeline_blocks(), self.pipeline_input(batch), batch)

    def forward(self, batch: Any) -> Tensor:
        return self.pipeline_output(batch)

    def pipelined_step(self, batch: Any, split: str) -> Tensor:
        """The loss of ``batch`` for ``split``, every block run in this process."""
        return self.pipeline_loss(self.pipeline_output(batch), batch, split)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.pipelined_step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.pipelined_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.pipelined_step(batch, "test")
