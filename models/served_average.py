"""Serve an exponential moving average of a module's weights while training the live ones.

Online training moves the weights at every step, after every batch of a stream; a forecast made
with the live weights carries that step-to-step jitter. Polyak averaging serves instead their
exponential moving average, updated after each optimizer step as
``served = decay * served + (1 - decay) * live``: it follows the stream with a lag of about
``1 / (1 - decay)`` steps and averages the jitter out (torch.optim.swa_utils.get_ema_avg_fn computes
the same update). Training never sees the average: losses and gradients are the live weights'.

The average lives beside the module, not in its ``state_dict``, so a strategy synchronises,
broadcasts and checkpoints the live weights exactly as without it; every process of a synchronous
job averages the same live weights, so every process serves the same average. Checkpoints carry it
under their own key (``served_average``), so a resumed run serves what it served before.
Reference: Polyak and Juditsky, "Acceleration of stochastic approximation by averaging", 1992.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CHECKPOINT_KEY = "served_average"


class ServedAverage:
    """The exponential moving average, with ``decay`` in (0, 1), of ``module``'s parameters."""

    def __init__(self, decay: float):
        self.decay = decay
        self.weights: dict[str, torch.Tensor] | None = None

    def start(self, module: nn.Module) -> None:
        """Average from the module's present weights on, unless an average was restored."""
        if self.weights is None:
            self.weights = {name: p.detach().clone() for name, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        """After an optimizer step: move the average ``1 - decay`` of the way to the live weights."""
        for name, p in module.named_parameters():
            average = self.weights[name]
            if average.device != p.device:
                self.weights[name] = average = average.to(p.device)
            average.lerp_(p.detach(), 1.0 - self.decay)

    @torch.no_grad()
    def forward(self, module: nn.Module, *args: Any) -> Any:
        """``module(*args)`` computed with the averaged weights, in eval mode (no dropout); a module
        never trained (no average started) serves its own weights."""
        self.start(module)
        weights = {name: self.weights[name].to(p.device) for name, p in module.named_parameters()}
        training = module.training
        module.eval()
        try:
            return torch.func.functional_call(module, weights, args, strict=False)
        finally:
            module.train(training)

    def save(self, checkpoint: dict) -> None:
        if self.weights is not None:
            checkpoint[CHECKPOINT_KEY] = {name: w.detach().cpu() for name, w in self.weights.items()}

    def load(self, checkpoint: dict) -> None:
        if CHECKPOINT_KEY in checkpoint:
            self.weights = dict(checkpoint[CHECKPOINT_KEY])
