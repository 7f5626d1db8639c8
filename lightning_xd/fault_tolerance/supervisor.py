"""``--max-restarts R``: relaunch a job that ended without finishing, from its last good checkpoint.

mpirun's exit code is not trusted (after losing a host's daemon it has exited 0 here): a job
has finished when its first process wrote ``<run_dir>/COMPLETED``. Otherwise, while restarts
remain, the job is started again on the hosts that still answer (at least ``--min-nprocs``
processes) and resumes from its newest verified checkpoint (``--resume auto``). Restarts,
downtime (last progress of the failed attempt to first step of the next) and steps redone go
to the log and to ``metrics.json``; every attempt's record goes to ``<run_dir>/attempts.json`` as it
ends, from which the relaunched job draws the restarts on its dashboard.

With a hostfile, every remote host is asked before the first start whether it answers through the
launch agent Open MPI will start its daemons with (``launch_agent``); one that does not is an
error naming it, since the job could never start there. While the job runs they are asked again
every few seconds, and one that stops answering ends the job for a restart without it.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from lightning_xd.errors import UserError
from lightning_xd.fault_tolerance.progress_marker import read_progress
from lightning_xd.files import write_json_atomically
from lightning_xd.launch.launcher import mpirun_command, mpirun_environment

ATTEMPTS_FILE = "attempts.json"  # in the run dir: every attempt so far, rewritten after each one ends
LOCAL_HOSTS = ("localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0])
HOST_CHECK_SECONDS = 2.0  # how often a running job's remote hosts are asked whether they still answer


def _end(proc: subprocess.Popen, grace: float = 10.0) -> int:
    """Stop mpirun (it stops its processes and daemons); kill it if it does not go within ``grace``."""
    proc.terminate()
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def with_flag(argv: Sequence[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replaced if present, removed if value is None)."""
    out, skip = [], False
    for _i, token in enumerate(argv):
        if skip:
            skip = False
            continue
        if token == flag:
            skip = True
            continue
        if token.startswith(flag + "="):
            continue
        out.append(token)
    return out + ([flag, value] if value is not None else [])


def read_hostfile(path: str) -> list[tuple[str, int]]:
    """``[(host, slots)]`` of an Open MPI hostfile (``host slots=N`` lines, ``#`` comments)."""
    try:
        text = Path(path).read_text()
    except OSError as err:
        raise UserError(
            f"hostfile {path} {'not found' if isinstance(err, FileNotFoundError) else 'unreadable'}; "
            "give a file with one 'host slots=N' line per machine"
        ) from None
    hosts = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            try:
                slots = next((int(f.split("=", 1)[1]) for f in fields[1:] if f.startswith("slots=")), 1)
            except ValueError:
                slots = 0
            if slots < 1:
                raise UserError(f"hostfile {path}: {line.strip()!r} is not 'host slots=N' with N of at least 1")
            hosts.append((fields[0], slots))
    return hosts


def launch_agent(given: str | None = None) -> str:
    """The command Open MPI starts remote daemons with: ``--launch-agent``, else PRRTE's
    ``PRTE_MCA_plm_ssh_agent``, else the older ``OMPI_MCA_plm_rsh_agent`` (which Open MPI 5 itself
    ignores; the supervisor hands it on as PRRTE's, see ``Supervisor._environment``), else ssh. A list
    of alternatives (``ssh : rsh``) means, as for PRRTE, the first whose program is installed."""
    agent = given or os.environ.get("PRTE_MCA_plm_ssh_agent") or os.environ.get("OMPI_MCA_plm_rsh_agent") or "ssh"
    choices = [choice.strip() for choice in agent.split(":") if choice.strip()] or ["ssh"]
    return next((c for c in choices if shutil.which(shlex.split(c)[0])), choices[0])


def _answers(agent: str, host: str) -> bool:
    try:
        return subprocess.run([*shlex.split(agent), host, "true"], capture_output=True, timeout=15).returncode == 0
    except (subprocess.TimeoutExpired, OSError):
        return False


def answering_hosts(hosts: list[tuple[str, int]], agent: str | None) -> list[tuple[str, int]]:
    """The hosts on which the launch agent can still run a command (asked all at once)."""
    agent = agent or launch_agent()
    remote = [host for host, _ in hosts if host not in LOCAL_HOSTS]
    with ThreadPoolExecutor(max_workers=max(1, min(16, len(remote)))) as pool:
        answered = dict(zip(remote, pool.map(lambda host: _answers(agent, host), remote)))
    return [(host, slots) for host, slots in hosts if answered.get(host, True)]


def restarts(attempts: Sequence[dict]) -> list[dict]:
    """One record per restart, from consecutive attempts' progress (``progress.json`` as each left it):
    the step the restart resumed from, the step the failed attempt had reached, the completed steps
    it redoes and the downtime (the failed attempt's last progress to the next one's first step; None
    while the next one has not said when it started)."""
    records = []
    for failed, next_ in zip(attempts, attempts[1:]):
        if "started_step" in next_ and "global_step" in failed:
            resumed, reached = next_["started_step"], failed["global_step"]
            down = next_["training_started_at"] - failed["updated_at"] if "training_started_at" in next_ else None
            redone = max(0, reached - resumed)
            records.append(dict(resumed_step=resumed, failed_step=reached, steps_redone=redone, downtime_s=down))
    return records


def read_attempts(run_dir: str | Path) -> list[dict]:
    """The supervisor's record of the attempts that have ended (``ATTEMPTS_FILE``); [] without one."""
    try:
        attempts = json.loads((Path(run_dir) / ATTEMPTS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return attempts if isinstance(attempts, list) else []


class Supervisor:
    def __init__(
        self,
        script: str,
        argv: Sequence[str],
        run_dir: str | Path,
        nprocs: int,
        hostfile: str | None,
        agent: str | None,
        max_restarts: int,
        min_nprocs: int | None,
        ulfm: bool,
    ):
        """``agent``: ``--launch-agent``; None for the one of the environment (see ``launch_agent``)."""
        self.script, self.argv, self.run_dir = script, list(argv), Path(run_dir)
        self.nprocs, self.hostfile, self.launch_agent = nprocs, hostfile, launch_agent(agent)
        self.max_restarts, self.min_nprocs, self.ulfm = max_restarts, min_nprocs or 1, ulfm
        self.attempts: list[dict] = []

    def _command(self, env: dict[str, str]) -> list[str]:
        argv = with_flag(with_flag(self.argv, "--nprocs", str(self.nprocs)), "--hostfile", self.hostfile)
        if self.nprocs == 1 and not self.hostfile:
            return [sys.executable, self.script, *argv]
        extra = ["--with-ft", "ulfm"] if self.ulfm else []
        return mpirun_command(self.nprocs, [self.script, *argv], self.hostfile, extra, env)

    def _environment(self, attempt: int) -> dict[str, str]:
        env = mpirun_environment(self.launch_agent)
        env.update(XD_ATTEMPT=str(attempt), XD_SUPERVISED="1")
        if self.ulfm:
            env["XD_FAULT_TOLERANCE"] = "ulfm"
        return env

    def check_hosts(self) -> None:
        """Every host of the hostfile must answer through the launch agent before the job starts there."""
        if not self.hostfile:
            return
        hosts = read_hostfile(self.hostfile)
        answering = {host for host, _ in answering_hosts(hosts, self.launch_agent)}
        silent = [host for host, _ in hosts if host not in answering]
        if silent:
            raise UserError(
                f"host {', '.join(silent)} does not answer through {self.launch_agent}; check that "
                f"`{self.launch_agent} {silent[0]} true` works (host name, keys, --launch-agent) or "
                f"remove it from {self.hostfile}"
            )

    def run(self) -> int:
        self.check_hosts()
        for attempt in range(self.max_restarts + 1):
            started = time.time()
            env = self._environment(attempt)
            proc = subprocess.Popen(self._command(env), env=env)
            try:
                code = self._wait(proc)
            except KeyboardInterrupt:
                return _end(proc)
            progress = read_progress(self.run_dir)
            self.attempts.append(
                {
                    "attempt": attempt,
                    "exit_code": code,
                    "started": started,
                    "ended": time.time(),
                    "nprocs": self.nprocs,
                    **progress,
                }
            )
            write_json_atomically(self.run_dir / ATTEMPTS_FILE, self.attempts)  # the next attempt draws its restarts
            if self._completed_since(started):
                self._report()
                return 0
            if attempt == self.max_restarts:
                break
            self._shrink_to_answering_hosts()
            print(
                f"supervisor: attempt {attempt} ended without finishing (exit code {code}, last step "
                f"{progress.get('global_step', '?')}); restarting on {self.nprocs} process(es) from the last "
                "checkpoint",
                file=sys.stderr,
                flush=True,
            )
        if self.max_restarts or self.attempts[-1]["exit_code"] == 0:
            print(
                f"error: the job did not finish after {len(self.attempts)} attempt(s); see the output above",
                file=sys.stderr,
            )
        return self.attempts[-1]["exit_code"] or 1

    def _wait(self, proc: subprocess.Popen) -> int:
        """The job's exit code. With remote hosts, each is asked every ``HOST_CHECK_SECONDS`` whether it
        still answers: once one does not, the job is ended at once. A killed process or daemon is
        noticed by the runtime itself, but a machine that loses power or its network sends no TCP
        reset, and the job would wait on it until some timeout of the runtime or the collective watchdog."""
        remote = [h for h in read_hostfile(self.hostfile) if h[0] not in LOCAL_HOSTS] if self.hostfile else []
        while remote:
            try:
                return proc.wait(timeout=HOST_CHECK_SECONDS)
            except subprocess.TimeoutExpired:
                pass
            answering = {host for host, _ in answering_hosts(remote, self.launch_agent)}
            lost = [host for host, _ in remote if host not in answering]
            if lost and proc.poll() is None:
                print(
                    f"supervisor: host(s) {', '.join(lost)} stopped answering; ending the job to restart without them",
                    file=sys.stderr,
                    flush=True,
                )
                return _end(proc)
        return proc.wait()

    def _completed_since(self, started: float) -> bool:
        marker = self.run_dir / "COMPLETED"
        return marker.exists() and marker.stat().st_mtime >= started - 1

    def _shrink_to_answering_hosts(self) -> None:
        if not self.hostfile:
            return
        hosts = answering_hosts(read_hostfile(self.hostfile), self.launch_agent)
        slots = sum(s for _, s in hosts)
        if slots < self.min_nprocs:
            raise UserError(
                f"only {slots} process slot(s) on hosts that still answer, fewer than --min-nprocs "
                f"{self.min_nprocs}; cannot restart"
            )
        self.nprocs = min(self.nprocs, slots)
        path = self.run_dir / f"hostfile.attempt-{len(self.attempts)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{host} slots={n}\n" for host, n in hosts))
        self.hostfile = str(path)

    def _report(self) -> None:
        """Restarts, downtime and steps redone, into metrics.json and the log."""
        records = restarts(self.attempts)
        downtime = [r["downtime_s"] for r in records]  # every attempt here has ended: each one's start is known
        redone = [r["steps_redone"] for r in records]
        summary = {
            "supervisor/restarts": len(self.attempts) - 1,
            "supervisor/downtime_s": downtime,
            "supervisor/downtime_s_total": sum(downtime),
            "supervisor/steps_redone": redone,
            "supervisor/attempts": self.attempts,
        }
        metrics_path = self.run_dir / "metrics.json"
        try:
            metrics = json.loads(metrics_path.read_text())
        except (OSError, ValueError):
            metrics = {}
        metrics.update(summary)
        write_json_atomically(metrics_path, metrics)
        if len(self.attempts) > 1:
            print(
                f"supervisor: finished after {len(self.attempts) - 1} restart(s); downtime "
                f"{sum(downtime):.1f} s, steps redone {sum(redone)}",
                file=sys.stderr,
                flush=True,
            )
