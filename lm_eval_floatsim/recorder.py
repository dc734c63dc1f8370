"""What the dumps are made of: per block, a few values of one batch and error statistics of all.

A `Recorder` is attached to the model (``model.recorder``); every block asks it for an observer
(``recorder.layer(layer_idx, mask)``) and passes that to `quant.conv_silu`, which calls it with the
block's Conv1D+SiLU output before and after quantization.

Nothing is recorded until `arm()` is called: calibration and lm-eval's batch-size probing run
before that and leave no trace. The armed forward is the *snapshot batch*: each block keeps
``dump_n`` values of batch row 0 in (channel, position) order. Statistics accumulate from the armed
forward on, over every real (mask == 1) position of every forward, until the end of the run.

Statistics stay on the device: an observer never synchronises with the host (no ``.item()``,
``bool()``, ``.cpu()``), so the model runs as it would without a recorder. `layer_summaries()` and
`snapshots()` bring everything to the host once, at the end. Data-parallel runs all-reduce
`partial_sums` (SUM) and `partial_maxes` (MAX) before calling them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# Columns of `Recorder.sums`. The error sums run over values whose before and after are finite
# (COUNT of them); NONFINITE counts the real values where either is not.
COUNT, SUM_ABS_ERR, SUM_SQ_SIGNAL, SUM_SQ_ERR, CLAMPED, NONFINITE = range(6)
N_SUMS = 6
# Partial rows per block that add up to its statistics: a GPU kernel's programs spread their
# atomic adds over them, since hundreds of atomics on one address wait for each other.
SLOTS = 32

DEFAULT_DUMP_N = 10


@dataclass(frozen=True)
class Snapshot:
    """One block's dumped values: before and after output quantization, and the integer codes
    (None for fp; a code is None where the value it quantized was NaN, and a float if it is not
    an integer, so that `check` reports it)."""

    before: list[float]
    after: list[float]
    codes: Optional[list]


class Recorder:
    def __init__(self, n_layer: int, dump_n: int = DEFAULT_DUMP_N, device="cpu"):
        self.n_layer, self.dump_n = n_layer, dump_n
        self.partial_sums = torch.zeros(n_layer, SLOTS, N_SUMS, dtype=torch.float64, device=device)
        self.partial_maxes = torch.zeros(n_layer, SLOTS, dtype=torch.float32, device=device)
        self._values: list[Optional[tuple]] = [None] * n_layer
        self._armed = False
        self._recording = False

    @property
    def sums(self) -> torch.Tensor:
        """(n_layer, N_SUMS) float64: the statistics' sums per block (columns COUNT...NONFINITE)."""
        return self.partial_sums.sum(dim=1)

    @property
    def maxes(self) -> torch.Tensor:
        """(n_layer,) float32: the largest finite |after - before| per block."""
        return self.partial_maxes.amax(dim=1)

    def arm(self) -> None:
        """Make the next forward the snapshot batch and start the statistics.

        Only the first call counts; later ones change nothing, so a caller may arm before every batch.
        """
        if not self._recording:
            self._armed = self._recording = True

    @property
    def armed(self) -> bool:
        return self._armed

    def layer(self, layer_idx: int, mask: Optional[torch.Tensor]) -> Optional["LayerObserver"]:
        """The observer of block `layer_idx` for one forward, or None while nothing is recorded."""
        if not self._recording:
            return None
        return LayerObserver(self, layer_idx, mask)

    def wants_values(self, layer_idx: int) -> bool:
        return self._armed and self._values[layer_idx] is None

    def keep_values(self, layer_idx: int, before, after, codes) -> None:
        self._values[layer_idx] = (before, after, codes)
        if all(values is not None for values in self._values):
            self._armed = False

    def snapshots(self) -> list[Optional[Snapshot]]:
        """Per block, the dumped values (None for a block the snapshot batch did not reach)."""
        return [None if values is None else _snapshot_to_host(*values) for values in self._values]

    def layer_summaries(self) -> list[dict]:
        """Per block: count, max/mean |after - before|, SQNR in dB, clamped fraction, non-finite count.

        Quantities without a finite value are None: every error statistic when no finite value
        was seen; `sqnr_db` also when the error is exactly zero (fp mode, or values that all sit on
        the grid) or the signal is (SQNR would be +inf or -inf dB, which JSON cannot hold).
        """
        sums = self.sums.cpu().tolist()
        maxes = self.maxes.cpu().tolist()
        return [_summary(layer_idx, row, maxes[layer_idx]) for layer_idx, row in enumerate(sums)]


class LayerObserver:
    """Block `index`'s view of the recorder for one forward; `quant.conv_silu` calls it.

    A fused kernel that computes the statistics itself accumulates into `sums` (this block's
    partial rows, (SLOTS, N_SUMS) float64, contiguous) and `maxes` ((SLOTS,) float32) directly,
    over positions where `mask` is 1, and calls the observer only while `wants_values`.
    """

    __slots__ = ("recorder", "index", "mask", "sums", "maxes")

    def __init__(self, recorder: Recorder, index: int, mask: Optional[torch.Tensor]):
        self.recorder, self.index, self.mask = recorder, index, mask
        self.sums = recorder.partial_sums[index]
        self.maxes = recorder.partial_maxes[index]

    @property
    def wants_values(self) -> bool:
        return self.recorder.wants_values(self.index)

    def __call__(self, before: torch.Tensor, after: torch.Tensor, codes, clamped) -> None:
        """before, after, codes, clamped: (batch, length, channels); codes and clamped None in fp mode."""
        if self.wants_values:
            self.recorder.keep_values(self.index, *_first_values(self.recorder.dump_n, before, after, codes))
        if before.numel():
            self._accumulate(before, after, clamped)

    def _accumulate(self, before, after, clamped) -> None:
        # Each term is one pass over the activations, as few as the statistics allow. Partial sums
        # of one call are fp32 (torch sums pairwise: relative error ~1e-8 at these sizes) and are
        # accumulated in float64, where the many calls of a run add up.
        error = (after - before).abs_()
        # False where before or after is NaN or infinite (or their difference overflows fp32, which
        # needs |before| near 3.4e38: after is bounded by the code range or equals before)
        valid = error < math.inf
        if self.mask is None:
            real = before.numel()
        else:
            real_positions = (self.mask != 0).unsqueeze(-1)
            valid &= real_positions
            real = torch.count_nonzero(real_positions) * before.shape[-1]
        zero = before.new_zeros(())
        error = torch.where(valid, error, zero)
        signal = torch.where(valid, before, zero)
        count = torch.count_nonzero(valid)
        n_clamped = torch.count_nonzero(clamped & valid) if clamped is not None else zero
        update = torch.stack(
            [
                count.double(),
                error.sum().double(),
                (signal * signal).sum().double(),
                (error * error).sum().double(),
                n_clamped.double(),
                (real - count).double(),
            ]
        )
        self.sums[0] += update
        torch.maximum(self.maxes[:1], error.amax().reshape(1), out=self.maxes[:1])


def _first_values(dump_n: int, *tensors):
    """Batch row 0 in (channel, position) order, first dump_n values: ``t[0].T.flatten()[:dump_n]``.

    Only the channels that hold those values are transposed and copied.
    """
    length = tensors[0].shape[1]
    channels = max(1, math.ceil(dump_n / length)) if length else 0
    return tuple(None if t is None else t[0, :, :channels].T.flatten()[:dump_n].clone() for t in tensors)


def _snapshot_to_host(before, after, codes) -> Snapshot:
    return Snapshot(
        before=before.cpu().tolist(),
        after=after.cpu().tolist(),
        codes=None if codes is None else [_code(code) for code in codes.cpu().tolist()],
    )


def _code(value: float):
    """An integer code as int; anything else as it is (a check then reports it), NaN as None."""
    if not math.isfinite(value):
        return None
    return int(value) if value.is_integer() else value


def _summary(layer_idx: int, row: list[float], max_abs_err: float) -> dict:
    count = int(row[COUNT])
    seen = count > 0
    return {
        "layer_idx": layer_idx,
        "count": count,
        "max_abs_err": max_abs_err if seen else None,
        "mean_abs_err": row[SUM_ABS_ERR] / count if seen else None,
        "sqnr_db": sqnr_db(row[SUM_SQ_SIGNAL], row[SUM_SQ_ERR]),
        "clamped_fraction": row[CLAMPED] / count if seen else None,
        "nonfinite": int(row[NONFINITE]),
    }


def sqnr_db(signal_energy: float, error_energy: float) -> Optional[float]:
    """10 log10(signal / error), or None when that is not a finite number."""
    if signal_energy > 0 and error_energy > 0 and math.isfinite(signal_energy) and math.isfinite(error_energy):
        return 10 * math.log10(signal_energy / error_energy)
    return None
