"""Tiny UCI HAPT raw data: ``hapt_har/RawData/{acc,gyro}_expXX_userYY.txt`` and ``labels.txt``.

One experiment per user (experiment id = user id). Each recording holds one segment of each
basic activity 1-6 separated by a postural transition (activity 7), with a few unlabelled
samples in between, as in the real files. Activities differ in gravity direction and in the
frequency of motion, so a small CNN can tell them apart. ``labels.txt`` also lists an experiment
whose files are absent (the real file covers all 61 experiments; the subset only 20).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SEGMENT = 300  # samples per basic-activity segment: 3 windows of 128 with step 64
TRANSITION, GAP = 40, 10
ABSENT_EXPERIMENT = 99


def _activity_signal(activity: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, 6): acc in g (gravity along an activity-dependent axis) and gyro in rad/s."""
    t = np.arange(n) / 50.0
    gravity = np.eye(3)[activity % 3] * (1 if activity <= 3 else -1)
    motion = 0.3 * np.sin(2 * np.pi * activity * t)[:, None] if activity <= 3 else 0.0
    acc = gravity + motion + 0.02 * rng.standard_normal((n, 3))
    gyro = 0.1 * activity * np.cos(2 * np.pi * t)[:, None] + 0.02 * rng.standard_normal((n, 3))
    return np.concatenate([acc, gyro], axis=1)


def _write_signal(path: Path, values: np.ndarray) -> None:
    path.write_text("".join(" ".join(repr(float(v)) for v in row) + "\n" for row in values))


def write_hapt(root: Path, users=range(1, 11), seed: int = 0) -> Path:
    """Write the raw files of ``users`` into ``root/hapt_har/RawData``; returns that folder."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "hapt_har" / "RawData"
    folder.mkdir(parents=True, exist_ok=True)
    label_rows = []
    for user in users:
        experiment, pieces, position = user, [], 0
        for activity in range(1, 7):
            pieces.append(_activity_signal(activity, GAP, rng))  # unlabelled samples
            first = position + GAP + 1  # labels count samples from 1
            pieces.append(_activity_signal(activity, SEGMENT, rng))
            label_rows.append((experiment, user, activity, first, first + SEGMENT - 1))
            pieces.append(_activity_signal(activity, TRANSITION, rng))
            label_rows.append((experiment, user, 7, first + SEGMENT, first + SEGMENT + TRANSITION - 1))
            position += GAP + SEGMENT + TRANSITION
        signal = np.concatenate(pieces)
        _write_signal(folder / f"acc_exp{experiment:02d}_user{user:02d}.txt", signal[:, :3])
        _write_signal(folder / f"gyro_exp{experiment:02d}_user{user:02d}.txt", signal[:, 3:])
    label_rows.append((ABSENT_EXPERIMENT, 1, 1, 1, SEGMENT))
    (folder / "labels.txt").write_text("".join(" ".join(map(str, row)) + "\n" for row in label_rows))
    return folder
