"""The ``mpi`` strategy's cases, then the same cases under Lightning's DDP (gloo), in one 2-rank MPI job.

usage: mpi_job.py --out DIR --cases CASE/STRATEGY [CASE/STRATEGY ...]   (cases and strategies: conformance.cases)
Every DDP case must come after every other one: once DDP has set up its gloo process group, it stays for the
rest of the job; it is destroyed before the job exits (its threads would abort MPI's finalisation).
"""

import torch

from conformance.cases import CASES
from conformance.harness import job_arguments, run

if __name__ == "__main__":
    args = job_arguments(__doc__)
    try:
        run(args.out, CASES, args.cases)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
