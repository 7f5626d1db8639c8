"""The benchmarks' quick modes on small generated data: every script runs and writes well-formed results.

One ``run_all.py --quick`` runs each benchmark's quick mode once (two MPI jobs: 2 and 3 processes)
and the summary; the tests check the files' keys and that their numbers are finite (and the
headline ones positive), never the values of the ratios. The rest is cheap: flags and one-line
errors without MPI, and the step-time arithmetic on made-up steps.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from generators.cifar10 import write_cifar10_batches
from generators.planetoid import write_planetoid_cora

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
SCRIPTS = (
    "allreduce",
    "strategies",
    "straggler",
    "pipeline",
    "checkpoint",
    "run_all",
    "job",
    "safe_loading",
    "graph_profile",
)


def run(args: list, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """A subprocess in its own process group: on timeout mpirun gets SIGTERM (it then stops its ranks)."""
    process = subprocess.Popen(
        [sys.executable, *map(str, args)],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        pytest.fail(f"{args[0]} ran over {timeout} s\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(args, process.returncode, out, err)


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    data, results = root / "data", root / "results"
    write_planetoid_cora(data)
    write_cifar10_batches(data, per_batch=220)  # 1,100 images: 1,000 held out for validation, 100 to train on
    env = {**os.environ, "XD_CACHE_DIR": str(root / "cache"), "XD_DOWNLOAD": "0"}
    proc = run([BENCH / "run_all.py", "--quick", "--data-dir", data, "--results-dir", results], env, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return results


def load(results: Path, name: str) -> dict:
    path = results / f"{name}.json"
    assert path.is_file(), f"{name}.json was not written"
    assert (results / f"{name}.png").is_file() or name.startswith("summary"), f"{name}.png was not written"
    return json.loads(path.read_text())


def numbers(value, path: str = ""):
    """(path, number) of every number in a JSON value (booleans are not numbers here)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return
    if isinstance(value, (int, float)):
        yield path, value
    elif isinstance(value, dict):
        for key, inner in value.items():
            yield from numbers(inner, f"{path}.{key}")
    else:
        for i, inner in enumerate(value):
            yield from numbers(inner, f"{path}[{i}]")


SIGNED = ("hidden_communication_share", "mpi_communication_hidden_by_overlap")  # negative: overlap cost more


def assert_well_formed(content: dict, *positive: str) -> None:
    bad = [(p, v) for p, v in numbers(content) if not math.isfinite(v) or (v < 0 and not any(k in p for k in SIGNED))]
    assert not bad, f"numbers that are not finite and >= 0 (or signed shares not finite): {bad[:5]}"
    assert {"cores", "cpu_model"} <= set(content["machine"])
    for key in positive:
        found = list(numbers(content[key], key))
        assert found and all(v > 0 for _, v in found), f"{key}: {found}"


def figure(value: dict) -> None:
    assert {"median", "min", "max"} <= set(value) and value["min"] <= value["median"] <= value["max"]


def test_summary_has_every_headline_figure(quick_results):
    summary = load(quick_results, "summary-quick")
    assert_well_formed(
        summary,
        "mpi_over_ddp_samples_per_s",
        "comm_over_raw_mpi_busbw_1MB",
        "comm_over_raw_mpi_busbw_64MB",
        "raw_mpi_busbw_over_memcpy_64MB",
        "async_over_mpi_updates_per_s_straggler3x",
        "pipeline_bubble_measured_over_theory",
        "checkpoint_overhead_pct",
    )
    assert set(summary["mpi_over_ddp_samples_per_s"]) == {"cnn", "gcn"}
    assert set(summary["pipeline_bubble_measured_over_theory"]) == {"1", "2", "4", "8"}
    assert set(summary["checkpoint_overhead_pct"]) == {"cnn", "gcn"}
    assert summary["quick"] is True and (quick_results / "summary-quick.md").read_text().count("|") > 20


def test_allreduce_results(quick_results):
    result = load(quick_results, "allreduce-2ranks-quick")
    assert_well_formed(result, "memcpy_bytes_per_s")
    assert [r["bytes"] for r in result["rows"]] == [4 << 10, 64 << 10, 1 << 20, 64 << 20]
    for row in result["rows"]:
        for backend in ("raw_mpi", "comm_layer", "gloo"):
            figure(row[backend]["busbw"])
            assert row[backend]["busbw"]["median"] > 0


def test_strategies_results(quick_results):
    result = load(quick_results, "strategies-quick")
    assert_well_formed(result, "mpi_over_ddp_samples_per_s")
    assert set(result["models"]) == {"cnn", "gcn"}
    every = {"single", "ddp", "mpi", "mpi_no_overlap", "async", "hybrid"}
    for model, expected in (("cnn", every), ("gcn", every - {"hybrid"})):
        outcome = result["models"][model]
        assert set(outcome["strategies"]) == expected and set(outcome["not_applicable"]) == expected ^ every
        hidden = outcome["hidden_communication_share"]  # the exchange overlapped vs after backward
        assert hidden is None or (figure(hidden) is None and hidden["max"] <= 1), hidden
        for name, figures in outcome["strategies"].items():
            for key in ("samples_per_s", "step_s", "compute_s"):
                figure(figures[key])
                assert figures[key]["median"] > 0, (model, name, key)
        assert set(outcome["scaling_efficiency"]) == expected - {"single"}
    summary = load(quick_results, "summary-quick")["mpi_communication_hidden_by_overlap"]
    assert set(summary) <= {"cnn", "gcn"} and all(v <= 1 for v in summary.values()), summary


def test_straggler_pipeline_and_checkpoint_results(quick_results):
    straggler = load(quick_results, "straggler-quick")
    assert_well_formed(straggler, "undisturbed_step_s")
    row = next(r for r in straggler["rows"] if r["factor"] == 3.0)
    for name in ("mpi", "async"):
        figure(row[name]["updates_per_s"])
    pipeline = load(quick_results, "pipeline-quick")
    assert_well_formed(pipeline, "pipeline_bubble_measured_over_theory")
    for schedule in ("gpipe", "1f1b"):
        for m, expected in (("1", 0.5), ("2", 1 / 3), ("4", 0.2), ("8", 1 / 9)):
            assert pipeline["schedules"][schedule][m]["bubble_theory"] == pytest.approx(expected)
            figure(pipeline["schedules"][schedule][m]["bubble_measured"])
    checkpoint = load(quick_results, "checkpoint-quick")
    assert_well_formed(checkpoint, "checkpoint_overhead_pct")
    for model in ("cnn", "gcn"):
        for key in ("write_s", "stall_s", "step_s", "overhead_pct"):
            figure(checkpoint["models"][model][key])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_describes_itself(script):
    proc = run([BENCH / f"{script}.py", "--help"])
    assert proc.returncode == 0 and "--" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize(
    "args, message",
    [
        (["strategies.py", "--strategies", "zigzag"], "unknown strategy zigzag"),
        (["straggler.py", "--nprocs", "2"], "--nprocs must be at least 3"),
        (["job.py", "sorting", "--quick"], "unknown benchmark 'sorting'"),
        (["safe_loading.py", "--sizes-mb", "0"], "--sizes-mb 0"),
        (["safe_loading.py", "--data-dir", "/nonexistent"], "missing"),
    ],
)
def test_bad_flags_are_one_line_errors(args, message):
    proc = run([BENCH / args[0], *args[1:]])
    assert proc.returncode == 2 and message in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]


def test_time_split_arithmetic_on_made_up_steps():
    from benchmarks.step_timer import StepRecord, samples_per_s, step_seconds, wait_for_slowest

    def step(index, exchange, seconds):
        return StepRecord(index, exchange, seconds, None, 10)

    # two ranks; steps 0 and 2 exchange gradients, 1 and 3 do not (rank 1 computes 2 ms longer)
    per_rank = [
        [step(0, True, 0.012), step(1, False, 0.008), step(2, True, 0.012), step(3, False, 0.008)],
        [step(0, True, 0.012), step(1, False, 0.010), step(2, True, 0.012), step(3, False, 0.010)],
    ]
    assert step_seconds(per_rank) == pytest.approx(0.012)
    assert step_seconds(per_rank, exchange=False) == pytest.approx(0.009)
    assert wait_for_slowest(per_rank) == pytest.approx(0.001)
    assert samples_per_s(per_rank) == pytest.approx(40 / 0.024)
    assert samples_per_s(per_rank, samples_divisor=2) == pytest.approx(20 / 0.024)


def test_safe_loading_quick(tiny_data, tmp_path):
    """One process, no MPI: restricted against unrestricted checkpoint loads, and Cora read afresh."""
    proc = run([BENCH / "safe_loading.py", "--quick", "--data-dir", tiny_data, "--results-dir", tmp_path], timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((tmp_path / "safe_loading-quick.json").read_text())
    assert_well_formed(result)
    for figures in result["checkpoints"].values():
        assert {"unrestricted", "restricted", "launcher_check"} <= set(figures["seconds"])
        assert math.isfinite(figures["restricted_over_unrestricted"]["median"])
    assert result["cora"]["seconds"]["checked_afresh"]["median"] > 0


def test_graph_profile_quick(tmp_path):
    """One process, no MPI: every phase of rank 0's GraphSAGE step on a small generated graph in 2 parts."""
    args = ["--quick", "--data-dir", tmp_path / "data", "--cache-dir", tmp_path / "cache", "--results-dir", tmp_path]
    proc = run([BENCH / "graph_profile.py", *args], timeout=120)
    assert proc.returncode == 0, f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    result = json.loads((tmp_path / "graph_profile-20000-2ranks-quick.json").read_text())
    assert_well_formed(result, "step_ms", "seeds_per_s")
    phases = result["phases_ms"]
    assert set(phases) == {"positives", "negatives", "subgraph", "assembly", "forward", "backward"} | {
        "optimizer_dense",
        "optimizer_table",
    }
    assert phases["forward"]["median"] > 0 and phases["subgraph"]["median"] > 0
    assert result["graph"]["parts"] == 2 and 0 < result["graph"]["owned_rank0"] < 20_000
    bad = run([BENCH / "graph_profile.py", "--num-nodes", "10", "--results-dir", tmp_path], timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --num-nodes"), bad.stderr
