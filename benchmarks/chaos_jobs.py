"""One ``train.py`` job of the chaos benchmark, watched while it runs.

The job's output is read as it arrives, so the moment the fault injector announces its kill is
known to within the output's forwarding delay: that is where "time to recover" starts. A job
has finished when ``<run_dir>/COMPLETED`` exists (exit codes are not trusted, as in the
supervisor); one that outlives its timeout is ended, process group and all.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import REPO

# "fault injection: kill on pid 123" (a trailing "at <unix time>" is used when the injector prints one)
FAULT_LINE = re.compile(r"fault injection: \S+ on pid \d+(?: at (?P<at>[\d.]+))?")
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# Set by train.py's supervisor for the jobs it starts; inherited, they would disarm the fault injector.
SUPERVISOR_VARIABLES = ("XD_ATTEMPT", "XD_SUPERVISED", "XD_FAULT_TOLERANCE")


@dataclass
class Job:
    run_dir: Path
    log: Path
    returncode: int | None = None
    wall_time_s: float = 0.0
    fault_at: float | None = None  # unix time the fault injector announced its fault
    timed_out: bool = False
    extra: dict = field(default_factory=dict)  # what a watcher recorded (the emulated-host kill)

    @property
    def completed(self) -> bool:
        return (self.run_dir / "COMPLETED").exists()

    def metrics(self) -> dict:
        try:
            return json.loads((self.run_dir / "metrics.json").read_text())
        except (OSError, ValueError):
            return {}

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the job's output, without colours and progress-bar redraws."""
        text = ANSI.sub("", self.log.read_text(errors="replace")).replace("\r", "\n")
        kept = [line.rstrip() for line in text.splitlines() if line.strip() and "it/s" not in line]
        return "\n".join(kept[-lines:])


def job_environment(extra: dict | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SUPERVISOR_VARIABLES}
    env.update(extra or {})
    return env


def _read_output(proc: subprocess.Popen, log: Path, job: Job) -> None:
    """Copy the job's output to its log, noting when the fault line arrives."""
    with log.open("w") as out:
        for line in proc.stdout:
            if job.fault_at is None:
                found = FAULT_LINE.search(line)
                if found:
                    job.fault_at = float(found["at"]) if found["at"] else time.time()
            out.write(line)


def _end(proc: subprocess.Popen) -> None:
    """Terminate the job's whole process group (mpirun and its ranks), then kill what is left."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_train(
    argv: list[str], run_dir: Path, timeout: float, env: dict | None = None, watch: Callable[[Job], None] | None = None
) -> Job:
    """Run ``train.py ARGV --run-dir RUN_DIR`` to its end (or its timeout); ``watch(job)`` is called
    about ten times a second while it runs."""
    run_dir.mkdir(parents=True, exist_ok=True)
    job = Job(run_dir, run_dir.with_name(run_dir.name + ".log"))
    cmd = [sys.executable, str(REPO / "train.py"), *argv, "--run-dir", str(run_dir)]
    started = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=run_dir.parent,
        env=job_environment(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,
    )
    reader = threading.Thread(target=_read_output, args=(proc, job.log, job), daemon=True)
    reader.start()
    try:
        while proc.poll() is None:
            if time.perf_counter() - started > timeout:
                job.timed_out = True
                _end(proc)
                break
            if watch is not None:
                watch(job)
            time.sleep(0.1)
    finally:
        if proc.poll() is None:  # interrupted: leave nothing running
            _end(proc)
    reader.join(timeout=10)
    job.returncode, job.wall_time_s = proc.returncode, time.perf_counter() - started
    return job
