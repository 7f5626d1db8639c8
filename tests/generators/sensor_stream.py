"""Small room-temperature recordings in the real layouts of ``occupancy_detection/`` and
``intel_lab_preprocessed/``.

Occupancy: three quoted CSV files, one row a minute, separated by gaps of hours, in time order
datatest -> datatraining -> datatest2; ``datatest2.txt`` keeps the R-style header of 7 names for
8 fields and unquoted dates, as the original. Intel: headerless CSV, one row per sensor, values
written like ``1.83E+01``, the training file's steps then the test file's.
Temperatures follow a daily cycle with some noise, so a forecaster can beat persistence.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np

OCCUPANCY_STARTS = {
    "datatest.txt": "2015-02-02 14:19:00",
    "datatraining.txt": "2015-02-04 17:51:00",
    "datatest2.txt": "2015-02-11 14:48:00",
}
FIELDS = ["date", "Temperature", "Humidity", "Light", "CO2", "HumidityRatio", "Occupancy"]


def _temperature(minutes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 21 + 1.5 * np.sin(2 * np.pi * minutes / (24 * 60)) + rng.normal(0, 0.02, len(minutes))


def write_occupancy(root: Path, rows_per_file: int = 500, seed: int = 0) -> Path:
    """Write the three files into ``root/occupancy_detection``; returns that folder. 500 rows a file
    give example 8's settings (a window of 24 minutes, 90 minutes ahead) calibration windows whose
    targets lie inside the calibration stretch (its first 10%, 150 minutes)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "occupancy_detection"
    folder.mkdir(parents=True, exist_ok=True)
    for name, start in OCCUPANCY_STARTS.items():
        first = datetime.fromisoformat(start)
        stamps = [first + timedelta(minutes=i) for i in range(rows_per_file)]
        temperatures = _temperature(np.array([s.timestamp() / 60 for s in stamps]), rng)
        r_style = name == "datatest2.txt"
        header = ",".join(f'"{f}"' for f in (FIELDS if r_style else ["id", *FIELDS]))
        lines = [header]
        for i, (stamp, temperature) in enumerate(zip(stamps, temperatures), start=1):
            date = f"{stamp:%Y-%m-%d %H:%M:%S}" if r_style else f'"{stamp:%Y-%m-%d %H:%M:%S}"'
            lines.append(f'"{i}",{date},{temperature:.4f},27.2,426,721.25,0.0047929881765,1')
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


def write_intel(root: Path, num_sensors: int = 6, train_steps: int = 96, test_steps: int = 64, seed: int = 0) -> Path:
    """Write ``intelTemperature{Train,Test}.csv`` into ``root/intel_lab_preprocessed``; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "intel_lab_preprocessed"
    folder.mkdir(parents=True, exist_ok=True)
    minutes = 30 * np.arange(train_steps + test_steps)
    drift = 0.5 * minutes / (24 * 60)  # half a degree a day: the reading a day earlier is no exact forecast
    readings = np.stack([_temperature(minutes + 60 * s, rng) + s + drift for s in range(num_sensors)])
    for name, part in (
        ("intelTemperatureTrain.csv", readings[:, :train_steps]),
        ("intelTemperatureTest.csv", readings[:, train_steps:]),
    ):
        (folder / name).write_text("\n".join(",".join(f"{v:.2E}" for v in row) for row in part) + "\n")
    return folder
