"""The quantized Conv1D+SiLU step of a Mamba block, in every mode.

This module is the single source of the arithmetic: rounding, clamping, the INT8 kernel's
integer accumulation and fp32 epilogue, and the float simulation all live here, and the recorder,
the dumps and the GPU kernels take their definitions from it.

Layout: activations are channels-last, ``x[batch, position, channel]``, as they come out of
in_proj, so no transposing copy is needed. The conv is depthwise and causal with kernel width K:
``out[t] = bias + sum_k w[k] * x[t - K + 1 + k]``, taps summed in order k = 0..K-1.
"""

from __future__ import annotations

import functools
import logging
from fractions import Fraction
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import ArgumentError
from .modes import FP, INT8_KERNEL, INT8_RANGE, KERNEL_ROUNDING, QuantSpec

logger = logging.getLogger(__name__)

# The float simulation's arithmetic formats (`asic_dtype`). torch computes each elementwise +, *,
# / of float16 or bfloat16 tensors in float32 and rounds the result once; float32 carries more
# than 2p + 2 bits of either format, so that is the correctly rounded result of the format itself.
FORMATS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

Observer = Callable[[torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]], None]


@dataclass(frozen=True)
class LayerScales:
    """Per-block scales: s_x (conv input), s_y (conv+SiLU output), s_w and s_b (conv weight, bias)."""

    input: float
    output: float
    weight: float
    bias: float


# How a block's conv input and output scales are chosen: one s_x and one s_y for the whole conv
# (Quamba's, the default), or one per segment of a Mamba-2 conv's channels, x, B and C (Quamba2's).
CONV_SCALES = ("conv", "xbc")


@dataclass(frozen=True)
class SegmentedScales:
    """Per-block scales of a conv quantized in consecutive channel segments (conv_scales=xbc:
    Mamba-2's x, B and C), each with its own s_x and s_y; s_w and s_b stay the whole conv's. The
    conv is depthwise, so each segment is the Conv1D+SiLU step of its channels with its LayerScales."""

    names: tuple[str, ...]
    widths: tuple[int, ...]
    inputs: tuple[float, ...]
    outputs: tuple[float, ...]
    weight: float
    bias: float

    def segments(self) -> list[tuple[str, slice, LayerScales]]:
        """(name, its channels, its LayerScales) of every segment, in channel order."""
        starts = np.cumsum((0,) + self.widths[:-1]).tolist()
        return [
            (name, slice(start, start + width), LayerScales(s_x, s_y, self.weight, self.bias))
            for name, start, width, s_x, s_y in zip(self.names, starts, self.widths, self.inputs, self.outputs)
        ]


def round_half_away(t: torch.Tensor) -> torch.Tensor:
    # floor(|t| + 0.5) is wrong just below .5 ties in fp32. The fraction t - trunc(t) is exact, and
    # trunc of twice it is +-1 exactly when |fraction| >= 0.5 (0 for inf, whose fraction is NaN).
    whole = torch.trunc(t)
    return whole + torch.trunc(2 * (t - whole)).nan_to_num_(0.0)


def round_half_even(t: torch.Tensor) -> torch.Tensor:
    return torch.round(t)


def round_codes(t: torch.Tensor, rounding: str) -> torch.Tensor:
    return round_half_away(t) if rounding == "half_away" else round_half_even(t)


def quantize_codes(
    t: torch.Tensor, scale: float, rounding: str, code_range: Optional[tuple[float, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``clamp(rnd(t / scale), lo, hi)`` as fp32 integers, and where clamping changed them.

    The division is in t's format (with the scale rounded to it); rounding and clamping, exact on
    integers, are in fp32, where codes beyond a 16-bit format's range still fit.
    """
    return clamp_codes(round_codes(divide_by_scale(t, scale), rounding), code_range)


def divide_by_scale(t: torch.Tensor, scale: float) -> torch.Tensor:
    """t / scale, correctly rounded in t's format (with the scale rounded to it), as fp32."""
    return (t / _scalar(scale, t.dtype, t.device)).float()


def clamp_codes(rounded: torch.Tensor, code_range: Optional[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """The rounded codes clamped to `code_range` (None: not clamped), and where clamping changed them."""
    if code_range is None:
        return rounded, torch.zeros_like(rounded, dtype=torch.bool)
    codes = rounded.clamp(code_range[0], code_range[1])
    return codes, codes != rounded


def value_bounds(scale: float, code_range: tuple[float, float], rounding: str) -> Optional[tuple[float, float]]:
    """(A, B): the smallest fp32 value whose fp32 code (`quantize_codes` before clamping) is at
    least lo, and the largest whose code is at most hi. A code is a monotone function of the
    value, so clamp(code(t), lo, hi) = code(clamp(t, A, B)) for every t (NaN stays NaN), and
    clamping changes a code exactly where t lies outside [A, B]: the fused kernel clamps values,
    which bounds its quotients. Found among the fp32 neighbours of (lo - 1/2) * scale and
    (hi + 1/2) * scale; None where those do not hold the boundary (no scale in the kernel's
    range does that)."""
    lo, hi = code_range
    first, last = (_fp32_neighbours(np.float32(value * scale)) for value in (lo - 0.5, hi + 0.5))
    first_codes, last_codes = (round_codes(divide_by_scale(torch.from_numpy(t), scale), rounding).numpy() for t in (first, last))
    if first_codes[0] >= lo or first_codes[-1] < lo or last_codes[0] > hi or last_codes[-1] <= hi:
        return None
    return float(first[first_codes >= lo][0]), float(last[last_codes <= hi][-1])


def value_bounds_in(
    bounds: tuple[float, float], dtype: torch.dtype, scale: float, code_range: tuple[float, float], rounding: str
) -> Optional[tuple[float, float]]:
    """`value_bounds` (A, B) for values of `dtype` (fp16, bf16; fp32 keeps them): the smallest
    dtype value at least A and the largest at most B, so that a kernel may clamp its inputs before
    widening them. A dtype value above the upper one is above B, so clamping it to either gives hi
    if the upper one's own code is hi (and alike below); None where an end's code is not the
    range's (a scale whose range edge lies among dtype values closer than the scale)."""
    if dtype == torch.float32:
        return bounds
    exact = torch.tensor(bounds, dtype=torch.float32)
    nearest = exact.to(dtype)
    outside = torch.tensor([nearest[0] < exact[0], nearest[1] > exact[1]])
    inward = torch.tensor([np.inf, -np.inf], dtype=dtype)
    ends = torch.where(outside, torch.nextafter(nearest, inward), nearest).float()
    codes = round_codes(divide_by_scale(ends, scale), rounding)
    if codes.tolist() != [float(code_range[0]), float(code_range[1])]:
        return None
    return float(ends[0]), float(ends[1])


# Code ranges up to this many codes get `pair_codes_are_exact`'s check (better at divisor 2025 has
# 518,401); wider ones keep the kernel's division.
PAIR_CHECK_CODES = 2**20


def reciprocal_pair(scale: float) -> tuple[float, float]:
    """(r_hi, r_lo): fp32 values with r_hi the largest at most 1 / s and r_lo >= 0 the rest,
    rounded (s = fp32(scale)): r_hi + r_lo is 1 / s to about 2**-47 of it."""
    exact = 1 / Fraction(float(np.float32(scale)))
    hi = np.float32(float(exact))
    if Fraction(float(hi)) > exact:
        hi = np.nextafter(hi, np.float32(0))
    return float(hi), float(np.float32(float(exact - Fraction(float(hi)))))


def pair_quotient(t: torch.Tensor, pair: tuple[float, float], positive_zero: bool) -> torch.Tensor:
    """t / s as the fused kernel computes it from `reciprocal_pair` (fp32 t): RN(t * r_hi + RN(t * r_lo)),
    two FMAs. With positive_zero the low product is fma(t, r_lo, +0.0), so that t = -0.0 gives +0.0,
    as RN(t / s) + 0.0 does (round_half_away's zero of -0.0)."""
    hi, lo = (torch.full_like(t, value) for value in pair)
    low = fma_fp32(t, lo, torch.zeros_like(t)) if positive_zero else t * lo
    return fma_fp32(t, hi, low)


def pair_codes_are_exact(scale: float, code_range: tuple[float, float], rounding: str, device="cpu") -> bool:
    """Whether round(pair_quotient(t)) is `quantize_codes`' round(t / scale), signed zeros
    included, for every fp32 t in `value_bounds` (the fused kernel clamps t to them first).

    Both are monotone in t (r_lo >= 0), so they agree everywhere if they agree on either side of
    every t where the exact code changes, and there are few such t: the code of RN(t / s) changes
    only where RN(t / s) passes from one fp32 value to the next across a rounding decision, at the
    midpoint mu of two fp32 values around some k + 1/2, i.e. where t passes mu * s (exact in float64,
    and never an fp32 value, as no quotient of two fp32 values is a midpoint). The check takes the
    two fp32 neighbours of mu * s for both midpoints around k + 1/2 for every k from lo - 1 to hi,
    and the signed zeros. (Quotients below 2**-149, which round to a zero of either sign, are
    `_divide`'s exception too; no fp16 input or SiLU output of a scale in range makes one.) Done on
    `device`, where torch divides as IEEE says on the GPU as on the CPU."""
    lo, hi = code_range
    if hi - lo > PAIR_CHECK_CODES or max(-lo, hi) >= 2**22:  # k + 1/2 must be an fp32 value
        return False
    s = float(np.float32(scale))
    ties = torch.arange(lo - 1, hi + 1, dtype=torch.float64, device=device).add_(0.5).float()
    sides = [torch.nextafter(ties, torch.full_like(ties, direction)) for direction in (-np.inf, np.inf)]
    midpoints = torch.cat([(ties.double() + side.double()) / 2 for side in sides])
    crossings = midpoints * s
    nearest = crossings.float()
    other = torch.nextafter(nearest, torch.where(crossings > nearest.double(), np.inf, -np.inf).float())
    t = torch.cat([nearest, other, torch.tensor([0.0, -0.0], device=device)])
    exact = round_codes(divide_by_scale(t, s), rounding)
    cheap = round_codes(pair_quotient(t, reciprocal_pair(s), rounding == "half_away"), rounding)
    return torch.equal(exact.view(torch.int32), cheap.view(torch.int32))


def _fp32_neighbours(center: np.float32, count: int = 32) -> np.ndarray:
    """The 2 * count + 1 consecutive fp32 values around `center`, in increasing order."""
    below, above = [center], [center]
    for _ in range(count):
        below.append(np.nextafter(below[-1], np.float32(-np.inf)))
        above.append(np.nextafter(above[-1], np.float32(np.inf)))
    return np.array(below[:0:-1] + above, dtype=np.float32)


# A floor under SiLU's outputs: its minimum is -0.2784645427610738 (at v = -1.2784645427610738);
# every fp32 v gives quant.silu(v) above it (tests/test_quant.py) and so does the fused kernel,
# whose exp may differ in a last bit (the margin is about 1,200 ulps). A lower value bound at or
# below it never clamps a SiLU output.
SILU_FLOOR = -0.2785


def silu(v: torch.Tensor) -> torch.Tensor:
    """SiLU as the INT8 kernel's epilogue writes it, v / (1 + exp(-v)), used by every mode."""
    return v / (1 + torch.exp(-v))


def quantize_operands(x, weight, bias, scales: LayerScales, operand_rounding: str = KERNEL_ROUNDING):
    """X, W, Bq: the int8 codes of the conv input, weight and bias (fp32 tensors of integers).
    X is rounded as the kernel that produces it rounds (roundf); W and Bq with `operand_rounding`."""
    X, _ = quantize_codes(x, scales.input, KERNEL_ROUNDING, INT8_RANGE)
    W, _ = quantize_codes(weight, scales.weight, operand_rounding, INT8_RANGE)
    Bq, _ = quantize_codes(bias, scales.bias, operand_rounding, INT8_RANGE)
    return X, W, Bq


def conv_silu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    spec: QuantSpec,
    scales: Optional[LayerScales] = None,
    observer: Optional[Observer] = None,
    left_context: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The Conv1D+SiLU step of one block in `spec.mode`.

    x: (batch, length, channels) in the model dtype; weight: (channels, K); bias: (channels,).
    left_context: (batch, K-1, channels), the inputs before x (zeros when None: a sequence start).
    mask: (batch, length), 0 at padding: padding inputs count as zeros in every window (whatever
    they hold, NaN included) and padding outputs are 0, so a left-padded row computes what the
    unpadded row would.
    Returns the (dequantized) output in x's dtype. `observer(before, after, codes, clamped)`
    receives fp32 tensors of x's shape; before is the fp32 value ahead of output quantization
    (for int8 the emulated kernel's internal y); codes and clamped are None for fp.
    """
    if x.is_cuda and spec.asic_format == "float32":  # the fused Triton kernel computes the same, where it can run
        from .kernels import fused_conv_silu

        fused = fused_conv_silu(x, weight, bias, spec, scales, observer, left_context, mask)
        if fused is not None:
            return fused
    elif x.is_cuda:
        _warn_unfused(spec.asic_format)
    padding = None if mask is None else (mask == 0).unsqueeze(-1)
    if padding is not None:
        x = x.masked_fill(padding, 0)
    out = _conv_silu_values(x, weight, bias, spec, scales, observer, left_context)
    return out if padding is None else out.masked_fill_(padding, 0)


def _conv_silu_values(x, weight, bias, spec, scales, observer, left_context) -> torch.Tensor:
    taps = weight.shape[-1]
    if left_context is None:
        left_context = x.new_zeros(x.shape[0], taps - 1, x.shape[2])
    window = torch.cat([left_context, x], dim=1).float()
    arithmetic = spec.kind.arithmetic
    if arithmetic == FP:
        y = silu(causal_conv(window, weight.float(), bias.float()))
        if observer is not None:
            observer(y, y, None, None)
        return y.to(x.dtype)
    if scales is None:
        raise ArgumentError("scales", None, f"calibrated scales for mode={spec.mode}")

    X, W, Bq = quantize_operands(window, weight.float(), bias.float(), scales, spec.operand_rounding)
    effective = effective_scale(spec, scales.output)
    fast = arithmetic == INT8_KERNEL and spec.epilogue_math == "fast"
    if fast:
        y = fast_silu(_fast_int8_preactivation(X, W, Bq, scales))
    elif arithmetic == INT8_KERNEL:
        y = silu(_int8_kernel_preactivation(X, W, Bq, scales))
    else:
        y = _float_sim_conv_silu(X, W, Bq, scales, FORMATS[spec.asic_format])
    quotient = fast_quotient(y, effective) if fast else divide_by_scale(y, effective)
    codes, clamped = clamp_codes(round_codes(quotient, spec.output_rounding), spec.code_range())
    after = codes * _fp32(effective, x.device)
    if observer is not None:
        observer(y.float(), after, codes, clamped)
    return after.to(x.dtype)


def _float_sim_conv_silu(X, W, Bq, scales: LayerScales, dtype: torch.dtype) -> torch.Tensor:
    """SiLU(conv(X * s_x, W * s_w) + Bq * s_b) with every operand, product and sum, the exp, the
    sum 1 + exp and the division rounded to `dtype`, in the order of the fp32 path."""
    dev = X.device
    inputs, weights, bias = (codes.to(dtype) * _scalar(scale, dtype, dev) for codes, scale in
                             ((X, scales.input), (W, scales.weight), (Bq, scales.bias)))
    return silu(causal_conv(inputs, weights, bias))


def effective_scale(spec: QuantSpec, output_scale: float) -> Optional[float]:
    """The effective scale the arithmetic applies: the mode's (`QuantSpec.effective_scale`), as
    fp32, rounded to the ASIC's format for a float simulation in float16 or bfloat16 (what the
    dumps record and `check` verifies)."""
    exact = spec.effective_scale(output_scale)
    if exact is None or spec.asic_format == "float32":
        return exact
    return _scalar(exact, FORMATS[spec.asic_format], "cpu").item()


def causal_conv(window: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """bias + sum_k w[k] * window[t + k], taps in order; window carries K-1 leading positions."""
    taps = weight.shape[-1]
    length = window.shape[1] - taps + 1
    out = bias.expand(window.shape[0], length, -1)
    for k in range(taps):
        out = out + weight[:, k] * window[:, k : k + length]
    return out


def _int8_kernel_preactivation(X, W, Bq, scales: LayerScales) -> torch.Tensor:
    """v = (s_w * s_x) * acc + s_b * Bq in fp32, each product and the sum rounded, acc the exact
    integer sum of W * X."""
    acc, poisoned = _int8_accumulator(X, W)
    device = X.device
    v = acc * (_fp32(scales.weight, device) * _fp32(scales.input, device)) + _fp32(scales.bias, device) * Bq
    return _poison(v, poisoned)


def _int8_accumulator(X, W) -> tuple[torch.Tensor, torch.Tensor]:
    """acc = sum_k W[k] * X[t + k], exact in integers (as fp32, where it is exact: |acc| < 2**24),
    and the positions whose window holds a NaN input.

    A NaN input has no int8 code; positions whose window holds one come out NaN (`_poison`), as the
    float simulation's would, so non-finite activations stay visible instead of becoming garbage
    codes.
    """
    nan_inputs = torch.isnan(X)
    Xi = torch.where(nan_inputs, torch.zeros_like(X), X).to(torch.int32)
    acc = causal_conv(Xi, W.to(torch.int32), torch.zeros(W.shape[0], dtype=torch.int32, device=W.device))
    poisoned = causal_conv(nan_inputs.float(), torch.ones_like(W), torch.zeros_like(W[:, 0])) > 0
    return acc.float(), poisoned


def _poison(v: torch.Tensor, poisoned: torch.Tensor) -> torch.Tensor:
    return torch.where(poisoned, torch.full_like(v, float("nan")), v)


# --- the INT8 kernel's epilogue as `nvcc -O3 --use_fast_math` builds it (kernel_math=fast) ----------
# What the compiler makes of `v = s_wx * acc + s_b * Bq; y = v / (1 + expf(-v)); roundf(y / s_y)`:
# the sum contracted into one FMA, expf as ex2.approx of the product -v * log2(e), both divisions as
# div.approx, i.e. multiplications by rcp.approx (1 / s_y computed once), every result and operand
# of these flushed to zero when subnormal (the PTX and SASS of such a build: docs/BENCHMARKS.md).
# The FMA and the flushing are emulated exactly here; ex2.approx and rcp.approx are the GPU's own
# (MUFU) results, for which the CPU's exp2 and correctly rounded reciprocal stand in:
# docs/BENCHMARKS.md counts the codes that makes differ. The Triton kernel issues the
# instructions themselves.
FLT_MIN = 2.0**-126
LOG2E = float(np.float32(1.4426950408889634))  # the fp32 constant __expf multiplies by (0x3FB8AA3B)


def flush_subnormals(t: torch.Tensor) -> torch.Tensor:
    """A subnormal fp32 value as a zero of its sign (the ftz of every fast-math instruction)."""
    return torch.where(t.abs() < FLT_MIN, t * 0.0, t)


def fma_fp32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """RN(a * b + c) in fp32 with a single rounding, as an FMA computes it (fp32 operands).

    a * b is exact in float64 (48 significant bits). The float64 sum s is rounded to odd (its
    exact error, from Knuth's TwoSum, says which way), after which rounding to fp32 is the correct
    single rounding of a * b + c: round-to-odd with 53 >= 24 + 2 bits never double-rounds.
    """
    p, c64 = a.double() * b.double(), c.double()
    s = p + c64
    b_virtual = s - p
    error = (p - (s - b_virtual)) + (c64 - b_virtual)
    bits = s.view(torch.int64)
    even_and_inexact = (error != 0) & ((bits & 1) == 0) & torch.isfinite(s)
    step = torch.where((error > 0) == (s > 0), 1, -1)  # toward the exact sum
    return torch.where(even_and_inexact, (bits + step).view(torch.float64), s).float()


def fast_reciprocal(t: torch.Tensor) -> torch.Tensor:
    """rcp.approx.ftz.f32, for which the correctly rounded reciprocal stands in on the CPU."""
    return flush_subnormals(1.0 / flush_subnormals(t))


def fast_exp(t: torch.Tensor) -> torch.Tensor:
    """__expf: ex2.approx.ftz of RN(t * log2(e)); the CPU's exp2 stands in for ex2.approx."""
    return flush_subnormals(torch.exp2(flush_subnormals(t * LOG2E)))


def fast_silu(v: torch.Tensor) -> torch.Tensor:
    """v / (1 + expf(-v)) under fast math: v times rcp.approx(1 + ex2.approx(-v * log2(e)))."""
    denominator = flush_subnormals(1.0 + fast_exp(-v))
    return flush_subnormals(v * fast_reciprocal(denominator))


def fast_quotient(y: torch.Tensor, scale: float) -> torch.Tensor:
    """y / s_y under fast math: y times rcp.approx(s_y), the reciprocal computed once."""
    return flush_subnormals(y * fast_reciprocal(_fp32(scale, y.device)))


def _fast_int8_preactivation(X, W, Bq, scales: LayerScales) -> torch.Tensor:
    """v = fma(s_w * s_x, acc, RN(s_b * Bq)): the scale product rounded once (as exact's), the
    bias term rounded, then one rounding for the product with acc and the sum."""
    acc, poisoned = _int8_accumulator(X, W)
    device = X.device
    acc_scale = _fp32(scales.weight, device) * _fp32(scales.input, device)
    bias_term = flush_subnormals(_fp32(scales.bias, device) * Bq)
    v = flush_subnormals(fma_fp32(acc_scale.expand_as(acc), acc, bias_term.expand_as(acc)))
    return _poison(v, poisoned)


def _fp32(value: float, device) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float32, device=device)


def _scalar(value: float, dtype: torch.dtype, device) -> torch.Tensor:
    """A scale as the arithmetic holds it: rounded to fp32, as scales are stored, then to `dtype`."""
    return _fp32(value, device).to(dtype)


@functools.lru_cache(maxsize=None)
def _warn_unfused(asic_dtype: str) -> None:
    logger.warning("asic_dtype=%s: the fused CUDA kernel computes in float32; the PyTorch path runs instead", asic_dtype)
