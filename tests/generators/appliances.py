"""A few days of UCI Appliances readings in the real CSV layout (``energydata_complete.csv``).

The copy in ../shared/data has no date column: a header row with 26 names, ``Appliances`` and
``lights`` as integers (Wh), the rest as decimals; rows every 10 minutes from 2016-01-11 17:00.
The generated energy use follows a daily cycle with noise, so a forecaster has something to learn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

ROOMS = [name for room in range(1, 10) for name in (f"T{room}", f"RH_{room}")]
COLUMNS = ["Appliances", "lights", *ROOMS, "T_out", "Press_mm_hg", "RH_out", "Windspeed", "Visibility", "Tdewpoint"]
READINGS_PER_DAY = 144
FIRST_READING_MINUTE = 17 * 60  # 17:00


def write_appliances(root: Path, num_rows: int = 400, seed: int = 0) -> Path:
    """Write ``root/appliances_energy/energydata_complete.csv``; returns its path."""
    rng = np.random.default_rng(seed)
    minute = FIRST_READING_MINUTE + 10 * np.arange(num_rows)
    daily = np.sin(2 * np.pi * minute / (24 * 60))
    appliances = np.maximum(10, np.round(60 + 40 * daily + rng.normal(0, 10, num_rows))).astype(int)
    lights = rng.choice([0, 10, 20, 30], num_rows)
    others = 20 + rng.normal(0, 3, (num_rows, len(COLUMNS) - 2))
    folder = Path(root) / "appliances_energy"
    folder.mkdir(parents=True, exist_ok=True)
    lines = [",".join(COLUMNS)]
    for i in range(num_rows):
        lines.append(",".join([str(appliances[i]), str(lights[i]), *(f"{v:.10g}" for v in others[i])]))
    path = folder / "energydata_complete.csv"
    path.write_text("\n".join(lines) + "\n")
    return path
