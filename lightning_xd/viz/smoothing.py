"""TensorBoard's smoothing of a noisy curve: a debiased exponential moving average.

    last = weight * last + (1 - weight) * value          (last starts at 0)
    smoothed = last / (1 - weight ** n)                   (n: finite values seen so far)

Dividing by ``1 - weight ** n`` removes the pull towards the starting 0, so the first smoothed
point is the first value and no early point lags the curve. A non-finite value (a step without a
loss) is passed through and does not move the average; a constant curve comes back unchanged.
This is the formula of TensorBoard's scalar dashboard (``tf-smoothing``), whose slider defaults to
0.6. The dashboard's curves hold one point per step, so the weight follows their length
(``weight_for``): 0.6 up to 125 points, then rising to 0.9 from 500 on, so that the average spans
about 1/50 of the curve (its window is about 1 / (1 - weight) points) within those bounds.

Only noisy curves are smoothed (``noisy``): smoothing a curve that is smooth already (a running
error, the loss of full-batch training) only makes it lag behind its values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

WEIGHTS = (0.6, 0.9)  # the least and the most smoothing
NOISE = 0.01  # a curve whose typical wiggle is over this share of its range is noisy


def weight_for(points: int) -> float:
    """The smoothing weight for a curve of ``points`` values: an average over about ``points / 50``."""
    return min(WEIGHTS[1], max(WEIGHTS[0], 1 - 50 / max(points, 1)))


def smoothed(values: Sequence[float], weight: float) -> list[float]:
    """``values`` smoothed as TensorBoard does, with ``weight`` in [0, 1) (0: unchanged)."""
    last, seen, out = 0.0, 0, []
    for value in values:
        if not math.isfinite(value):
            out.append(value)
            continue
        last = weight * last + (1 - weight) * value
        seen += 1
        out.append(last / (1 - weight**seen))
    return out


def noisy(values: Sequence[float]) -> bool:
    """Whether the curve wiggles from step to step: the median of its second differences
    |v[t+1] - 2 v[t] + v[t-1]| (0 along any trend, straight or gently curved) is over ``NOISE``
    of its range (1st to 99th percentile)."""
    finite = np.array([v for v in values if math.isfinite(v)], dtype=float)
    if len(finite) < 3:
        return False
    low, high = np.percentile(finite, [1, 99])
    wiggle = np.median(np.abs(finite[2:] - 2 * finite[1:-1] + finite[:-2]))
    return bool(wiggle > NOISE * (high - low))
