"""The command line of ``train.py``: flags, ``--config FILE.yaml`` (the command line wins) and checks.

Flags with a default of None mean "the default of whatever uses it" (the model's epochs, the
datamodule's batch size ...), so a config file or the command line only states what it changes.
Beyond the flags below, any ``--name VALUE`` that names a constructor parameter of the chosen
model, dataset or strategy reaches it (``--hidden-channels 64``, ``--target alpha``); ``--list``
shows them. Names no constructor takes are refused with a one-line error.
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
    how.add_argument("--straggler-delay", metavar="RANK:SECONDS",
                     help="sleep this long after every training step of that rank (straggler experiments)")
    how.add_argument("--dashboard-every", type=int, default=50,
                     help="render the OpenCV dashboard every N steps (0: only at the end)")
    how.add_argument("--dashboard-video", action="store_true", help="also record the dashboard as an MP4")
    ft = p.add_argument_group("fault tolerance")
    ft.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N optimizer steps")
    ft.add_argument("--ckpt-every-seconds", type=float, help="also checkpoint every T seconds")
    ft.add_argument("--ckpt-min-seconds", type=float, default=10.0,
                    help="skip an epoch-end checkpoint while the newest one is younger than this")
    ft.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (every epoch end is one)")
    ft.add_argument("--background-checkpoints", type=lambda v: v.lower() in ("1", "true", "yes"), default=True,
                    metavar="true|false", help="write checkpoints from a snapshot in a background thread")
    ft.add_argument("--resume", default="auto",
                    help="auto: newest verified checkpoint of an unfinished run; never; or a checkpoint PATH")
    ft.add_argument("--fault-tolerance", choices=["ulfm", "none"], default="ulfm",
                    help="ulfm: survive killed processes inside the running job (MPI ULFM)")
    ft.add_argument("--collective-timeout", type=float, default=300.0,
                    help="seconds a collective may wait before it counts as a failure (watchdog)")
    ft.add_argument("--max-restarts", type=int, default=0,
                    help="relaunch a job that ended without finishing, from its last checkpoint")
    ft.add_argument("--min-nprocs", type=int, help="fewest processes a relaunch may run on (default 1)")
    ft.add_argument("--inject-fault", metavar="MODE:rank=R,step=S",
                    help="kill | exit | hang | during-checkpoint, for testing recovery")
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
    return {str(k).replace("-", "_"): v for k, v in loaded.items()}


def _extra_flags(tokens: Sequence[str]) -> dict[str, Any]:
    """``--name VALUE`` / ``--name=VALUE`` / ``--switch`` pairs that the parser does not define."""
    extra: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) < 3:
            raise UserError(f"unexpected argument {token!r}; flags look like --name value")
        name, has_value, value = token[2:].partition("=")
        if not has_value:
            has_next = i + 1 < len(tokens) and not tokens[i + 1].startswith("--")
            value = tokens[i + 1] if has_next else "true"
            i += has_next
        extra[name.replace("-", "_")] = value
        i += 1
    return extra


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed flags; those for a model, dataset or strategy are in ``args.extra`` (checked later)."""
    parser = build_parser()
    first, _ = parser.parse_known_args(argv)
    from_file = _config_defaults(parser, first.config) if first.config else {}
    known = {a.dest for a in parser._actions}
    parser.set_defaults(**{k: v for k, v in from_file.items() if k in known})
    args, rest = parser.parse_known_args(argv)
    args.extra = {**{k: v for k, v in from_file.items() if k not in known}, **_extra_flags(rest)}
    if args.nprocs < 1:
        raise UserError(f"--nprocs must be at least 1, got {args.nprocs}")
    return args


def default_run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or f"runs/{args.model}-{args.data}-{args.strategy}")


def registered_names() -> str:
    """Every registered name with the flags its constructor takes."""
    from lightning_xd.registry import DATAMODULES, MODELS, STRATEGIES, flags_of

    lines = []
    for registry in (MODELS, DATAMODULES, STRATEGIES):
        lines.append(f"{registry.kind}:")
        for name in registry.names():
            entry = registry.get(name)
            defaults = "".join(f" [{k}={v}]" for k, v in entry.defaults.items())
            lines.append(f"  {name:16}{defaults} {' '.join(flags_of(entry.build))}")
    return "\n".join(lines)
