"""A few ECG5000-style heartbeats in the real text layout (``ECG5000_TRAIN.txt``).

Each row is the class (1.0-5.0) then 140 samples, every value written as ``%15.7e`` one after
another, as in the UCR file. Normal beats (class 1) share one shape; abnormal ones another, so an
autoencoder trained on normal beats scores them apart. Every beat is z-normalised, as in ECG5000.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

BEAT_LENGTH = 140
COUNTS = {1: 40, 2: 20, 3: 6, 4: 6, 5: 2}


def _beat(label: int, rng: np.random.Generator) -> np.ndarray:
    t = np.linspace(0, 1, BEAT_LENGTH)
    if label == 1:
        beat = -4 * np.exp(-(((t - 0.1) / 0.04) ** 2)) + np.sin(2 * np.pi * t)
    else:
        beat = np.cos(2 * np.pi * label * t) + 2 * np.exp(-(((t - 0.6) / 0.1) ** 2))
    beat = beat + rng.normal(0, 0.1, BEAT_LENGTH)
    return (beat - beat.mean()) / beat.std()


def write_ecg5000(root: Path, counts: dict[int, int] = COUNTS, seed: int = 0) -> Path:
    """Write ``root/ecg/ecg5000/ECG5000_TRAIN.txt`` (classes in a shuffled order); returns its path."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation([label for label, n in counts.items() for _ in range(n)])
    folder = Path(root) / "ecg" / "ecg5000"
    folder.mkdir(parents=True, exist_ok=True)
    rows = ["".join(f"{v:15.7e}" for v in [float(label), *_beat(label, rng)]) for label in labels]
    path = folder / "ECG5000_TRAIN.txt"
    path.write_text("\n".join(rows) + "\n")
    return path
