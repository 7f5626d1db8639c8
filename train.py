"""Train any registered model with any registered strategy.

    python train.py --model gcn --strategy mpi --nprocs 2

With ``--nprocs N`` > 1 (or ``--max-restarts R`` > 0) this command re-runs itself under mpirun
and watches the job (``lightning_xd.fault_tolerance.supervisor``); inside the job it trains.
"""

import os
import sys

from lightning_xd.comm.environment import in_mpi_job
from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.supervisor import Supervisor
from lightning_xd.files import keep_others_from_writing
from lightning_xd.launch import cli, runner


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    keep_others_from_writing()  # run dir, checkpoints, caches: not writable by other users
    try:
        args = cli.parse_args(argv)
        import lightning_xd.datamodules  # noqa: F401  (registers the names)
        import lightning_xd.models  # noqa: F401
        import lightning_xd.strategies  # noqa: F401

        if args.list:
            print(cli.registered_names())
            return 0
        starts_processes = not in_mpi_job() and os.environ.get("XD_SUPERVISED") != "1"
        if starts_processes and (args.nprocs > 1 or args.max_restarts > 0):
            settings = runner.check(args)
            return Supervisor(
                __file__,
                argv,
                settings["run_dir"],
                args.nprocs,
                args.hostfile,
                args.launch_agent,
                args.max_restarts,
                args.min_nprocs,
                runner.in_job_recovery(args),
            ).run()
        runner.run(args)
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
