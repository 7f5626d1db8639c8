"""The command line of ``train.py``: flags, ``--config FILE.yaml`` (the command line wins) and checks.

Flags with a default of None mean "the default of whatever uses it" (the model's epochs, the
datamodule's batch size ...), so a config file or the command line only states what it changes.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

from lightning_xd.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="train.py", description="Train any registered model with any registered strategy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--config", help="YAML file of flags (names with - or _); the command line wins")
    what = p.add_argument_group("what to train")
    what.add_argument("--model", help="model name (see --list)")
    what.add_argument("--data", help="dataset name; default: the model's own dataset")
    what.add_argument("--strategy", default="single", help="single | ddp | mpi | ... (see --list)")
    what.add_argument("--list", action="store_true", help="print the registered names and exit")
    where = p.add_argument_group("processes")
    where.add_argument("--nprocs", type=int, default=1, help="number of processes (starts mpirun when > 1)")
    where.add_argument("--hostfile", help="Open MPI hostfile to spread processes over machines")
    where.add_argument("--launch-agent", help="command that starts remote daemons (PRTE_MCA_plm_ssh_agent)")
    how = p.add_argument_group("training")
    how.add_argument("--max-epochs", type=int, help="default: the model's own")
    how.add_argument("--max-steps", type=int, default=-1, help="optimizer steps; -1 means no limit")
    how.add_argument("--batch-size", type=int, help="per-process batch size; default: the dataset's own")
    how.add_argument("--lr", type=float, help="learning rate; default: the model's own")
    how.add_argument("--seed", type=int, default=42)
    how.add_argument("--fast-dev-run", action="store_true", help="one batch of train/val/test, no logs kept")
    how.add_argument("--bucket-size-mb", type=float, help="mpi strategy: gradient bucket size (default 25)")
    how.add_argument("--log-every-n-steps", type=int, default=10)
    files = p.add_argument_group("files")
    files.add_argument("--data-dir", default=os.environ.get("XD_DATA_DIR", "./data"),
                       help="datasets, laid out as ../shared/data ($XD_DATA_DIR)")
    files.add_argument("--cache-dir", default=os.environ.get("XD_CACHE_DIR"),
                       help="preprocessed data; default: <data-dir>/cache if writable, else ~/.cache/lightning_xd")
    files.add_argument("--run-dir", help="logs, checkpoints, metrics.json; default: runs/<model>-<data>-<strategy>")
    return p


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except yaml.YAMLError as err:
        raise UserError(f"config file {path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"config file {path} must be a mapping of flag names to values")
    known = {a.dest for a in parser._actions}
    settings = {str(k).replace("-", "_"): v for k, v in loaded.items()}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UserError(f"config file {path} has unknown keys {unknown}; use flag names such as max_epochs")
    return settings


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    if first.config:
        parser.set_defaults(**_config_defaults(parser, first.config))
    args = parser.parse_args(argv)
    if args.nprocs < 1:
        raise UserError(f"--nprocs must be at least 1, got {args.nprocs}")
    return args


def default_run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or f"runs/{args.model}-{args.data}-{args.strategy}")


def registered_names() -> str:
    from lightning_xd.registry import DATAMODULES, MODELS, STRATEGIES

    lines = []
    for registry in (MODELS, DATAMODULES, STRATEGIES):
        lines.append(f"{registry.kind + ':':10} {', '.join(registry.names())}")
    return "\n".join(lines)
