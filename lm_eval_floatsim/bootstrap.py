"""lm-eval's bootstrap standard error of a perplexity, the same number in a fraction of the time.

lm-eval 0.4.13 (`lm_eval.api.metrics.bootstrap_stderr`) draws `iters` resamples in chunks of
`min(1000, iters)`; chunk i comes from `random.Random(i)`, each resample is
`rnd.choices(xs, k=len(xs))` and its statistic `f(resample)`; the result is `sample_stddev` of the
statistics. That is ~10^8 `random()` calls in Python per evaluation of a 1000-document task, the
largest fixed cost of an evaluation after the forwards. This module draws the same resamples
with numpy, vectorized:
- numpy's legacy `RandomState([i])` is the same MT19937 seeded the same way (`init_by_array`
  with the seed's 32-bit words) and builds a double from two 32-bit outputs as `random()` does,
  so its `random_sample()` stream is `Random(i).random()`'s; `choices` picks `floor(random() * n)`;
- the statistic is one of the mean of a resample (`perplexity` = exp(-mean)); the mean is
  `sum(resample) / len(resample)` with Python's builtin `sum`, which adds left to right up to
  Python 3.11 and, from 3.12, adds left to right while accumulating each addition's rounding
  error (Neumaier) and adds that at the end: both are reproduced here operation by operation;
- the statistic itself and the standard error are lm-eval's own functions, applied to the same
  Python floats.
Anything else (another statistic, values that are not exact Python floats) goes to lm-eval's own
function. tests/test_bootstrap.py checks the result against lm-eval's, bit for bit.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

# lm-eval's chunk of resamples drawn from one seed (`min(1000, iters)` in bootstrap_stderr).
CHUNK = 1000
# Resamples whose picks are summed at once: keeps the working set in the CPU's caches.
ROWS_PER_BLOCK = 64
# Python's sum() of floats compensates its rounding errors from 3.12 on (Neumaier summation).
COMPENSATED_SUM = sys.version_info >= (3, 12)


def statistics_of_the_mean() -> tuple:
    """lm-eval's bootstrapped aggregations that are a function of the mean of their items."""
    from lm_eval.api import metrics

    return (metrics.perplexity,)


def reproduces(f: Callable, xs: Sequence) -> bool:
    return f in statistics_of_the_mean() and len(xs) > 0 and all(type(x) is float for x in xs)


def bootstrap_stderr(f: Callable, xs: Sequence, iters: int, original: Callable) -> float:
    """`original(f, xs, iters)` (lm-eval's bootstrap_stderr), computed faster where it can be reproduced."""
    if not reproduces(f, xs) or iters <= 0:
        return original(f, xs, iters)
    from lm_eval.api.metrics import sample_stddev

    size = min(CHUNK, iters)
    values = np.asarray(xs, dtype=np.float64)
    with ThreadPoolExecutor(max_workers=_workers()) as pool:  # numpy releases the GIL in its loops
        sums = pool.map(lambda seed: resampled_sums(values, seed, size), range(iters // size))
        totals = np.concatenate(list(sums)).tolist()
    n = len(xs)
    # f of a resample is f(mean); f([m]) computes exactly that from m = sum / len, as `mean` does.
    return sample_stddev([f([total / n]) for total in totals])


def _workers() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def resampled_sums(values: np.ndarray, seed: int, size: int) -> np.ndarray:
    """sum(random.Random(seed).choices(values, k=n)) for each of the seed's `size` resamples, in order."""
    n = len(values)
    stream = np.random.RandomState([seed])  # a list: init_by_array, as random.seed(int) seeds
    sums = np.empty(size)
    for start in range(0, size, ROWS_PER_BLOCK):
        draws = stream.random_sample((min(ROWS_PER_BLOCK, size - start), n))
        draws *= float(n)  # in place: each new array of a block costs as much as the arithmetic
        picks = np.take(values, draws.astype(np.intp))  # the cast floors: the products are >= 0
        sums[start:start + len(picks)] = python_sum(picks)
    return sums


def python_sum(rows: np.ndarray) -> np.ndarray:
    """Python's builtin sum() of each row's floats, bit for bit (see COMPENSATED_SUM)."""
    rows = rows.copy()
    rows[:, 0] += 0.0  # sum() starts from the int 0: 0 + -0.0 is 0.0
    with np.errstate(over="ignore", invalid="ignore"):  # infinities and NaN as IEEE arithmetic gives them
        partial = np.cumsum(rows, axis=1)  # left to right: the plain running sum
        if not COMPENSATED_SUM or rows.shape[1] == 1:
            return partial[:, -1]
        before, items, after = partial[:, :-1], rows[:, 1:], partial[:, 1:]
        # Each addition's rounding error, as CPython computes it: from the operand of larger magnitude.
        errors = np.where(np.abs(before) >= np.abs(items), (before - after) + items, (items - after) + before)
        correction = np.cumsum(errors, axis=1)[:, -1]
        # CPython adds a finite, non-zero correction only (an overflowed sum stays infinite).
        return np.where((correction != 0) & np.isfinite(correction), partial[:, -1] + correction, partial[:, -1])
