"""lightning_xd: distributed-training strategies for PyTorch Lightning over MPI.

The shared core: ``contract`` (what callers may ask of any strategy) and ``mpi_strategy`` (the base
of our MPI strategies), ``comm/`` (the only code that calls mpi4py), ``parallel/`` (gradient
averaging, parameter server, pipeline), ``fault_tolerance/``, ``launch/`` (names, flags, runner,
launcher), callbacks and the dashboard. ``lightning_xd.models``, ``lightning_xd.datamodules`` and
``lightning_xd.strategies`` build on it, never the reverse. Importing this package registers our
strategy names with Lightning (``Trainer(strategy="mpi")``), imports no strategy and does not start
MPI; ``comm.communicator.world()`` does, on first use.
"""

from lightning_xd.launch.lightning_names import register_with_lightning

__version__ = "0.1.0"

register_with_lightning()
