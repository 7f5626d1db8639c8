"""Train any registered model with any registered strategy.

    python train.py --model gcn --strategy mpi --nprocs 2

With ``--nprocs N`` > 1 this command re-runs itself under mpirun; inside the job it trains.
"""
import sys

from lightning_xd import cli, launcher, runner
from lightning_xd.launcher import in_mpi_job
from lightning_xd.errors import UserError


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = cli.parse_args(argv)
        import datamodules  # noqa: F401  (registers the names)
        import models  # noqa: F401
        import strategies  # noqa: F401

        if args.list:
            print(cli.registered_names())
            return 0
        if args.nprocs > 1 and not in_mpi_job():
            runner.check(args)
            return launcher.run_under_mpirun(args.nprocs, [__file__, *argv], args.hostfile, args.launch_agent)
        runner.run(args)
        return 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
