"""Build data, model, strategy and Trainer from parsed flags, train, test, write metrics.json.

``check`` runs in the process the user started, before any rank exists, so bad names, an
impossible world size or missing data are reported once, as one line, instead of by every rank.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
import warnings
from pathlib import Path
from typing import Any, Optional

from lightning_xd.cli import default_run_dir
from lightning_xd.launcher import in_mpi_job
from lightning_xd.errors import UserError
from lightning_xd.registry import DATAMODULES, MODELS, STRATEGIES, convert


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Fill in what the flags left to defaults: the model's dataset and epochs, the run dir."""
    model = MODELS.get(args.model) if args.model else None
    if model is None:
        raise UserError(f"--model is required; valid model names: {', '.join(MODELS.names())}")
    args.data = args.data or model.defaults.get("data")
    DATAMODULES.get(args.data)
    strategy = STRATEGIES.get(args.strategy)
    max_nprocs = strategy.defaults.get("max_nprocs")
    if max_nprocs is not None and args.nprocs > max_nprocs:
        raise UserError(f"strategy {args.strategy!r} runs at most {max_nprocs} process(es), not --nprocs "
                        f"{args.nprocs}; use --strategy mpi or ddp for several")
    if args.max_epochs is None:
        args.max_epochs = model.defaults.get("max_epochs", 10)
    _check_extra_flags(args, [model, DATAMODULES.get(args.data), strategy])
    settings = {**vars(args), **args.extra}
    settings["run_dir"] = str(default_run_dir(args))
    return settings


def _check_extra_flags(args: argparse.Namespace, entries: list) -> None:
    """Flags beyond train.py's own must name a parameter of the chosen model, data or strategy."""
    import inspect

    params = {}
    for entry in reversed(entries):
        params.update(inspect.signature(entry.build).parameters)
    unknown = sorted(set(args.extra) - set(params))
    if unknown:
        names = ", ".join("--" + u.replace("_", "-") for u in unknown)
        raise UserError(f"unknown flag(s) {names} for model {args.model}, data {args.data}, strategy "
                        f"{args.strategy}; `python train.py --list` shows the flags each one takes")
    args.extra = {name: convert(params[name], value) for name, value in args.extra.items()}


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before processes start, including the data on this host."""
    from lightning_xd.registry import accepted_settings

    settings = resolve(args)
    datamodule = DATAMODULES.build(args.data, settings)
    datamodule.prepare_data()
    check_settings = getattr(STRATEGIES.get(args.strategy).build, "check_settings", None)
    if check_settings is not None:  # a strategy's own checks, on the model it will run
        model = MODELS.build(args.model, settings, **datamodule.model_kwargs())
        fixed = {"nprocs": args.nprocs, "model": model}
        check_settings(**fixed, **accepted_settings(check_settings, settings, exclude=fixed))
    return settings


def _quiet_unless_rank_zero(rank: int) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = fabric_rank_zero_only.rank = rank
    if rank != 0:
        warnings.simplefilter("ignore")
        logging.getLogger("lightning").setLevel(logging.ERROR)
        logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def _share_cores(processes_on_host: int) -> None:
    """Give each process its share of this host's cores, as torchrun does for DDP."""
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_on_host))


def _prepare_data_once_per_host(datamodule) -> None:
    if not in_mpi_job():
        datamodule.prepare_data()
        return
    from lightning_xd.comm import world

    if world().local().rank == 0:
        datamodule.prepare_data()
    world().barrier()


def choose_checkpoint(resume: str, run_dir: Path) -> Optional[str]:
    """The checkpoint to resume from (``--resume auto|never|PATH``); decided by the first process."""
    from lightning_xd.checkpoints import CheckpointStore, check_readable

    store, completed = CheckpointStore(run_dir / "checkpoints"), run_dir / "COMPLETED"
    if resume not in ("auto", "never"):
        manifest = check_readable(Path(resume))
        print(f"resuming from {resume} (step {manifest.get('global_step', '?')})", flush=True)
        return resume
    if resume == "auto" and not completed.exists():
        found = store.newest_verified()
        if found is not None:
            print(f"resuming from {found[0]} (step {found[1]['global_step']}, epoch {found[1]['epoch']})", flush=True)
            return str(found[0])
    archived = store.archive()  # a finished (or deliberately restarted) run's checkpoints are kept aside
    if archived is not None:
        print(f"starting afresh; earlier checkpoints moved to {archived}", flush=True)
    completed.unlink(missing_ok=True)
    return None


def _checkpoint_to_resume(args: argparse.Namespace, run_dir: Path) -> Optional[str]:
    if not in_mpi_job():
        return choose_checkpoint(args.resume, run_dir)
    from lightning_xd.comm import world

    choice = None
    if world().rank == 0:
        try:
            choice = ("ok", choose_checkpoint(args.resume, run_dir))
        except UserError as err:
            choice = ("error", str(err))
    kind, value = world().broadcast_object(choice)
    if kind == "error":
        raise UserError(value)
    return value


def _fault_tolerance_callbacks(args: argparse.Namespace, run_dir: Path) -> list:
    from lightning_xd.callbacks import FaultInjector, FaultTolerantCheckpoint, ProgressMarker, parse_fault

    callbacks = [FaultTolerantCheckpoint(run_dir / "checkpoints", args.ckpt_every_steps, args.ckpt_every_seconds,
                                         args.ckpt_min_seconds),
                 ProgressMarker(run_dir / "progress.json")]
    if args.inject_fault:
        callbacks.append(FaultInjector(parse_fault(args.inject_fault)))
    return callbacks


def build_trainer(settings: dict[str, Any], strategy, callbacks: list) -> "Trainer":
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_xd.checkpoints import BackgroundCheckpointIO, VerifiedCheckpointIO

    environment = getattr(strategy, "cluster_environment", None)
    # A strategy without an environment of its own gets one, so that Lightning never probes for MPI
    # itself: that can hang a Trainer outside an MPI job (Lightning issue 20049).
    plugins = [] if environment is not None else [LightningEnvironment()]
    checkpoint_io = VerifiedCheckpointIO(settings["keep_last"])
    plugins.append(BackgroundCheckpointIO(checkpoint_io) if settings["background_checkpoints"] else checkpoint_io)
    rank_zero = environment is None or environment.global_rank() == 0
    return Trainer(
        accelerator=strategy.root_device.type,
        strategy=strategy,
        num_nodes=getattr(strategy, "num_nodes", 1),
        plugins=plugins,
        max_epochs=settings["max_epochs"],
        max_steps=settings["max_steps"],
        fast_dev_run=settings["fast_dev_run"],
        log_every_n_steps=settings["log_every_n_steps"],
        default_root_dir=settings["run_dir"],
        logger=TensorBoardLogger(settings["run_dir"], name="tensorboard", default_hp_metric=False),
        callbacks=[*callbacks, *([RichProgressBar()] if rank_zero else [])],
        enable_progress_bar=rank_zero,
        enable_model_summary=rank_zero,
        enable_checkpointing=True,  # through the fault-tolerant Checkpoint callback given in ``callbacks``
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and test in this process (one rank of the job); returns what metrics.json holds."""
    started = time.perf_counter()
    settings = resolve(args)
    if in_mpi_job():
        from lightning_xd.comm import world

        if world().size != args.nprocs:
            raise UserError(f"--nprocs {args.nprocs} but this MPI job has {world().size} processes; "
                            "drop mpirun and let --nprocs start the job")
        _quiet_unless_rank_zero(world().rank)
        _share_cores(world().local().size)

    from lightning.pytorch import seed_everything

    from lightning_xd.callbacks import RunSummary, StragglerDelay, parse_straggler

    seed_everything(args.seed, workers=True, verbose=False)
    datamodule = DATAMODULES.build(args.data, settings)
    strategy = STRATEGIES.build(args.strategy, settings)
    _prepare_data_once_per_host(datamodule)
    model = MODELS.build(args.model, settings, **datamodule.model_kwargs())
    run_dir = Path(settings["run_dir"])
    summary = RunSummary()
    callbacks = [StragglerDelay(*parse_straggler(args.straggler_delay))] if args.straggler_delay else []
    resume_from = _checkpoint_to_resume(args, run_dir)
    ft_callbacks = _fault_tolerance_callbacks(args, run_dir)
    from lightning_xd.viz import TrainingDashboard

    dashboard = TrainingDashboard(run_dir, args.dashboard_every, args.dashboard_video)
    trainer = build_trainer(settings, strategy, [*callbacks, summary, dashboard, *ft_callbacks])
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    totals = {**summary.totals(trainer), **checkpoint_overhead(ft_callbacks[0], summary)}
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    tested = trainer.test(model, datamodule=datamodule, verbose=trainer.is_global_zero)
    metrics = {
        "model": args.model, "data": args.data, "strategy": args.strategy, "world_size": trainer.world_size,
        **(validated[0] if validated else {}),
        **(tested[0] if tested else {}),
        **totals,
        **(strategy.summary_metrics() if hasattr(strategy, "summary_metrics") else {}),
        "wall_time_s": time.perf_counter() - started,
    }
    if trainer.is_global_zero:
        write_json(run_dir / "metrics.json", metrics)
        (run_dir / "COMPLETED").write_text(f"{time.time()}\n")  # the supervisor's sign that the run finished
    if getattr(strategy, "recoveries", None):
        from lightning_xd.ulfm import leave_after_failure

        leave_after_failure()
    return metrics


def checkpoint_overhead(checkpoints, summary) -> dict[str, float]:
    """Time spent saving checkpoints, against the time spent in training steps (this process)."""
    saves = checkpoints.save_seconds
    return {"checkpoint/saves": len(saves), "checkpoint/save_s_mean": sum(saves) / max(1, len(saves)),
            "checkpoint/overhead_pct": 100.0 * sum(saves) / max(summary.step_seconds, 1e-9)}


def write_json(path: Path, content: dict) -> None:
    """Write atomically: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(content, indent=2, sort_keys=True, default=float) + "\n")
    os.replace(tmp, path)
