"""lightning_xd: distributed-training strategies for PyTorch Lightning over MPI.

The shared core: the MPI communication layer (``comm``), the launcher, the registry of names,
callbacks and visualisation. Models, datamodules and strategies build on it, never the reverse.
Importing this package does not start MPI; ``comm.world()`` does, on first use.
"""
__version__ = "0.1.0"
