"""Start your own training script on N processes, as train.py's ``--nprocs`` starts ours.

    python -m lightning_xd.launch --nprocs 2 my_script.py --my-flag 1

runs ``mpirun -np 2 ... python -m mpi4py my_script.py --my-flag 1`` with the binding, threads,
forwarded variables and root permissions train.py's launcher gives its ranks, and with ULFM
(``--with-ft ulfm``) so that ``Trainer(strategy="mpi")`` survives a lost process inside the job.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from lightning_xd.errors import UserError
from lightning_xd.launch.launcher import mpirun_command, mpirun_environment


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lightning_xd.launch", description=__doc__.split("\n")[0])
    parser.add_argument("--nprocs", type=int, default=2, help="processes to start (default 2)")
    parser.add_argument("--hostfile", help="Open MPI hostfile: one 'host slots=N' line per machine")
    parser.add_argument("--no-ulfm", action="store_true", help="start without ULFM: a lost process ends the job")
    parser.add_argument("script", help="the Python script every process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="the script's own arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.nprocs < 1:
            raise UserError(f"--nprocs {args.nprocs} is out of range; give a value of at least 1")
        if not Path(args.script).is_file():
            raise UserError(f"script {args.script} not found; give the path of your training script")
        extra = [] if args.no_ulfm else ["--with-ft", "ulfm"]
        env = mpirun_environment()
        command = mpirun_command(args.nprocs, [args.script, *args.args], args.hostfile, extra, env)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return subprocess.run(command, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
