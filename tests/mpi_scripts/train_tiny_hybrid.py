"""Train TinyPipelined with the hybrid strategy; save each rank's stage and the run's summary.

usage: train_tiny_hybrid.py --out DIR --stages S --microbatches M --schedules SCHEDULE [SCHEDULE ...]
One run per schedule (one process start-up for all), results in OUT_DIR/<schedule>/.
"""

import argparse
from pathlib import Path

import torch
from lightning.pytorch import Trainer
from tiny_models import TinyData, TinyPipelined

import lightning_xd.strategies  # noqa: F401  (registers the names)
from lightning_xd.launch.registry import STRATEGIES

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
parser.add_argument("--stages", type=int, required=True)
parser.add_argument("--microbatches", type=int, required=True)
parser.add_argument("--schedules", nargs="+", required=True)
args = parser.parse_args()
root, stages, microbatches = args.out, args.stages, args.microbatches
for schedule in args.schedules:
    out = root / schedule
    strategy = STRATEGIES.build(
        "hybrid", {"pipeline_stages": stages, "microbatches": microbatches, "schedule": schedule}
    )
    model = TinyPipelined()
    trainer = Trainer(
        strategy=strategy,
        accelerator="cpu",
        max_epochs=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        default_root_dir=str(out),
    )
    trainer.fit(model, TinyData(batch_size=8))
    metrics = trainer.validate(model, TinyData(batch_size=8), verbose=False)[0]
    trainer.save_checkpoint(out / "hybrid.ckpt")
    out.mkdir(parents=True, exist_ok=True)
    # decisions are the whole job's, not a stage group's: rank 0's word, everybody's vote
    decisions = {
        "broadcast": strategy.broadcast(trainer.global_rank, src=0),
        "all_agree": strategy.reduce_boolean_decision(trainer.global_rank == 0, all=True),
        "any_agrees": strategy.reduce_boolean_decision(trainer.global_rank == 0, all=False),
    }
    torch.save(
        {
            "own": {k: v for k, v in model.state_dict().items() if k in strategy.own_state_keys},
            "decisions": decisions,
            "metrics": metrics,
            "summary": strategy.summary_metrics(),
            "steps": trainer.global_step,
        },
        out / f"rank{trainer.global_rank}.pt",
    )
