"""One place that maps the names users type (``--model``, ``--data``, ``--strategy``) to classes.

Classes register themselves next to their definition (``@MODELS.register("gcn", data="cora")``);
this module knows none of them. A flag reaches every constructor that has a parameter of the
same name, so ``--lr`` sets a model's ``lr`` and ``--batch-size`` a datamodule's ``batch_size``.

A model also declares the datasets it can train on (``trains_on=``, its own ``data`` first), so a
pair that cannot work is refused by name before any data is read. Values are checked by name too:
``DOMAINS`` says, for parameters that mean the same wherever they appear (``lr``, ``batch_size``,
``hidden_channels``, ``microbatches`` ...), which values make sense; a name belongs there only if it
means the same in every constructor that has it. train.py's own flags and every flag that reaches a
constructor are checked against it as they are parsed (``cli.parse_args``, ``runner.resolve``), in
the launching process before any rank starts, so constructors need not repeat the check and a bad
value is one line naming the flag (or config key), the value and what to give instead.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lightning_xd.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)  # e.g. the model's dataset and epochs
    trains_on: tuple[str, ...] = ()  # models: the datasets it can train on, its default first


class Registry:
    """Names of one kind (model, data or strategy) and what they build."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, trains_on: Sequence[str] = (), **defaults: Any) -> Callable:
        """``trains_on``: the datasets a model can train on; without it, only its default ``data``."""
        own = defaults.get("data")
        datasets = tuple(dict.fromkeys([own, *trains_on] if own else trains_on))

        def decorate(build: Callable) -> Callable:
            if name in self._entries and self._entries[name].build is not build:
                raise ValueError(f"{self.kind} name {name!r} is registered twice")
            self._entries[name] = Entry(name, build, defaults, datasets)
            return build

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get(self, name: str) -> Entry:
        if name not in self._entries:
            raise UserError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {', '.join(self.names())}")
        return self._entries[name]

    def build(self, name: str, settings: dict[str, Any], **fixed: Any) -> Any:
        """Build ``name`` from the settings its constructor accepts (None means "its default")."""
        build = self.get(name).build
        return build(**fixed, **accepted_settings(build, settings, exclude=fixed))


def accepted_settings(build: Callable, settings: dict[str, Any], exclude: dict | None = None) -> dict[str, Any]:
    """The subset of ``settings`` that ``build`` names as parameters, without None values.

    Values that arrive as text (``--hidden-channels 64``) are converted to the parameter's type.
    """
    params = inspect.signature(build).parameters
    exclude = exclude or {}
    return {k: convert(params[k], v) for k, v in settings.items() if k in params and k not in exclude and v is not None}


def flags_of(build: Callable) -> list[str]:
    """The ``--flag=default`` spelling of ``build``'s keyword parameters."""
    params = inspect.signature(build).parameters.values()
    return [
        f"--{p.name.replace('_', '-')}={p.default}"
        for p in params
        if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD
    ]


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def expected_type(param: inspect.Parameter) -> type | None:
    """bool, int, float or str: from the parameter's default, else its annotation; None if neither says."""
    default = param.default
    if default not in (None, inspect.Parameter.empty) and type(default) in (bool, int, float, str):
        return type(default)
    annotation = param.annotation if isinstance(param.annotation, str) else getattr(param.annotation, "__name__", "")
    annotation = annotation.removeprefix("Optional[").replace(" | None", "").rstrip("]")
    return {"bool": bool, "int": int, "float": float, "str": str}.get(annotation)


def convert(param: inspect.Parameter, value: Any, where: str | None = None, typed: bool = False) -> Any:
    """A flag's value converted to the type of the parameter it sets; one-line error if it does not fit.

    Text (the command line) is parsed. With ``typed``, values that arrive already typed (a config
    file's YAML numbers, lists, booleans) must be of the parameter's type too; without it they are
    passed on as they are (settings built in code: paths, numpy numbers ...). ``where`` names the
    value's origin in the error (default: the flag, ``--hidden-channels``)."""
    kind = expected_type(param)
    where = where or flag(param.name)
    if kind is None or not (isinstance(value, str) or typed):
        return value
    if isinstance(value, str):
        try:
            if kind is bool:
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return kind(value)
        except ValueError:
            raise UserError(f"{where} {value!r} is not a valid {_type_name(kind)}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(value, bool) and kind is bool:
        return value
    if number and (kind is float or (kind is int and float(value).is_integer())):
        return kind(value)
    if number and kind is str:
        return str(value)  # a YAML number for a text parameter (``hidden-sizes: 64``)
    raise UserError(f"{where} {value!r} is not a valid {_type_name(kind)}")


def _type_name(kind: type) -> str:
    return "bool (true or false)" if kind is bool else kind.__name__


# ---- the values that make sense ----------------------------------------------------------------
@dataclass(frozen=True)
class Domain:
    """The values a parameter may take (finite numbers only) and, for the error, what to give."""

    holds: Callable[[float], bool]
    give: str


AT_LEAST_ONE = Domain(lambda v: v >= 1, "a value of at least 1")
ABOVE_ZERO = Domain(lambda v: v > 0, "a value above 0")
NOT_NEGATIVE = Domain(lambda v: v >= 0, "a value of 0 or more")
PROBABILITY = Domain(lambda v: 0 <= v < 1, "a value from 0 up to (not including) 1")

DOMAINS: dict[str, Domain] = {
    # train.py's own flags
    "nprocs": AT_LEAST_ONE,
    "min_nprocs": AT_LEAST_ONE,
    "max_epochs": AT_LEAST_ONE,
    "max_steps": Domain(lambda v: v == -1 or v >= 1, "-1 (no limit) or a value of at least 1"),
    "seed": Domain(lambda v: 0 <= v <= 2**32 - 1, "a value from 0 to 4294967295"),
    "log_every_n_steps": NOT_NEGATIVE,
    "dashboard_every": NOT_NEGATIVE,
    "ckpt_every_steps": AT_LEAST_ONE,
    "ckpt_every_seconds": ABOVE_ZERO,
    "ckpt_min_seconds": NOT_NEGATIVE,
    "keep_last": AT_LEAST_ONE,
    "collective_timeout": ABOVE_ZERO,
    "max_restarts": NOT_NEGATIVE,
    # parameters of models, datasets and strategies that mean the same wherever they appear
    "batch_size": AT_LEAST_ONE,
    "lr": ABOVE_ZERO,
    "table_lr": ABOVE_ZERO,
    "weight_decay": NOT_NEGATIVE,
    "momentum": NOT_NEGATIVE,
    "dropout": PROBABILITY,
    "label_smoothing": PROBABILITY,
    "bucket_size_mb": ABOVE_ZERO,
    "microbatches": AT_LEAST_ONE,
    "pipeline_stages": AT_LEAST_ONE,
    "staleness": NOT_NEGATIVE,
    "delay_compensation": NOT_NEGATIVE,
    "hidden_channels": AT_LEAST_ONE,
    "hidden_size": AT_LEAST_ONE,
    "num_layers": AT_LEAST_ONE,
    "out_channels": AT_LEAST_ONE,
    "embedding_dim": NOT_NEGATIVE,  # 0: no learned node table (graphsage)
    "code_size": AT_LEAST_ONE,
    "width": AT_LEAST_ONE,
    "channels": AT_LEAST_ONE,
    "kernel_size": AT_LEAST_ONE,
    "edge_hidden": AT_LEAST_ONE,
    "steps": AT_LEAST_ONE,
    "num_gaussians": AT_LEAST_ONE,
    "cutoff": ABOVE_ZERO,
    "window": AT_LEAST_ONE,
    "horizon": AT_LEAST_ONE,
    "replay_windows": NOT_NEGATIVE,
    "calibration_epochs": NOT_NEGATIVE,
    "ema_decay": PROBABILITY,  # 0: serve the live weights
    "calibration_fraction": PROBABILITY,  # shares of a recording: calibration, validation, held-out test
    "val_fraction": PROBABILITY,
    "test_fraction": PROBABILITY,
}


def check_domain(name: str, value: Any, where: str | None = None) -> None:
    """One-line error if the number ``value`` of parameter ``name`` is outside ``DOMAINS[name]``."""
    domain = DOMAINS.get(name)
    if domain is None or value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if not (math.isfinite(value) and domain.holds(value)):
        shown = f"{value:g}" if isinstance(value, float) else str(value)
        raise UserError(f"{where or flag(name)} {shown} is out of range; give {domain.give}")


MODELS = Registry("model")
DATAMODULES = Registry("data")
STRATEGIES = Registry("strategy")
