"""Our strategies under names Lightning's Trainer accepts: ``Trainer(strategy="mpi")`` after ``import lightning_xd``.

Registered in Lightning's own ``StrategyRegistry`` as factories that import the strategy's module only
when the Trainer asks for it, so importing this package stays light and starts no MPI. The
``*_find_unused_parameters_true`` name follows Lightning's ``ddp_find_unused_parameters_true``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name: (module, class, description, constructor arguments)
NAMES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "mpi": ("lightning_xd.strategies.mpi", "MPIAllReduceStrategy", "synchronous data parallelism over MPI", {}),
    "mpi_find_unused_parameters_true": (
        "lightning_xd.strategies.mpi",
        "MPIAllReduceStrategy",
        "mpi, averaging parameters some ranks did not use with zeros",
        {"find_unused_parameters": True},
    ),
    "async": (
        "lightning_xd.strategies.async_",
        "AsyncStaleGradientStrategy",
        "parameter server with bounded staleness",
        {},
    ),
    "hybrid": (
        "lightning_xd.strategies.hybrid",
        "HybridPipelineStrategy",
        "pipeline stages x data-parallel replicas",
        {},
    ),
}


def _factory(module: str, name: str) -> Callable[..., Any]:
    def build(**kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(**kwargs)

    build.__name__ = name
    return build


def register_with_lightning() -> None:
    """Add our names to Lightning's registry (names Lightning already has are left alone)."""
    from lightning.pytorch.strategies import StrategyRegistry

    for name, (module, cls, description, params) in NAMES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, _factory(module, cls), description=description, **params)
