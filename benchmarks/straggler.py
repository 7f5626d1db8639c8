"""One worker slowed down: updates per second of `async` against `mpi`, measured in one run.

    python benchmarks/straggler.py [--model gcn] [--nprocs 3] [--factors 1.5 2 3] [--quick]

The slowed worker is the last rank (a worker in both strategies). Slowed "by a factor f" means
each of its steps takes f times the undisturbed step time, measured first in the same run with
`mpi` and no delay. `mpi` advances at the pace of its slowest rank; `async` applies every
worker's gradients as they arrive, within the staleness bound.
"""
from __future__ import annotations

import argparse

from common import machine, train, write_results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gcn")
    parser.add_argument("--nprocs", type=int, default=3)
    parser.add_argument("--factors", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument("--max-epochs", type=int, default=200)
    parser.add_argument("--staleness", type=int, default=4)
    parser.add_argument("--quick", action="store_true", help="a few epochs: checks the script, not the numbers")
    args = parser.parse_args()
    epochs = 4 if args.quick else args.max_epochs
    common = ["--model", args.model, "--nprocs", str(args.nprocs), "--max-epochs", str(epochs)]

    baseline = train(*common, "--strategy", "mpi")
    step_s = baseline["step_time_s_mean"]
    rows = []
    for factor in args.factors:
        delay = f"{args.nprocs - 1}:{(factor - 1) * step_s:.6f}"
        mpi = train(*common, "--strategy", "mpi", "--straggler-delay", delay)
        asy = train(*common, "--strategy", "async", "--staleness", str(args.staleness), "--straggler-delay", delay)
        rows.append({"factor": factor, "delay_s": (factor - 1) * step_s,
                     "mpi_updates_per_s": mpi["updates_per_s"], "async_updates_per_s": asy["updates_per_s"],
                     "async_over_mpi_updates_per_s": asy["updates_per_s"] / mpi["updates_per_s"],
                     "mpi_test": {k: v for k, v in mpi.items() if k.startswith("test/")},
                     "async_test": {k: v for k, v in asy.items() if k.startswith("test/")},
                     "mpi_wall_time_s": mpi["wall_time_s"], "async_wall_time_s": asy["wall_time_s"],
                     "async_staleness_mean": asy["async/staleness_mean"],
                     "async_staleness_max": asy["async/staleness_max"]})
        print(f"slowed x{factor}: mpi {mpi['updates_per_s']:.1f} updates/s, async {asy['updates_per_s']:.1f} "
              f"updates/s, ratio {rows[-1]['async_over_mpi_updates_per_s']:.2f}; test "
              f"{rows[-1]['mpi_test']} vs {rows[-1]['async_test']}")
    path = write_results("straggler" + ("-quick" if args.quick else ""), {
        "machine": machine(), "model": args.model, "nprocs": args.nprocs, "epochs": epochs,
        "staleness": args.staleness, "undisturbed_step_s": step_s, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
