"""The decode benchmarks' APR correction: thresholds are calibrated on calibration tokens, but the APR a decode
reads depends on the text it generates, so both benchmarks move their calibration target until the decode reads
the APR asked for (`cpu_decode.py`, `gpu_decode.py`)."""
from __future__ import annotations

import math


def next_calibration_target(tries: list, apr: float) -> float:
    """The next calibration target from the tries so far, [(calibration target, decode APR), ...].

    After one try: scaled by apr / decode APR. Later, when the tries bracket apr (a target whose decode read less than
    apr below a target whose decode read more; of all such pairs the one with the closest targets), a log-linear
    interpolation between the two, which lands strictly inside the bracket; otherwise a secant step in log space over
    the last two (slope clamped to [1/4, 4]), or the proportional step from the last try where those two do not rise.
    The decoded text changes with the thresholds, so the decode APR need not rise with the target: a falling pair used
    to be clamped to a slope of 1/4, a step four times too long (a SmolLM2 run went from target 2.75, between the tries
    at 2.66 and 3.0 that bracketed 3x, to 4.76)."""
    if len(tries) == 1:
        t, a = tries[0]
        return t * apr / a
    brackets = [(lo, hi) for lo in tries for hi in tries if lo[0] < hi[0] and lo[1] < apr < hi[1]]
    if brackets:
        (t1, a1), (t2, a2) = min(brackets, key=lambda p: math.log(p[1][0] / p[0][0]))
        t = t1 * math.exp(math.log(t2 / t1) * math.log(apr / a1) / math.log(a2 / a1))
        return t if t1 < t < t2 else math.sqrt(t1 * t2)   # (a floating-point guard)
    (t1, a1), (t2, a2) = tries[-2], tries[-1]
    slope = (math.log(a2) - math.log(a1)) / (math.log(t2) - math.log(t1)) if t1 != t2 and a1 != a2 else 0.0
    if slope <= 0:   # flat or falling: proportional from the last try
        return t2 * apr / a2
    return t2 * math.exp((math.log(apr) - math.log(a2)) / min(max(slope, 0.25), 4.0))


def closest_try(tries: list, apr: float) -> tuple:
    """The (calibration target, decode APR) try whose decode APR is nearest apr (in log terms)."""
    return min(tries, key=lambda ta: abs(math.log(ta[1] / apr)))


# How close "3x APR" is held: the decode APR within 0.5 % of the target, in at most 4 corrections. At 2 % (until
# 2026-12-05) SmolLM2's CPU "3x" row stopped at 2.94 in one run, and anything from 2.94 to 3.06 passed: a 4 % spread
# in the weights read by the same row.
TOL, STEPS = 0.005, 4


def correct_calibration(apr: float, target: float, decode_apr, recalibrate, steps: int = STEPS, tol: float = TOL,
                        on_step=None) -> tuple[list, float]:
    """Move the calibration target until the decode reads `apr`: `decode_apr()` measures the decode at the current
    calibration (first at `target`), `recalibrate(t)` sets calibration target t. While the last try misses apr by more
    than `tol` (relative), at most `steps` times, the next target comes from `next_calibration_target`
    (`on_step(tries)` after each). The closest try is left set. Returns (tries [(target, decode APR), ...], the
    target left set)."""
    tries = [(target, decode_apr())]
    for _ in range(steps):
        if abs(tries[-1][1] / apr - 1) <= tol:
            break
        t = next_calibration_target(tries, apr)
        recalibrate(t)
        tries.append((t, decode_apr()))
        if on_step is not None:
            on_step(tries)
    best = closest_try(tries, apr)[0]
    if best != tries[-1][0]:
        recalibrate(best)
    return tries, best
