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
function.

The picks of a resample depend on the number of values and the seed alone. Within
`reusing_resamples` (sweep and sensitivity, whose evaluations bootstrap the same number of
documents again and again) they are drawn once and kept. Where CUDA and Triton are there, the
sums run on the GPU (`kernels.resample_sums_triton`), the same additions in the same order.

tests/test_bootstrap.py checks the result against lm-eval's, bit for bit, the sums against both
of CPython's summation loops (3.11's and 3.12's), whichever Python runs the tests, and the GPU's
sums against `python_sum`.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import numpy as np

# lm-eval's chunk of resamples drawn from one seed (`min(1000, iters)` in bootstrap_stderr).
CHUNK = 1000
# Resamples whose picks are summed at once. Blocks this large keep the pool's threads in numpy's
# and torch's loops, which release the GIL, rather than in the Python between them, where they
# take turns: with small blocks more threads took longer (docs/BENCHMARKS.md).
ROWS_PER_BLOCK = 64
# Python's sum() of floats compensates its rounding errors from 3.12 on (Neumaier summation).
COMPENSATED_SUM = sys.version_info >= (3, 12)
# Picks kept by `reusing_resamples`, at most: a 5153-document task's take 1 GiB (100,000
# resamples of 16-bit picks); a larger task's are drawn again for every evaluation.
KEPT_BYTES = 4 << 30

# Picks by (n, seed, size) on the CPU and (n, seeds, size, device) on a GPU, while
# `reusing_resamples` is active.
_kept: Optional[dict] = None
# The pool's threads keep picks side by side: one at a time adds to _kept and counts its bytes.
_keeping = threading.Lock()


def statistics_of_the_mean() -> tuple:
    """lm-eval's bootstrapped aggregations that are a function of the mean of their items."""
    from lm_eval.api import metrics

    return (metrics.perplexity,)


def reproduces(f: Callable, xs: Sequence) -> bool:
    return f in statistics_of_the_mean() and len(xs) > 0 and all(type(x) is float for x in xs)


@contextlib.contextmanager
def reusing_resamples():
    """Within: each seed's picks are drawn once per number of values and kept (up to KEPT_BYTES)."""
    global _kept
    outer = _kept
    _kept = {} if outer is None else outer
    try:
        yield
    finally:
        _kept = outer


def bootstrap_stderr(f: Callable, xs: Sequence, iters: int, original: Callable) -> float:
    """`original(f, xs, iters)` (lm-eval's bootstrap_stderr), computed faster where it can be reproduced."""
    if not reproduces(f, xs) or iters <= 0:
        return original(f, xs, iters)
    from lm_eval.api.metrics import sample_stddev

    size = min(CHUNK, iters)
    totals = resampled_sums(np.asarray(xs, dtype=np.float64), range(iters // size), size).tolist()
    n = len(xs)
    # f of a resample is f(mean); f([m]) computes exactly that from m = sum / len, as `mean` does.
    return sample_stddev([f([total / n]) for total in totals])


def resampled_sums(values: np.ndarray, seeds: Sequence[int], size: int) -> np.ndarray:
    """sum(random.Random(seed).choices(values, k=n)) for each of a seed's `size` resamples, seed after seed."""
    with ThreadPoolExecutor(max_workers=_workers(), initializer=_one_torch_thread) as pool:
        sums = _sums_on_gpu(values, seeds, size, pool)
        if sums is None:
            sums = np.concatenate(list(pool.map(lambda seed: _sums_on_cpu(values, seed, size), seeds)))
    _restore_torch_threads()
    return sums


def _sums_on_cpu(values: np.ndarray, seed: int, size: int) -> np.ndarray:
    n = len(values)
    picks = _kept_or_drawn((n, seed, size), lambda: resample_picks(n, seed, size))
    sums = np.empty(len(picks))
    for start in range(0, len(picks), ROWS_PER_BLOCK):
        block = picks[start:start + ROWS_PER_BLOCK]
        sums[start:start + len(block)] = python_sum(values[block])
    return sums


def _sums_on_gpu(values: np.ndarray, seeds: Sequence[int], size: int, pool) -> Optional[np.ndarray]:
    """The sums from the GPU's kernel; None where it cannot run or the GPU has no room for the picks
    (about 1 GiB for 5153 documents), which the evaluation's model may have taken: the CPU sums."""
    import torch

    from .kernels import resample_sums

    try:
        gpu_values = _on_gpu(values)
        if gpu_values is None:
            return None
        n, device = len(values), gpu_values.device
        picks = _kept_or_drawn((n, tuple(seeds), size, device), lambda: _picks_on(device, n, seeds, size, pool))
        return resample_sums(picks, gpu_values, COMPENSATED_SUM)
    except torch.cuda.OutOfMemoryError:
        return None


def _on_gpu(values: np.ndarray):
    """The values on the current CUDA device where the summing kernel runs there, else None."""
    from .kernels import resample_sums_available

    if not resample_sums_available():
        return None
    import torch

    return torch.from_numpy(values).to(torch.device("cuda", torch.cuda.current_device()))


def resample_picks(n: int, seed: int, size: int) -> np.ndarray:
    """The indices `random.Random(seed).choices(range(n), k=n)` picks, for `size` resamples:
    floor(random() * n) each, 16-bit where n allows."""
    stream = np.random.RandomState([seed])  # a list: init_by_array, as random.seed(int) seeds
    picks = np.empty((size, n), dtype=np.int16 if n <= 1 << 15 else np.int32)
    for start in range(0, size, ROWS_PER_BLOCK):
        draws = stream.random_sample((min(ROWS_PER_BLOCK, size - start), n))
        draws *= float(n)  # in place: each new array of a block costs as much as the arithmetic
        picks[start:start + len(draws)] = draws  # the cast floors: the products are >= 0 and < n
    return picks


def _picks_on(device, n: int, seeds: Sequence[int], size: int, pool):
    """Every seed's picks on `device`, one resample per column (as the summing kernel reads them),
    seed after seed."""
    import torch

    columns = pool.map(lambda seed: torch.from_numpy(resample_picks(n, seed, size)).to(device).t(), seeds)
    return torch.cat(list(columns), dim=1)


def _kept_or_drawn(key: tuple, draw: Callable):
    """Picks kept under `key` by `reusing_resamples`, or drawn (and kept while KEPT_BYTES allows)."""
    kept = _kept
    if kept is not None and key in kept:
        return kept[key]
    picks = draw()
    if kept is not None:
        with _keeping:
            if sum(p.nbytes for p in kept.values()) + picks.nbytes <= KEPT_BYTES:
                kept[key] = picks
    return picks


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
