"""Distribution strategies; importing this package registers every one of them by name."""
from strategies import ddp, mpi_allreduce, single  # noqa: F401
