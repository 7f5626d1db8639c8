"""Our strategies under names Lightning's Trainer accepts: ``Trainer(strategy="mpi")`` after ``import lightning_xd``.

Every module of ``lightning_xd.strategies`` is registered in Lightning's own ``StrategyRegistry`` under
its command-line name (the module's name, without the ``_`` that ``async_`` needs), as a factory that
imports the module only when the Trainer asks for it: importing this package stays light, starts no
MPI and imports no strategy. Names Lightning already has (``ddp``) stay Lightning's. The
``*_find_unused_parameters_true`` name follows Lightning's ``ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from collections.abc import Callable
from typing import Any

# Lightning names that are one of ours with a setting: name -> (strategy, constructor arguments)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "mpi_find_unused_parameters_true": ("mpi", {"find_unused_parameters": True}),
}


def strategy_modules() -> dict[str, str]:
    """Command-line name -> module, read from the package's folder without importing any of them."""
    folder = importlib.util.find_spec("lightning_xd.strategies").submodule_search_locations
    return {
        info.name.rstrip("_"): f"lightning_xd.strategies.{info.name}"
        for info in pkgutil.iter_modules(folder)
        if not info.name.startswith("_")
    }


def _factory(name: str, module: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        from lightning_xd.launch.registry import STRATEGIES

        importlib.import_module(module)  # registers the name
        return STRATEGIES.get(name).build(**kwargs)

    build.__name__ = f"{name}_strategy"
    return build


def register_with_lightning() -> None:
    """Add our names to Lightning's registry (names Lightning already has are left alone)."""
    from lightning.pytorch.strategies import StrategyRegistry

    modules = strategy_modules()
    for name, module in modules.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, _factory(name, module), description=f"lightning_xd's {name!r} strategy")
    for name, (strategy, params) in VARIANTS.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name, _factory(strategy, modules[strategy]), description=f"{strategy} with {params}", **params
            )
