"""lightning_xd: distributed-training strategies for PyTorch Lightning over MPI.

The shared core: the MPI communication layer (``comm``), the launcher, the registry of names,
callbacks and visualisation. Models, datamodules and strategies build on it, never the reverse.
Importing this package registers our strategy names with Lightning (``Trainer(strategy="mpi")``)
and does not start MPI; ``comm.world()`` does, on first use.
"""

from lightning_xd.launch.lightning_names import register_with_lightning

__version__ = "0.1.0"

register_with_lightning()
