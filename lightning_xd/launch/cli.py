"""The command line of ``train.py``: flags, ``--config FILE.yaml`` (the command line wins) and checks.

Flags with a default of None mean "the default of whatever uses it" (the model's epochs, the
datamodule's batch size ...), so a config file or the command line only states what it changes.
Beyond the flags below, any ``--name VALUE`` that names a constructor parameter of the chosen
model, dataset or strategy reaches it (``--hidden-channels 64``, ``--target alpha``); ``--list``
shows them. Names no constructor takes are refused with a one-line error.

Every mistake is one line (``UserError``), never argparse's usage text: a value of the wrong type
(on the command line or in the config file, whose errors name the file and the key) or outside
its domain (``registry.DOMAINS``: ``--max-epochs 0``, ``--lr -1``). A config value is checked
only where the command line does not override it.
"""

from __future__ import annotations

import argparse
import inspect
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from lightning_xd.errors import UserError
from lightning_xd.launch.registry import check_domain, convert

_UNSET = object()  # marks the flags the command line does not give


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        raise UserError(f"{message}; `python train.py --help` lists the flags and their values")


def true_or_false(text: str) -> bool:
    if text.lower() not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(text)
    return text.lower() in ("1", "true", "yes")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="train.py",
        description="Train any registered model with any registered strategy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
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
    how.add_argument(
        "--straggler-delay",
        metavar="RANK:SECONDS",
        help="sleep this long after every training step of that rank (straggler experiments)",
    )
    how.add_argument(
        "--dashboard-every", type=int, default=50, help="render the OpenCV dashboard every N steps (0: only at the end)"
    )
    how.add_argument("--dashboard-video", action="store_true", help="also record the dashboard as an MP4")
    ft = p.add_argument_group("fault tolerance")
    ft.add_argument("--ckpt-every-steps", type=int, help="also checkpoint every N optimizer steps")
    ft.add_argument("--ckpt-every-seconds", type=float, help="also checkpoint every T seconds")
    ft.add_argument("--ckpt-min-seconds", type=float, default=10.0, help="skip epoch-end checkpoints closer than T s")
    ft.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (every epoch end is one)")
    ft.add_argument(
        "--background-checkpoints",
        type=true_or_false,
        default=True,
        metavar="true|false",
        help="write checkpoints from a snapshot in a background thread",
    )
    ft.add_argument(
        "--resume",
        default="auto",
        help="auto: newest verified checkpoint of an unfinished run; never; or a checkpoint PATH",
    )
    ft.add_argument(
        "--fault-tolerance",
        choices=["ulfm", "none"],
        default="ulfm",
        help="ulfm: survive killed processes inside the running job (MPI ULFM)",
    )
    ft.add_argument("--collective-timeout", type=float, default=300.0, help="watchdog: seconds a collective may wait")
    ft.add_argument("--max-restarts", type=int, default=0, help="relaunch an unfinished job from its last checkpoint")
    ft.add_argument("--min-nprocs", type=int, help="fewest processes a relaunch may run on (default 1)")
    ft.add_argument(
        "--inject-fault",
        metavar="MODE:rank=R,step=S",
        help="kill | exit | hang | during-checkpoint, for testing recovery",
    )
    files = p.add_argument_group("files")
    files.add_argument(
        "--data-dir",
        default=os.environ.get("XD_DATA_DIR", "./data"),
        help="datasets, laid out as ../shared/data ($XD_DATA_DIR)",
    )
    files.add_argument(
        "--cache-dir",
        default=os.environ.get("XD_CACHE_DIR"),
        help="preprocessed data; default: <data-dir>/cache if writable, else ~/.cache/lightning_xd",
    )
    files.add_argument("--run-dir", help="logs, checkpoints, metrics.json; default: runs/<model>-<data>-<strategy>")
    files.add_argument(
        "--trust-data-dir",
        action="store_true",
        default=None,
        help="open pickled raw files (Planetoid, CIFAR-10 batches) that are not the published release's "
        "($XD_TRUST_DATA_DIR=1); they are still read without running code",
    )
    return p


def _read_config(path: str) -> dict[str, tuple[str, Any]]:
    """``{flag name: (key as written, value)}`` of a YAML config file."""
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
    return {str(k).replace("-", "_"): (str(k), v) for k, v in loaded.items()}


def _typed(action: argparse.Action, value: Any, where: str) -> Any:
    """A config file's value for one of the parser's flags, converted to the flag's type and checked."""
    boolean = isinstance(action, argparse._StoreTrueAction) or action.type is true_or_false
    kind = bool if boolean else action.type if action.type in (int, float) else str
    value = convert(
        inspect.Parameter(action.dest, inspect.Parameter.KEYWORD_ONLY, annotation=kind.__name__),
        value,
        where,
        typed=True,
    )
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} {value!r} is not one of {', '.join(map(str, action.choices))}")
    check_domain(action.dest, value, where)
    return value


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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked flags; those for a model, dataset or strategy are in ``args.extra`` (checked
    by the runner against the constructors), with ``args.extra_from`` naming the config file and key
    of those that came from one."""
    parser = build_parser()
    actions = {a.dest: a for a in parser._actions if a.dest != "help"}
    given, _ = parser.parse_known_args(argv, argparse.Namespace(**dict.fromkeys(actions, _UNSET)))
    on_command_line = {dest for dest, value in vars(given).items() if value is not _UNSET}
    path = given.config if "config" in on_command_line else None
    from_file = _read_config(path) if path else {}
    where = {dest: f"config file {path}, key {key}:" for dest, (key, _) in from_file.items()}
    parser.set_defaults(
        **{
            dest: _typed(actions[dest], value, where[dest])
            for dest, (_, value) in from_file.items()
            if dest in actions and dest not in on_command_line and value is not None
        }
    )
    args, rest = parser.parse_known_args(argv)
    extra = _extra_flags(rest)
    from_file = {dest: value for dest, (_, value) in from_file.items() if dest not in actions and value is not None}
    args.extra = {**from_file, **extra}
    args.extra_from = {dest: where[dest] for dest in from_file if dest not in extra}
    for dest in on_command_line:
        check_domain(dest, getattr(args, dest))
    if args.max_restarts > 0 and args.min_nprocs is not None and args.min_nprocs > args.nprocs:
        raise UserError(
            f"--min-nprocs {args.min_nprocs} exceeds --nprocs {args.nprocs}; give at most {args.nprocs} "
            "(the fewest processes a restart may run on)"
        )
    return args


def default_run_dir(args: argparse.Namespace) -> Path:
    return Path(args.run_dir or f"runs/{args.model}-{args.data}-{args.strategy}")


def registered_names() -> str:
    """Every registered name with the flags its constructor takes: a model's defaults and datasets,
    a strategy's declared traits (``strategy_traits``)."""
    from lightning_xd.launch.registry import DATAMODULES, MODELS, STRATEGIES, flags_of

    lines = []
    for registry in (MODELS, DATAMODULES, STRATEGIES):
        lines.append(f"{registry.kind}:")
        for name in registry.names():
            entry = registry.get(name)
            if registry is STRATEGIES:
                notes = "".join(f" [{trait}]" for trait in strategy_traits(entry.build))
            else:
                notes = "".join(f" [{k}={v}]" for k, v in entry.defaults.items())
            trains_on = f" trains on {', '.join(entry.trains_on)};" if registry is MODELS else ""
            lines.append(f"  {name:16}{notes}{trains_on} {' '.join(flags_of(entry.build))}")
    return "\n".join(lines)


def strategy_traits(strategy: Any) -> list[str]:
    """What a strategy (class) declares that differs from plain synchronous training, in words."""
    from lightning_xd.contract import declared

    contract = declared(strategy)
    traits = []
    if contract.max_processes is not None:
        traits.append(f"at most {contract.max_processes} process(es)")
    if contract.supports_in_job_recovery:
        traits.append("in-job recovery")
    if not contract.is_synchronous:
        traits.append("asynchronous")
    if contract.saves_own_checkpoints:
        traits.append("saves its own checkpoints")
    return traits
