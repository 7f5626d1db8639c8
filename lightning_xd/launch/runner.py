"""Build data, model, strategy and Trainer from parsed flags, train, test, write metrics.json.

``check`` runs in the process the user started, before any rank exists, so bad names, an
impossible world size or missing data are reported once, as one line, instead of by every rank.
Its cheap part, ``resolve``, also runs in every rank: names, a model's datasets, flag types and
domains, and (outside an MPI job) whether the run dir can be written. A checkpoint to resume must
come from the same model, dataset and strategy: every checkpoint's manifest records them
(``run_identity``), ``check`` compares the one ``--resume`` will pick from its manifest, and the
rank that picks it (``choose_checkpoint``) compares again, from the checkpoint itself if need be.

``run`` is one rank's part, in stages: join the job (``join_job``), build datamodule, model and
strategy (``build_pieces``) and the Trainer (``build_trainer``, placed by ``trainer_placement``),
fit, validate and test (``fit_validate_test``), collect the metrics (``collect_metrics``) and write
them (``write_results``). The benchmarks build their runs from the same functions. What a
strategy does beyond Lightning's own (its checks, figures, recoveries) is asked through
``lightning_xd.contract.declared``.
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lightning_xd.comm.environment import in_mpi_job
from lightning_xd.contract import StrategyContract, declared
from lightning_xd.errors import UserError
from lightning_xd.files import write_json_atomically
from lightning_xd.launch.cli import default_run_dir
from lightning_xd.launch.cores import share_cores
from lightning_xd.launch.registry import DATAMODULES, MODELS, STRATEGIES, check_domain, convert

if TYPE_CHECKING:
    from lightning.fabric.plugins.environments import ClusterEnvironment
    from lightning.pytorch import Trainer


def resolve(args: argparse.Namespace) -> dict[str, Any]:
    """Fill in what the flags left to defaults: the model's dataset and epochs, the run dir."""
    model = MODELS.get(args.model) if args.model else None
    if model is None:
        raise UserError(f"--model is required; valid model names: {', '.join(MODELS.names())}")
    args.data = args.data or model.defaults.get("data")
    DATAMODULES.get(args.data)
    if model.trains_on and args.data not in model.trains_on:
        raise UserError(
            f"model {args.model} cannot train on {args.data}; it trains on {', '.join(model.trains_on)} "
            f"(give --data {model.trains_on[0]}, its own, or leave --data out)"
        )
    strategy = STRATEGIES.get(args.strategy)
    max_processes = declared(strategy.build).max_processes
    if max_processes is not None and args.nprocs > max_processes:
        raise UserError(
            f"strategy {args.strategy!r} runs at most {max_processes} process(es), not --nprocs "
            f"{args.nprocs}; use --strategy mpi or ddp for several"
        )
    if args.max_epochs is None:
        args.max_epochs = model.defaults.get("max_epochs", 10)
    _check_extra_flags(args, [model, DATAMODULES.get(args.data), strategy])
    _check_test_flags(args)
    settings = {**vars(args), **args.extra}
    settings["run_dir"] = str(default_run_dir(args))
    if not in_mpi_job():  # where the run starts; ranks on other hosts need not share this filesystem
        check_run_dir(settings["run_dir"])
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
        raise UserError(
            f"unknown flag(s) {names} for model {args.model}, data {args.data}, strategy "
            f"{args.strategy}; `python train.py --list` shows the flags each one takes"
        )
    origin = getattr(args, "extra_from", {})  # config file and key, for values that came from one
    args.extra = {
        name: convert(params[name], value, origin.get(name), typed=True) for name, value in args.extra.items()
    }
    for name, value in args.extra.items():
        check_domain(name, value, origin.get(name))


def _check_test_flags(args: argparse.Namespace) -> None:
    """``--straggler-delay`` and ``--inject-fault`` are parsed here, so a typo fails before the job starts.
    (A rank beyond the job is allowed: a restart on fewer processes keeps the flags it was given.)"""
    from lightning_xd.callbacks import parse_fault, parse_straggler

    if args.straggler_delay and parse_straggler(args.straggler_delay)[1] < 0:
        raise UserError(f"--straggler-delay {args.straggler_delay}: give seconds of 0 or more, for example 1:0.05")
    if args.inject_fault:
        parse_fault(args.inject_fault)


def check_run_dir(run_dir: str | Path) -> None:
    """``--run-dir`` must be a folder this process can create files in, or one it can create.

    Tried, not read off permission bits (root ignores them; read-only mounts, ACLs and immutable
    folders do not show in them): a temporary folder is made in the run dir, or in the nearest
    folder above it that exists, and removed again, so the check leaves nothing behind."""
    path = Path(run_dir)
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise UserError(
            f"--run-dir {path} cannot be written: {existing} is a file, not a folder; give another --run-dir"
        )
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-check-", dir=existing))
    except OSError as err:
        raise UserError(
            f"--run-dir {path} cannot be written ({err.strerror} in {existing}); "
            "give a --run-dir this user can write to"
        ) from None


def in_job_recovery(args: argparse.Namespace) -> bool:
    """Whether the job is started for in-job recovery (``mpirun --with-ft ulfm``): asked for
    (``--fault-tolerance ulfm``), possible (several processes) and declared by the strategy."""
    strategy = STRATEGIES.get(args.strategy).build
    return args.fault_tolerance == "ulfm" and args.nprocs > 1 and declared(strategy).supports_in_job_recovery


def run_identity(args: argparse.Namespace) -> dict[str, str]:
    """What a checkpoint records about the run that saved it, and what resuming it must match."""
    return {"model": args.model, "data": args.data, "strategy": args.strategy}


def _check_checkpoint_to_resume(args: argparse.Namespace, run_dir: Path) -> None:
    """The launching process's view of what ``choose_checkpoint`` will pick, from its manifest (no
    checksum: the rank that resumes verifies): it must exist, match this run and pass the restricted
    load (tensors memory-mapped, so this is cheap), so that a crafted one stops the run here."""
    from lightning_xd.fault_tolerance.checkpoints import (
        AUTO_RESUME_FIX,
        CheckpointStore,
        check_same_run,
        read_manifest,
        refuse_unsafe,
    )
    from lightning_xd.safe_loading import UnsafeFileError

    if args.resume == "never":
        return
    if args.resume != "auto":
        path = Path(args.resume)
        if not path.is_file():
            raise UserError(f"--resume {path}: no such checkpoint file")
        check_same_run(path, (read_manifest(path) or {}).get("run"), run_identity(args))
        refuse_unsafe(path)
        return
    if (run_dir / "COMPLETED").exists():
        return  # a finished run starts afresh
    store = CheckpointStore(run_dir / "checkpoints")
    newest = next(iter(store.manifests(warn=False)), None)
    if newest is not None:
        path = store.folder / newest.get("file", "?")
        check_same_run(path, newest.get("run"), run_identity(args), AUTO_RESUME_FIX)
        try:
            refuse_unsafe(path)
        except UnsafeFileError:
            raise
        except UserError:  # missing or damaged: the resuming rank skips it for the newest sound one
            pass


def check(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that can be checked before processes start, including the data on this host."""
    settings = resolve(args)
    _check_checkpoint_to_resume(args, Path(settings["run_dir"]))
    datamodule = DATAMODULES.build(args.data, settings)
    datamodule.prepare_data()
    check_strategy_settings(args.strategy, args.nprocs, args.model, datamodule, settings)
    return settings


def check_strategy_settings(strategy: str, nprocs: int, model: str, datamodule, settings: dict[str, Any]) -> None:
    """The strategy's own refusal (``StrategyContract.check_settings``) of ``nprocs`` processes and
    ``settings``, on the model it would run (built from ``datamodule``'s shapes only when the strategy
    declares checks of its own: the default accepts everything)."""
    from lightning_xd.launch.registry import accepted_settings

    check_settings = declared(STRATEGIES.get(strategy).build).check_settings
    if check_settings is StrategyContract.check_settings:
        return
    built = MODELS.build(model, settings, **datamodule.model_kwargs())
    fixed = {"nprocs": nprocs, "model": built}
    check_settings(**fixed, **accepted_settings(check_settings, settings, exclude=fixed))


def quiet() -> None:
    """Silence Lightning's advice and warnings in this process (printed by every rank, they drown the run's output)."""
    warnings.simplefilter("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _quiet_unless_rank_zero(rank: int) -> None:
    from lightning.fabric.utilities.rank_zero import rank_zero_only as fabric_rank_zero_only
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    rank_zero_only.rank = fabric_rank_zero_only.rank = rank
    if rank != 0:
        quiet()


def prepare_data_once_per_host(datamodule) -> None:
    """Check, download and cache the data: in an MPI job by the first process of each host while the
    others wait, so that no rank reads a file another is still writing."""
    if not in_mpi_job():
        datamodule.prepare_data()
        return
    from lightning_xd.comm.communicator import world

    if world().local().rank == 0:
        datamodule.prepare_data()
    world().barrier()


def choose_checkpoint(resume: str, run_dir: Path, run: dict[str, str] | None = None) -> str | None:
    """The checkpoint to resume from (``--resume auto|never|PATH``); decided by the first process.
    With ``run`` (``run_identity``), one saved by another model, dataset or strategy is refused."""
    from lightning_xd.fault_tolerance.checkpoints import (
        AUTO_RESUME_FIX,
        CheckpointStore,
        check_readable,
        check_same_run,
        refuse_unsafe,
    )

    store, completed = CheckpointStore(run_dir / "checkpoints"), run_dir / "COMPLETED"
    if resume not in ("auto", "never"):
        manifest = check_readable(Path(resume))
        check_same_run(Path(resume), manifest.get("run"), run)
        print(f"resuming from {resume} (step {manifest.get('global_step', '?')})", flush=True)
        return resume
    if resume == "auto" and not completed.exists():
        found = store.newest_verified()
        if found is not None:
            check_same_run(found[0], found[1].get("run"), run, AUTO_RESUME_FIX)
            refuse_unsafe(found[0])
            print(f"resuming from {found[0]} (step {found[1]['global_step']}, epoch {found[1]['epoch']})", flush=True)
            return str(found[0])
    archived = store.archive()  # a finished (or deliberately restarted) run's checkpoints are kept aside
    if archived is not None:
        print(f"starting afresh; earlier checkpoints moved to {archived}", flush=True)
    completed.unlink(missing_ok=True)
    return None


def _checkpoint_to_resume(args: argparse.Namespace, run_dir: Path) -> str | None:
    if not in_mpi_job():
        return choose_checkpoint(args.resume, run_dir, run_identity(args))
    from lightning_xd.comm.communicator import world

    choice = None
    if world().rank == 0:
        try:
            choice = ("ok", choose_checkpoint(args.resume, run_dir, run_identity(args)))
        except UserError as err:
            choice = ("error", str(err))
    kind, value = world().broadcast_object(choice)
    if kind == "error":
        raise UserError(value)
    return value


def _fault_tolerance_callbacks(args: argparse.Namespace, run_dir: Path) -> list:
    from lightning_xd.callbacks import FaultInjector, FaultTolerantCheckpoint, ProgressMarker, parse_fault

    callbacks = [
        FaultTolerantCheckpoint(
            run_dir / "checkpoints",
            args.ckpt_every_steps,
            args.ckpt_every_seconds,
            args.ckpt_min_seconds,
            run=run_identity(args),
        ),
        ProgressMarker(run_dir / "progress.json"),
    ]
    if args.inject_fault:
        callbacks.append(FaultInjector(parse_fault(args.inject_fault)))
    return callbacks


def cluster_environment(strategy) -> ClusterEnvironment | None:
    """The strategy's own cluster environment (every parallel strategy has one; one process has none)."""
    from lightning.pytorch.strategies import ParallelStrategy

    return strategy.cluster_environment if isinstance(strategy, ParallelStrategy) else None


def trainer_placement(strategy, plugins: Sequence = ()) -> dict[str, Any]:
    """The Trainer arguments that put ``strategy``'s processes in place: accelerator, strategy, hosts and
    plugins (``plugins`` and, for a strategy without a cluster environment of its own, Lightning's plain
    one, so that Lightning never probes for MPI itself: that can hang a Trainer outside an MPI job,
    Lightning issue 20049)."""
    from lightning.fabric.plugins.environments import LightningEnvironment
    from lightning.pytorch.strategies import ParallelStrategy

    parallel = isinstance(strategy, ParallelStrategy)
    return {
        "accelerator": strategy.root_device.type,
        "strategy": strategy,
        "num_nodes": strategy.num_nodes if parallel else 1,
        "plugins": [*([] if cluster_environment(strategy) is not None else [LightningEnvironment()]), *plugins],
    }


def build_trainer(settings: dict[str, Any], strategy, callbacks: list) -> Trainer:
    """train.py's Trainer: checkpoints through ``VerifiedCheckpointIO`` (in the background unless
    ``--background-checkpoints false``), TensorBoard logs in the run dir, progress bar and model
    summary on the first process only."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import RichProgressBar
    from lightning.pytorch.loggers import TensorBoardLogger

    from lightning_xd.fault_tolerance.checkpoints import BackgroundCheckpointIO, VerifiedCheckpointIO

    checkpoint_io = VerifiedCheckpointIO(settings["keep_last"])
    io = BackgroundCheckpointIO(checkpoint_io) if settings["background_checkpoints"] else checkpoint_io
    environment = cluster_environment(strategy)
    rank_zero = environment is None or environment.global_rank() == 0
    return Trainer(
        **trainer_placement(strategy, [io]),
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
    join_job(args.nprocs)
    datamodule, model, strategy = build_pieces(args.model, args.data, args.strategy, settings, args.seed)
    run_dir = Path(settings["run_dir"])
    resume_from = _checkpoint_to_resume(args, run_dir)
    callbacks = RunCallbacks.for_run(args, run_dir)
    trainer = build_trainer(settings, strategy, callbacks.all)
    figures = fit_validate_test(trainer, model, datamodule, resume_from, callbacks)
    metrics = {**collect_metrics(args, trainer, figures), "wall_time_s": time.perf_counter() - started}
    if trainer.is_global_zero:
        write_results(run_dir, metrics)
    if declared(strategy).recoveries():
        from lightning_xd.comm.ulfm import leave_after_failure

        leave_after_failure()
    return metrics


def join_job(nprocs: int) -> None:
    """In an MPI job: check that it has ``nprocs`` processes, quiet every rank but the first, and give
    this process its share of the host's cores. Outside one, nothing."""
    if not in_mpi_job():
        return
    from lightning_xd.comm.communicator import world

    if world().size != nprocs:
        raise UserError(
            f"--nprocs {nprocs} but this MPI job has {world().size} processes; "
            "drop mpirun and let --nprocs start the job"
        )
    _quiet_unless_rank_zero(world().rank)
    share_cores(world().local())


def build_pieces(
    model: str,
    data: str,
    strategy: str,
    settings: dict[str, Any],
    seed: int,
    strategy_settings: dict | None = None,
    prepare: bool = True,
) -> tuple[Any, Any, Any]:
    """Datamodule, model and strategy from their names and the settings their constructors accept
    (``strategy_settings`` for the strategy only), from ``seed``. The data is prepared once per host
    (``prepare``; a collective in an MPI job, so ``prepare=False`` where it was prepared before) and
    the model built after it (its shapes come from the data), inside the strategy's
    ``tensor_init_context`` as ``trainer.init_module()`` would: the hybrid strategy builds only its
    own stages."""
    from lightning.pytorch import seed_everything

    seed_everything(seed, workers=True, verbose=False)
    datamodule = DATAMODULES.build(data, settings)
    built_strategy = STRATEGIES.build(strategy, {**settings, **(strategy_settings or {})})
    if prepare:
        prepare_data_once_per_host(datamodule)
    with built_strategy.tensor_init_context():
        built_model = MODELS.build(model, settings, **datamodule.model_kwargs())
    return datamodule, built_model, built_strategy


@dataclass
class RunCallbacks:
    """train.py's callbacks, in the order their hooks run; ``summary`` and ``checkpoints`` give figures."""

    summary: Any
    checkpoints: Any
    all: list

    @classmethod
    def for_run(cls, args: argparse.Namespace, run_dir: Path) -> RunCallbacks:
        from lightning_xd.callbacks import RunEvents, RunSummary, StragglerDelay, parse_straggler
        from lightning_xd.viz import TrainingDashboard

        summary = RunSummary()
        straggler = [StragglerDelay(*parse_straggler(args.straggler_delay))] if args.straggler_delay else []
        events = RunEvents(run_dir)
        dashboard = TrainingDashboard(run_dir, args.dashboard_every, args.dashboard_video, events=events)
        fault_tolerance = _fault_tolerance_callbacks(args, run_dir)
        return cls(summary, fault_tolerance[0], [*straggler, summary, events, dashboard, *fault_tolerance])


def fit_validate_test(trainer: Trainer, model, datamodule, resume_from: str | None, callbacks: RunCallbacks) -> dict:
    """Fit (from ``resume_from``, if given), then validate and test; the figures of all three. The
    training figures are reduced over the job (every rank takes part) between fitting and validating."""
    trainer.fit(model, datamodule=datamodule, ckpt_path=resume_from)
    totals = {**callbacks.summary.totals(trainer), **checkpoint_overhead(callbacks.checkpoints, callbacks.summary)}
    validated = trainer.validate(model, datamodule=datamodule, verbose=False)
    tested = trainer.test(model, datamodule=datamodule, verbose=trainer.is_global_zero)
    return {**(validated[0] if validated else {}), **(tested[0] if tested else {}), **totals}


def collect_metrics(args: argparse.Namespace, trainer: Trainer, figures: dict) -> dict[str, Any]:
    """What metrics.json holds, but for the wall time: the run's names and size, the figures of
    ``fit_validate_test`` and the strategy's own (which win over those of the same name)."""
    return {
        **run_identity(args),
        "world_size": trainer.world_size,
        **figures,
        **declared(trainer.strategy).summary_metrics(),
    }


def write_results(run_dir: Path, metrics: dict[str, Any]) -> None:
    """``metrics.json``, then ``COMPLETED``: the supervisor's sign that the run finished."""
    write_json_atomically(run_dir / "metrics.json", metrics)
    (run_dir / "COMPLETED").write_text(f"{time.time()}\n")


def checkpoint_overhead(checkpoints, summary) -> dict[str, float]:
    """Time spent saving checkpoints, against the time spent in training steps (this process)."""
    saves = checkpoints.save_seconds
    return {
        "checkpoint/saves": len(saves),
        "checkpoint/save_s_mean": sum(saves) / max(1, len(saves)),
        "checkpoint/overhead_pct": 100.0 * sum(saves) / max(summary.step_seconds, 1e-9),
    }
