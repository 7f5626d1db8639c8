"""Each rank, placed by the launcher's mpirun command, reports the cores it may run on and the threads
torch was given for them.  usage: report_cores.py --out FILE.json"""

import argparse
import json
from pathlib import Path

import torch

from lightning_xd.comm.communicator import world
from lightning_xd.launch.cores import allowed_cores, share_cores

parser = argparse.ArgumentParser(description=__doc__)
parser.add_argument("--out", type=Path, required=True)
args = parser.parse_args()
threads = share_cores(world().local())
rows = world().allgather_object(
    {"cores": sorted(allowed_cores()), "threads": threads, "torch_threads": torch.get_num_threads()}
)
if world().rank == 0:
    args.out.write_text(json.dumps(rows))
