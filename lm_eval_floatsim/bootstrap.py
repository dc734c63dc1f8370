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
  error (Neumaier) and adds that at the end: both are reproduced here, the running sums addition
  by addition and each addition's rounding error exactly;
- the statistic itself and the standard error are lm-eval's own functions, applied to the same
  Python floats.
Anything else (another statistic, values that are not exact Python floats) goes to lm-eval's own
function. tests/test_bootstrap.py checks the result against lm-eval's, bit for bit, and the sums
against both of CPython's summation loops (3.11's and 3.12's), whichever Python runs the tests.
"""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Sequence

import numpy as np

# lm-eval's chunk of resamples drawn from one seed (`min(1000, iters)` in bootstrap_stderr).
CHUNK = 1000
# Resamples whose picks are summed at once. Blocks this large keep the pool's threads in numpy's
# and torch's loops, which release the GIL, rather than in the Python between them, where they
# take turns: with small blocks more threads took longer (docs/BENCHMARKS.md).
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
    with ThreadPoolExecutor(max_workers=_workers(), initializer=_one_torch_thread) as pool:
        sums = pool.map(lambda seed: resampled_sums(values, seed, size), range(iters // size))
        totals = np.concatenate(list(sums)).tolist()
    _restore_torch_threads()
    n = len(xs)
    # f of a resample is f(mean); f([m]) computes exactly that from m = sum / len, as `mean` does.
    return sample_stddev([f([total / n]) for total in totals])


def _one_torch_thread() -> None:
    """torch's cumsum splits a block's rows over torch's own threads; the pool's threads already
    use every core, so each sums on its own. (torch.set_num_threads in a thread sets OpenMP's and
    MKL's count for that thread alone, and the count of one pool shared by the process, which
    `_restore_torch_threads` sets back.)"""
    import torch

    torch.set_num_threads(1)


def _restore_torch_threads() -> None:
    import torch

    torch.set_num_threads(torch.get_num_threads())  # this thread's count, to the shared pool too


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
    with np.errstate(over="ignore", invalid="ignore"):  # infinities and NaN as IEEE arithmetic gives them
        partial = running_sums(rows)  # the plain running sum
        partial += 0.0  # sum() starts from the int 0: its running sum is never -0.0 (0 + -0.0 is 0.0)
        if not COMPENSATED_SUM or rows.shape[1] == 1:
            return partial[:, -1]
        before, items, after = partial[:, :-1], rows[:, 1:], partial[:, 1:]
        # Each addition's rounding error. CPython computes it from the operand of larger magnitude
        # (Fast2Sum); Knuth's branch-free TwoSum gives the same exact error wherever that one is
        # finite, and a non-finite one wherever that one is not, in fewer passes over the arrays.
        virtual = after - before
        errors = before - (after - virtual)
        errors += items - virtual
        correction = running_sums(errors)[:, -1]
        # CPython adds a finite, non-zero correction only (an overflowed sum stays infinite).
        return np.where((correction != 0) & np.isfinite(correction), partial[:, -1] + correction, partial[:, -1])


def running_sums(rows: np.ndarray) -> np.ndarray:
    """Each row's running sum, added left to right in float64 (np.cumsum's numbers). torch's cumsum
    computes the same sequence of additions and, unlike numpy's (2.x), releases the GIL while it
    runs: with numpy's, the pool's threads took turns (docs/BENCHMARKS.md)."""
    import torch

    return torch.cumsum(torch.from_numpy(rows), dim=1).numpy()
