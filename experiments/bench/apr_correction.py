"""The decode benchmarks' APR correction: thresholds are calibrated on calibration tokens, but the APR a decode
reads depends on the text it generates, so both benchmarks move their calibration target until the decode reads
the APR asked for (`cpu_decode.py`, `gpu_decode.py`)."""
from __future__ import annotations

import math


def next_calibration_target(tries: list, apr: float) -> float:
    """The next calibration target from the tries so far, [(calibration target, decode APR), ...].

    After one try: scaled by apr / decode APR. Later, when the tries bracket apr (a target whose decode read less than
    apr below a target whose decode read more), a log-linear interpolation between the highest such target below and
    the lowest above (their log-midpoint if the clamped slope would leave the bracket); otherwise a secant step in log
    space over the last two (slope clamped to [1/4, 4]), or the proportional step from the last try where those two
    do not rise. The decoded text changes with the thresholds, so the decode APR need not rise with the target: a
    falling pair used to be clamped to a slope of 1/4, a step four times too long (a SmolLM2 run went from target 2.75,
    between the tries at 2.66 and 3.0 that bracketed 3x, to 4.76)."""
    if len(tries) == 1:
        t, a = tries[0]
        return t * apr / a

    def log_step(p, q):   # through (p, q) in log space to apr; None where the pair does not rise
        (t1, a1), (t2, a2) = p, q
        if t1 == t2 or a1 == a2:
            return None
        slope = (math.log(a2) - math.log(a1)) / (math.log(t2) - math.log(t1))
        if slope <= 0:
            return None
        return t2 * math.exp((math.log(apr) - math.log(a2)) / min(max(slope, 0.25), 4.0))

    below = [ta for ta in tries if ta[1] < apr]
    above = [ta for ta in tries if ta[1] > apr]
    if below and above:
        lo = max(below, key=lambda ta: ta[0])      # the highest target that read too little ...
        hi = min(above, key=lambda ta: ta[0])      # ... and the lowest that read too much
        if lo[0] < hi[0]:   # (then the pair rises: log_step is defined)
            t = log_step(lo, hi)
            return t if lo[0] < t < hi[0] else math.sqrt(lo[0] * hi[0])
    t = log_step(tries[-2], tries[-1])
    return t if t is not None else tries[-1][0] * apr / tries[-1][1]


def closest_try(tries: list, apr: float) -> tuple:
    """The (calibration target, decode APR) try whose decode APR is nearest apr (in log terms)."""
    return min(tries, key=lambda ta: abs(math.log(ta[1] / apr)))


def correct_calibration(apr: float, target: float, decode_apr, recalibrate, steps: int = 3, tol: float = 0.02,
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
