"""Several ``train.py`` runs in one process (or one MPI job), for tests that would otherwise start
one ~9 s process (or a 12-20 s mpirun job) per run.

    python batch_runs.py --spec SPEC.json --results RESULTS.json            # world size 1
    mpirun -np 2 python -m mpi4py batch_runs.py --spec SPEC --results RESULTS  # every run with --nprocs 2

SPEC is a list of {"name": ..., "argv": [...]}; each argv goes through ``train.main`` in turn,
its stdout and stderr captured, and a run that fails does not stop the others. The first
process writes {name: {"code", "output", "seconds"}} to RESULTS.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_all(spec: list[dict]) -> dict:
    import train

    outcomes = {}
    for run in spec:
        captured, started = io.StringIO(), time.perf_counter()
        # Lightning's log handler holds the stream it was made with: give it ours too
        handler, lightning_log = logging.StreamHandler(captured), logging.getLogger("lightning.pytorch")
        lightning_log.addHandler(handler)
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                code = train.main(run["argv"])
        except Exception:  # a broken run must not hide the others
            code = 1
            captured.write(traceback.format_exc())
        finally:
            lightning_log.removeHandler(handler)
        output = captured.getvalue()
        outcomes[run["name"]] = {
            "code": code,
            "output": output[:3000] + "\n...\n" + output[-4000:],
            "seconds": time.perf_counter() - started,
        }
        print(
            f"{run['name']}: exit {code} in {outcomes[run['name']]['seconds']:.1f} s", file=sys.__stderr__, flush=True
        )
    return outcomes


def main(spec_path: str, results_path: str) -> None:
    outcomes = run_all(json.loads(Path(spec_path).read_text()))
    from lightning_xd.comm.environment import in_mpi_job

    first = True
    if in_mpi_job():
        from lightning_xd.comm.communicator import world

        first = world().rank == 0
    if first:
        Path(results_path).write_text(json.dumps(outcomes, indent=2))


if __name__ == "__main__":
    sys.path[:0] = [str(REPO), str(REPO / "tests")]
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--spec", required=True, help="the runs, as JSON")
    parser.add_argument("--results", required=True, help="where the first process writes their outcomes")
    args = parser.parse_args()
    main(args.spec, args.results)
