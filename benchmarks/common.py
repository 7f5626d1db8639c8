"""Shared by the benchmark scripts: run train.py, read its metrics.json, describe the machine."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine() -> dict:
    """Cores and CPU model: recorded next to every figure."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch

    return {"cores": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "torch": torch.__version__}


def train(*args: str, timeout: float = 3600) -> dict:
    """Run ``python train.py ARGS`` in a fresh run dir; return its metrics.json."""
    with tempfile.TemporaryDirectory(prefix="xd-bench-") as run_dir:
        cmd = [sys.executable, str(REPO / "train.py"), *args, "--run-dir", run_dir]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stderr[-3000:]}")
        return json.loads((Path(run_dir) / "metrics.json").read_text())


def write_results(name: str, content: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")
    return path
