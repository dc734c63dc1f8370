"""bootstrap.bootstrap_stderr against lm-eval's own bootstrap_stderr, bit for bit, on the Python
running the tests (its builtin sum decides what a resample's mean is)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from lm_eval.api import metrics

from lm_eval_floatsim import bootstrap


def lm_evals(f, xs, iters):
    """lm-eval 0.4.13's bootstrap_stderr in one process (its multiprocessing pool draws the same chunks)."""
    return metrics.bootstrap_stderr(f, xs, iters)


@pytest.fixture(autouse=True)
def one_process(monkeypatch):
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")


def loglikelihoods(n: int, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return [float(v) for v in -np.abs(rng.lognormal(-3.0, 2.0, n))]


@pytest.mark.parametrize("n, iters", [(1, 1000), (2, 1000), (7, 2500), (300, 3000), (64, 100000)])
def test_perplexity_stderr_is_lm_evals_bit_for_bit(n, iters):
    xs = loglikelihoods(n, seed=n)
    expected = lm_evals(metrics.perplexity, xs, iters)
    got = bootstrap.bootstrap_stderr(metrics.perplexity, xs, iters, original=pytest.fail)
    assert got == expected or (math.isnan(got) and math.isnan(expected))


def test_infinite_loglikelihoods_give_lm_evals_result():
    xs = loglikelihoods(20, seed=3)
    xs[4] = -math.inf
    expected = lm_evals(metrics.perplexity, xs, 2000)
    got = bootstrap.bootstrap_stderr(metrics.perplexity, xs, 2000, original=pytest.fail)
    assert math.isnan(expected) == math.isnan(got) and (math.isnan(got) or got == expected)


def hard_rows() -> np.ndarray:
    """Magnitudes 10^-20..10^20 (where compensation changes the last bits), signed zeros, overflow, infinities."""
    rng = np.random.default_rng(0)
    rows = rng.normal(0, 1, (400, 40)) * 10.0 ** rng.integers(-20, 20, (400, 40))
    rows[0] = -0.0
    rows[1, 3], rows[2, 5], rows[2, 6] = -np.inf, np.inf, -np.inf
    rows[3] = 1e308
    rows[4] = [1e308, -1e308] * 20
    rows[5, :2] = -0.0
    rows[6, ::2] = 1e-300
    rows[6, 1::2] = -1e-300 * (1 + 2.0 ** -52)
    return rows


def plain_sum(row: list[float]) -> float:
    """CPython 3.11's builtin sum() of floats: the int start 0 plus each item, left to right."""
    total = 0 + row[0]
    for x in row[1:]:
        total += x
    return total


def compensated_sum(row: list[float]) -> float:
    """CPython 3.12+'s builtin sum() of floats, step by step as Python/bltinmodule.c computes it:
    the int start 0 plus the first item, then Neumaier's compensated loop, then the correction
    added when it is finite and non-zero."""
    total, correction = 0 + row[0], 0.0
    for x in row[1:]:
        t = total + x
        correction += (total - t) + x if abs(total) >= abs(x) else (x - t) + total
        total = t
    return total + correction if correction and math.isfinite(correction) else total


def test_python_sum_is_builtin_sum_bit_for_bit():
    rows = hard_rows()
    got = bootstrap.python_sum(rows).tolist()
    expected = [sum(row) for row in rows.tolist()]
    assert [repr(value) for value in got] == [repr(value) for value in expected]  # repr: -0.0 and nan too


def long_rows() -> np.ndarray:
    """As long as a lambada's documents (5153), where a summing kernel might change its order."""
    rng = np.random.default_rng(1)
    return -np.abs(rng.lognormal(-3.0, 2.0, (3, 6000))) * 10.0 ** rng.integers(-8, 8, (3, 6000))


@pytest.mark.parametrize("compensated", [False, True])
@pytest.mark.parametrize("rows", [hard_rows(), long_rows()], ids=["hard", "long"])
def test_python_sum_follows_both_of_cpythons_sums(compensated, rows, monkeypatch):
    """Whichever Python runs the tests, both ways sum() has added floats: left to right (up to
    3.11) and compensated (3.12 on)."""
    monkeypatch.setattr(bootstrap, "COMPENSATED_SUM", compensated)
    reference = compensated_sum if compensated else plain_sum
    got = bootstrap.python_sum(rows).tolist()
    assert [repr(value) for value in got] == [repr(reference(row)) for row in rows.tolist()]


@pytest.mark.parametrize("f, xs", [(metrics.perplexity, [np.float64(-0.5), np.float64(-0.25)]),
                                   (metrics.median, [-0.5, -0.25, -0.125])])
def test_what_it_cannot_reproduce_goes_to_lm_eval(f, xs):
    calls = []

    def original(*args):
        calls.append(args)
        return 0.125

    assert bootstrap.bootstrap_stderr(f, xs, 1000, original=original) == 0.125
    assert calls == [(f, xs, 1000)]


def test_the_callers_torch_threads_are_left_as_they_were():
    """The pool's threads sum with one torch thread each; the calling thread keeps its count."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        bootstrap.bootstrap_stderr(metrics.perplexity, loglikelihoods(3000, seed=5), 2000, original=pytest.fail)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_kept_picks_are_drawn_once_per_seed_and_give_the_same_result(monkeypatch):
    """Within reusing_resamples a second evaluation of as many documents draws nothing and gives the
    same number; beyond KEPT_BYTES picks are drawn again; after the block nothing is kept."""
    drawn = []
    draw = bootstrap.resample_picks
    monkeypatch.setattr(bootstrap, "resample_picks", lambda n, seed, size: drawn.append((n, seed)) or draw(n, seed, size))
    xs, others = loglikelihoods(300, seed=8), loglikelihoods(300, seed=9)
    alone = lm_evals(metrics.perplexity, others, 3000)
    with bootstrap.reusing_resamples():
        bootstrap.bootstrap_stderr(metrics.perplexity, xs, 3000, original=pytest.fail)
        assert len(drawn) == 3
        assert bootstrap.bootstrap_stderr(metrics.perplexity, others, 3000, original=pytest.fail) == alone
        assert len(drawn) == 3
        monkeypatch.setattr(bootstrap, "KEPT_BYTES", 0)
        bootstrap.bootstrap_stderr(metrics.perplexity, loglikelihoods(301, seed=1), 3000, original=pytest.fail)
        bootstrap.bootstrap_stderr(metrics.perplexity, loglikelihoods(301, seed=2), 3000, original=pytest.fail)
        assert len(drawn) == 9
    bootstrap.bootstrap_stderr(metrics.perplexity, xs, 3000, original=pytest.fail)
    assert len(drawn) == 12


def test_picks_are_pythons_choices():
    """random.Random(seed).choices(range(n), k=n) for each resample, in order; 16-bit up to 2**15 values."""
    import random

    for n in (1, 5153, 1 << 15, (1 << 15) + 1):
        picks = bootstrap.resample_picks(n, seed=7, size=3)
        stream = random.Random(7)
        assert picks.tolist() == [stream.choices(range(n), k=n) for _ in range(3)]
        assert picks.dtype == (np.int16 if n <= 1 << 15 else np.int32)


def test_a_gpu_without_room_for_the_picks_leaves_the_sums_to_the_cpu(monkeypatch):
    """The evaluated model may fill the GPU: running out of its memory at the end of a run must not
    lose the run."""
    import torch

    from lm_eval_floatsim import kernels

    def out_of_memory(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(bootstrap, "_on_gpu", lambda values: torch.from_numpy(values))
    monkeypatch.setattr(kernels, "resample_sums", out_of_memory)
    xs = loglikelihoods(300, seed=6)
    got = bootstrap.bootstrap_stderr(metrics.perplexity, xs, 3000, original=pytest.fail)
    assert got == lm_evals(metrics.perplexity, xs, 3000)


def gpu_sums_available() -> bool:
    from lm_eval_floatsim.kernels import resample_sums_available

    return resample_sums_available()


@pytest.mark.skipif(not gpu_sums_available(), reason="needs CUDA and Triton")
@pytest.mark.parametrize("compensated", [False, True])
@pytest.mark.parametrize("rows", [hard_rows(), long_rows()], ids=["hard", "long"])
@pytest.mark.parametrize("index_dtype", ["int16", "int32"])
def test_gpu_sums_are_python_sum_bit_for_bit(compensated, rows, index_dtype, monkeypatch):
    """The GPU's sums of resamples, each given by its picks, against python_sum of the picked rows
    (itself checked against CPython's sums above)."""
    import torch

    from lm_eval_floatsim.kernels import resample_sums

    monkeypatch.setattr(bootstrap, "COMPENSATED_SUM", compensated)
    order = np.random.default_rng(4).permutation(rows.size)
    values = rows.ravel()[order]  # the rows' values shuffled, so that the picks jump about
    picks = np.argsort(order).reshape(rows.shape)  # values[picks] == rows
    got = resample_sums(torch.from_numpy(picks.astype(index_dtype).T.copy()).cuda(),
                        torch.from_numpy(values).cuda(), compensated)
    expected = bootstrap.python_sum(values[picks])
    assert [repr(v) for v in got.tolist()] == [repr(v) for v in expected.tolist()]
