"""BatchNorm synchronised over MPI (lightning_xd.parallel.sync_batchnorm) against one BatchNorm on the union batch.

usage: sync_batchnorm_cases.py --out DIR --parts PART [PART ...]
  layers      every case of LAYER_CASES on this rank's share of the union batch:
              OUT_DIR/layers-rank<r>.pt
  lightning   Trainer(strategy=mpi, sync_batchnorm=True) fitting BNRegressor: OUT_DIR/lightning-rank<r>.pt
  lightning-unsynced   the same fit without sync_batchnorm: OUT_DIR/lightning-unsynced-rank<r>.pt
A part that raises writes {"error": traceback} instead, and the job goes on with the next part.

The definitions here are shared with tests/test_sync_batchnorm.py, which also runs ``run_layer_case``
in threads with an in-process communicator and computes the single-process references.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from gradient_cases import dataset
from lightning.pytorch import Callback, LightningModule
from reference_training import fit_one_process, in_step_order, state_of
from torch import nn
from torch.utils.data import DataLoader

STEPS = 2  # training steps per layer case, then one forward in eval mode

# name: (the plain layer, the shape of one sample, samples per rank, input dtype)
LAYER_CASES = {
    "1d": (lambda: nn.BatchNorm1d(4), (4,), (3, 5), torch.float32),
    "1d-no-bias": (lambda: nn.BatchNorm1d(4, bias=False), (4,), (5, 3), torch.float32),
    "1d-seq-cumulative": (lambda: nn.BatchNorm1d(4, momentum=None), (4, 6), (3, 5), torch.float32),
    "2d": (lambda: nn.BatchNorm2d(3), (3, 4, 4), (3, 5), torch.float32),
    "2d-empty-rank-no-affine": (
        lambda: nn.BatchNorm2d(3, affine=False, momentum=0.3),
        (3, 2, 2),
        (0, 6),
        torch.float32,
    ),
    "3d": (lambda: nn.BatchNorm3d(2), (2, 2, 3, 3), (5, 3), torch.float32),
    "2d-bf16": (lambda: nn.BatchNorm2d(3), (3, 4, 4), (3, 5), torch.bfloat16),
}


def layer_inputs(case: str, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The union batch of a step and the weights of its loss sum(y * w), in the case's dtype."""
    _, sample, sizes, dtype = LAYER_CASES[case]
    g = torch.Generator().manual_seed(1000 * step + len(case))
    x = 3.0 + 2.0 * torch.randn(sum(sizes), *sample, generator=g)  # off-centre: a mean to subtract
    w = torch.randn(sum(sizes), *sample, generator=g)
    return x.to(dtype), w.to(dtype)


def plain_layer(case: str) -> nn.Module:
    """The case's BatchNorm with random (seeded) parameters and running statistics."""
    layer = LAYER_CASES[case][0]()
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for tensor in (layer.weight, layer.bias):
            if tensor is not None:
                tensor.copy_(1.0 + 0.5 * torch.randn(tensor.shape, generator=g))
        layer.running_mean.copy_(torch.randn(layer.running_mean.shape, generator=g))
        layer.running_var.copy_(0.5 + torch.rand(layer.running_var.shape, generator=g))
    return layer


def _record(layer: nn.Module, x: torch.Tensor, w: torch.Tensor) -> dict:
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * w).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    layer.zero_grad()
    return {"out": y.detach(), "input_grad": x.grad, "param_grads": grads}


def _state(layer: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in layer.state_dict().items()}


def run_layer_case(case: str, rank: int, communicator) -> dict:
    """This rank's share of each step through the synced layer (``communicator``: the callable the
    strategy would pass), then one eval-mode forward; outputs, gradients and the final state."""
    from lightning_xd.parallel.sync_batchnorm import MPISyncBatchNorm

    sizes = LAYER_CASES[case][2]
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    plain = plain_layer(case)
    sync = MPISyncBatchNorm(communicator)
    layer = sync.apply(plain)
    steps = []
    for step in range(STEPS):
        x, w = layer_inputs(case, step)
        steps.append(_record(layer, x[lo:hi], w[lo:hi]))
    state = _state(layer)
    layer.eval()
    x, _ = layer_inputs(case, STEPS)
    with torch.no_grad():
        eval_out = layer(x[lo:hi])
    reverted = sync.revert(layer)
    return {
        "steps": steps,
        "state": state,
        "eval_out": eval_out,
        "synced_class": type(layer).__name__,
        "reverted_is_original": reverted is plain,
        "reverted_state": _state(reverted),
    }


def layer_reference(case: str) -> dict:
    """One plain BatchNorm on the whole union batch, in one process."""
    layer = plain_layer(case)
    steps = [_record(layer, *layer_inputs(case, step)) for step in range(STEPS)]
    state = _state(layer)
    layer.eval()
    with torch.no_grad():
        eval_out = layer(layer_inputs(case, STEPS)[0])
    return {"steps": steps, "state": state, "eval_out": eval_out}


# ---- through Lightning ------------------------------------------------------------------------------
class BNRegressor(LightningModule):
    """A small regressor with a BatchNorm between its layers, on tests/gradient_cases.py's data: 2
    samples per rank and step, so each rank's own batch statistics are far from the global ones."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 1))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y, _ = batch
        return F.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y, _ = batch
        self.log("val_loss", F.mse_loss(self(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    def train_dataloader(self):  # each rank's; the one-process reference reads in_step_order(dataset(), 2, 2)
        return DataLoader(dataset(), batch_size=2, shuffle=False)

    def val_dataloader(self):
        return DataLoader(dataset(), batch_size=3)


LIGHTNING_EPOCHS = 2


class SeenInTraining(Callback):
    """What the BatchNorm layer was while training ran, and whether the optimizer holds its weight."""

    def __init__(self):
        self.classes: set[str] = set()
        self.optimizer_holds_weight = True

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.classes.add(type(pl_module.net[1]).__name__)
        held = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
        self.optimizer_holds_weight &= id(pl_module.net[1].weight) in held


def trainer_kwargs() -> dict:
    return dict(
        accelerator="cpu",
        max_epochs=LIGHTNING_EPOCHS,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=2,
    )


def lightning_reference() -> dict:
    """BNRegressor trained in one process on the union batches (each step: rank 0's batch, then rank 1's);
    its final state."""
    _, model = fit_one_process(BNRegressor, in_step_order(dataset(), 2, 2), **trainer_kwargs())
    return state_of(model)


def fit_under_mpi(sync_batchnorm: bool) -> dict:
    from lightning.pytorch import Trainer

    import lightning_xd.strategies  # noqa: F401  (registers the names)
    from lightning_xd.launch.registry import STRATEGIES

    seen = SeenInTraining()
    model = BNRegressor()
    strategy = STRATEGIES.build("mpi", {})
    trainer = Trainer(strategy=strategy, sync_batchnorm=sync_batchnorm, callbacks=[seen], **trainer_kwargs())
    trainer.fit(model)
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "classes_in_training": sorted(seen.classes),
        "optimizer_holds_weight": seen.optimizer_holds_weight,
        "class_after_fit": type(model.net[1]).__name__,
        "layer_sync": type(strategy._layer_sync).__name__,
        "steps": trainer.global_step,
    }


def main(out: Path, parts: list[str]) -> None:
    from lightning_xd.comm.communicator import world

    rank = world().rank
    out.mkdir(parents=True, exist_ok=True)
    for part in parts:
        try:
            if part == "layers":
                result = {case: run_layer_case(case, rank, world) for case in LAYER_CASES}
            elif part in ("lightning", "lightning-unsynced"):
                result = fit_under_mpi(sync_batchnorm=part == "lightning")
            else:
                raise ValueError(f"unknown part {part!r}")
        except Exception:  # noqa: BLE001  (written for the test to show; the next part still runs)
            result = {"error": traceback.format_exc()}
            print(f"rank {rank}, part {part}:\n{result['error']}", file=sys.stderr, flush=True)
        torch.save(result, out / f"{part}-rank{rank}.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--parts", nargs="+", choices=["layers", "lightning", "lightning-unsynced"], required=True)
    args = parser.parse_args()
    main(args.out, args.parts)
