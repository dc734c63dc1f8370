"""Python's builtin sum() of each bootstrap resample on the GPU: `bootstrap.python_sum`'s additions
in the same order, one resample per lane.

A resample's sum is a chain of n dependent float64 additions (and, from Python 3.12, as many
compensation steps) in the order Python adds them: it cannot be split across lanes, but the
resamples are independent, so each lane adds one. The picks are stored one resample per column,
so that a warp's loads of one step are contiguous. No product appears, so nothing can be fused
into an FMA, and float64 keeps its subnormals on the GPU: every addition is the CPU's.
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

BLOCK = 128


def resample_sums(picks_t: torch.Tensor, values: torch.Tensor, compensated: bool) -> np.ndarray:
    """The sums of the resamples `values[picks_t[:, j]]`, j = 0, 1, ...: plain running sums, or with
    Python 3.12's compensation (`compensated`)."""
    n, rows = picks_t.shape
    out = torch.empty(rows, dtype=torch.float64, device=values.device)
    _resample_sums_kernel[(triton.cdiv(rows, BLOCK),)](
        picks_t, values, out, n, rows, COMPENSATED=compensated, BLOCK=BLOCK
    )
    return out.cpu().numpy()


@triton.jit
def _resample_sums_kernel(picks_ptr, values_ptr, out_ptr, n, rows, COMPENSATED: tl.constexpr, BLOCK: tl.constexpr):
    lane = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    live = lane < rows
    step = picks_ptr + lane
    # sum() starts from the int 0: the first addition is 0 + x, which is never -0.0 and is exact.
    total = tl.load(values_ptr + tl.load(step, mask=live, other=0).to(tl.int32)) + 0.0
    correction = tl.zeros([BLOCK], dtype=tl.float64)
    for _ in range(1, n):
        step += rows
        x = tl.load(values_ptr + tl.load(step, mask=live, other=0).to(tl.int32))
        after = total + x
        if COMPENSATED:
            # The addition's exact rounding error (Knuth's TwoSum), as python_sum takes it.
            virtual = after - total
            correction += (total - (after - virtual)) + (x - virtual)
        total = after
    if COMPENSATED:
        # CPython adds a finite, non-zero correction only (an overflowed sum stays infinite).
        finite = (correction == correction) & (tl.abs(correction) != float("inf"))
        total = tl.where((correction != 0) & finite, total + correction, total)
    tl.store(out_ptr + lane, total, mask=live)
