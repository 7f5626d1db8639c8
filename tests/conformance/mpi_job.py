"""The ``mpi`` strategy's cases, then the same cases under Lightning's DDP (gloo), in one 2-rank MPI job.

usage: mpi_job.py OUT_DIR CASE/STRATEGY [CASE/STRATEGY ...]   (cases and strategies: conformance.cases)
Every DDP case must come after every other one: once DDP has set up its gloo process group, it stays for the
rest of the job; it is destroyed before the job exits (its threads would abort MPI's finalisation).
"""

import sys
from pathlib import Path

import torch

from conformance.cases import CASES
from conformance.harness import run

if __name__ == "__main__":
    try:
        run(Path(sys.argv[1]), CASES, sys.argv[2:])
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
