"""One place that maps the names users type (``--model``, ``--data``, ``--strategy``) to classes.

Classes register themselves next to their definition (``@MODELS.register("gcn", data="cora")``);
this module knows none of them. A flag reaches every constructor that has a parameter of the
same name, so ``--lr`` sets a model's ``lr`` and ``--batch-size`` a datamodule's ``batch_size``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

from lightning_xd.errors import UserError


@dataclass(frozen=True)
class Entry:
    name: str
    build: Callable[..., Any]
    defaults: dict[str, Any] = field(default_factory=dict)  # e.g. the model's dataset and epochs


class Registry:
    """Names of one kind (model, data or strategy) and what they build."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **defaults: Any) -> Callable:
        def decorate(build: Callable) -> Callable:
            if name in self._entries and self._entries[name].build is not build:
                raise ValueError(f"{self.kind} name {name!r} is registered twice")
            self._entries[name] = Entry(name, build, defaults)
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
    return {k: convert(params[k], v) for k, v in settings.items()
            if k in params and k not in exclude and v is not None}


def flags_of(build: Callable) -> list[str]:
    """The ``--flag=default`` spelling of ``build``'s keyword parameters."""
    params = inspect.signature(build).parameters.values()
    return [f"--{p.name.replace('_', '-')}={p.default}" for p in params
            if p.default is not inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD]


def convert(param: inspect.Parameter, value: Any) -> Any:
    """A flag's text converted to the type of the parameter it sets; one-line error if it does not fit."""
    if not isinstance(value, str):
        return value
    kind = param.default if param.default not in (None, inspect.Parameter.empty) else None
    annotation = str(param.annotation)
    flag = f"--{param.name.replace('_', '-')}"
    try:
        if isinstance(kind, bool) or annotation.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if isinstance(kind, int) or annotation.startswith("int"):
            return int(value)
        if isinstance(kind, float) or annotation.startswith("float"):
            return float(value)
    except ValueError:
        raise UserError(f"{flag} {value!r} is not a valid {type(kind).__name__ if kind is not None else annotation}")
    return value


MODELS = Registry("model")
DATAMODULES = Registry("data")
STRATEGIES = Registry("strategy")
