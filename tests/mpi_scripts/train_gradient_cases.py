"""Every case of tests/gradient_cases.py under the mpi strategy, one after the other in one job.

usage: train_gradient_cases.py --out DIR --cases CASE [CASE ...]
Writes OUT_DIR/<case>-rank<r>.pt: the final parameters, or the error the run ended with.
"""

import argparse
from pathlib import Path

import torch
from gradient_cases import CASES
from lightning.pytorch import Trainer

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.errors import UserError
from lightning_xd.launch.registry import STRATEGIES

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--cases", nargs="+", choices=CASES, required=True)
args = parser.parse_args()
out = args.out
out.mkdir(parents=True, exist_ok=True)
for case in args.cases:
    model_class, settings, callbacks, epochs = CASES[case]
    strategy = STRATEGIES.build("mpi", dict(settings))
    model = model_class()
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks(),
    )
    try:
        trainer.fit(model)
        result = {"state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    except UserError as err:
        result = {"error": str(err)}
    torch.save(result, out / f"{case}-rank{strategy.global_rank}.pt")
