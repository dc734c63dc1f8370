"""`quant.conv_silu` as one Triton kernel: input quantization, the causal depthwise conv, SiLU,
output quantization and the recorder's statistics in a single pass over the activations.

The arithmetic is quant.py's, operation for operation, so that the int8 codes are the CPU
reference's bit for bit:
- every product and sum that quant.py rounds separately is rounded separately here (libdevice's
  mul_rn / add_rn: the compiler may not contract them into an FMA, which would round once), and
  subnormal numbers are kept as the CPU keeps them (the kernel is compiled without libdevice's
  flush-to-zero, which Triton turns on by default);
- divisions are correctly rounded, as torch's are: by a quantization scale through its correctly
  rounded reciprocal and two FMA corrections (`_divide`: exact, and a few FMAs where div_rn takes a
  dozen instructions and a branch), the SiLU's through an estimated reciprocal and FMA corrections
  where the preactivation lies in the domain that makes them exact (`_silu_quotient`), with div_rn
  in a program that meets one outside it;
- a code needs only the quotient's rounding, not the quotient: where the host has checked
  (`quant.pair_codes_are_exact`) that t * r_hi + t * r_lo, with 1 / scale = r_hi + r_lo to 47 bits,
  rounds to the code of t / scale for every t between the value bounds, the kernel takes the
  codes from those two FMAs (`_code_by_pair`), and from the quotient itself elsewhere; a code
  that is only multiplied by its scale is rounded by adding 2**23, its product taken in one FMA
  (`_dequantized_code`), without the rounding instruction, a quarter-rate conversion like exp's
  and the reciprocal estimate's;
- the int8 kernel's integer accumulation runs in fp32, where it is exact: |acc| <= 4 * 128 * 128
  < 2**24, and a NaN input poisons its windows as quant._int8_kernel_preactivation does;
- rounding gives quant.round_half_away's and quant.round_half_even's results, signed zeros
  included; clamping keeps NaN, as torch.clamp does. Both are written once, below. Codes are
  clamped by clamping the values they come from (`quant.value_bounds`), which is the same and
  spares the division its overflow guard: fp16 and bf16 inputs as loaded, two per instruction,
  to the bounds in their own format (`quant.value_bounds_in`); a SiLU output is not clamped from
  below where its lower bound lies under `quant.SILU_FLOOR`.
Only exp is not the CPU's: libdevice's expf and the CPU's may differ in the last bit, which can move
a code only where y / scale sits within an ulp of a rounding tie.

Scales, code range and rounding come from quant.QuantSpec and quant.LayerScales; scales are
rounded to fp32 on the host exactly as quant._fp32 rounds them.

Layout: x is channels-last (batch, length, channels) with any strides (a view of in_proj's output),
the output a new contiguous tensor of x's dtype. Each program takes BLOCK_D channels of GROUP
chunks of CHUNK positions of one sequence and walks the chunks in step, position by position,
keeping the last K-1 conv inputs in registers: every input is loaded and quantized once (plus
K-1 per chunk), and the GROUP rows of a step are loaded together. The walk goes UNROLL positions
a turn, unrolled, and loads a turn's rows while the turn before computes. The position strides
are compile-time constants (one compilation per model width), so that a step's rows sit at
constant offsets from the turn's.

Most programs are full: every position real and inside the sequence, every channel inside, and,
in a quantized mode, weights that bound every preactivation inside `_silu_quotient`'s domain.
They walk without masks, realness or tracking |v| (`_walk`'s FULL); the others (a sequence's
end, padding, the last channels, large weights) walk with them.

The statistics' exact bookkeeping (a comparison and selects per value) took a quarter of the
kernel's time, so they are kept a cheaper way that is exact only where every value is finite. A
program that meets a value that is not (NaN or infinite input, an overflowing conv), or a
preactivation outside `_silu_quotient`'s domain, walks its chunks a second time, the exact way,
and stores its outputs again (see `_walk`).
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # Triton releases that keep libdevice outside the CUDA backend folder
    from triton.language.extra import libdevice

from .. import modes, quant
from .. import recorder

# Globals a jitted function reads must be tl.constexpr.
TAPS = tl.constexpr(4)  # the kernel's conv width (mamba's d_conv); other widths run the PyTorch path
# Kernel modes: the simulation of `same` and `better` differs only in scale and clamp range;
# MODE_INT8_FAST is the INT8 kernel with the fast-math epilogue (kernel_math=fast).
MODE_FP, MODE_INT8, MODE_SIM, MODE_INT8_FAST = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2), tl.constexpr(3)
MODE_IDS = {modes.FP: MODE_FP.value, modes.INT8_KERNEL: MODE_INT8.value, modes.FLOAT_SIM: MODE_SIM.value}  # by arithmetic
ROUNDING_IDS = {name: index for index, name in enumerate(modes.ROUNDINGS)}
HALF_AWAY = tl.constexpr(ROUNDING_IDS["half_away"])
FLT_MAX = tl.constexpr(3.4028234663852886e38)  # |x| <= FLT_MAX: finite (NaN compares false)
SILU_DOMAIN = tl.constexpr(80.0)  # |v| up to which `_silu_quotient` divides correctly
SIGN_BIT = tl.constexpr(0x80000000)
HALF_BITS = tl.constexpr(0x3F000000)  # 0.5
MAGIC = tl.constexpr(8388608.0)  # 2**23: fp32 values from it to 2**24 are the integers
# Compile options of every launch: libdevice without flush-to-zero (Triton's default flushes
# subnormals in mul_rn, add_rn, fma and div_rn, where the CPU keeps them).
COMPILE_OPTIONS = {"enable_reflect_ftz": False}
# Positions per turn of the kernel's loop (where CHUNK is a multiple of it, else 1): four spread
# the loop's own instructions over more values than two (docs/BENCHMARKS.md). A program with edges (positions past
# the sequence's end or padding, channels past the last) keeps each position's realness beside
# the statistics' accumulators: with four positions it spills, so it takes two there.
UNROLL, EDGE_UNROLL_WITH_STATISTICS = 4, 2
# Registers a thread may use in launches with statistics: ptxas takes up to 110, which fits 18
# warps per SM; 96 fit 20-21, and the walks' loops spill nothing.
STATS_MAX_REGISTERS = 96
# Scales the kernel divides by (see `_divide`); a layer with others runs the PyTorch path.
SCALE_RANGE = (2.0**-100, 2.0**100)
COUNT, SUM_ABS_ERR, SUM_SQ_SIGNAL, SUM_SQ_ERR, CLAMPED, NONFINITE, N_SUMS, SLOTS = (
    tl.constexpr(getattr(recorder, name))
    for name in ("COUNT", "SUM_ABS_ERR", "SUM_SQ_SIGNAL", "SUM_SQ_ERR", "CLAMPED", "NONFINITE", "N_SUMS", "SLOTS")
)


def conv_silu_triton(x, weight, bias, spec, scales, observer=None, left_context=None, mask=None, config=None):
    """`quant.conv_silu` on CUDA, or None where the PyTorch path must run: no CUDA, a conv width
    other than 4, a quantized mode without scales (the PyTorch path raises the error) or with a
    scale outside SCALE_RANGE, an observer that wants the full tensors (the recorder's snapshot
    batch, or a plain callable), or an observer counting other positions than `mask` marks.
    `config` (BLOCK_D, GROUP, CHUNK, num_warps) overrides the launch heuristic (benchmarks).
    """
    if not _can_run(x, weight, spec, scales, observer, left_context, mask):
        return None
    return launch_conv_silu(x, weight, bias, spec, scales, observer, left_context, mask, config)


def launch_conv_silu(x, weight, bias, spec, scales, observer=None, left_context=None, mask=None, config=None):
    """The kernel launch itself, for inputs `conv_silu_triton` accepts (tests run it on the CPU
    under Triton's interpreter). The statistics count the positions the observer's mask marks,
    which is `mask` where that is given."""
    batch, length, channels = x.shape
    out = torch.empty((batch, length, channels), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    stats = observer is not None
    block_d, group, chunk, warps = config or launch_config(batch, length, channels, spec.quantized)
    unroll, edge_unroll = unrolls(chunk, stats)
    params = kernel_parameters(spec, scales, x.device, x.dtype)
    context = left_context if left_context is not None else x  # x: a placeholder never read
    zero_padding = mask is not None
    if mask is None and observer is not None:
        mask = observer.mask
    grid = (triton.cdiv(channels, block_d), triton.cdiv(length, group * chunk), batch)
    _conv_silu_kernel[grid](
        x, *x.stride(),
        context, *context.stride(),
        weight, *weight.stride(),
        bias, bias.stride(0),
        out, *out.stride(),
        mask if mask is not None else x, *(mask.stride() if mask is not None else (0, 0)),
        observer.sums if stats else out, observer.maxes if stats else out,
        length, channels,
        *params["scalars"],
        MODE=params["mode"], ROUNDING=params["rounding"], OPERAND_ROUNDING=params["operand_rounding"], CLAMP=params["clamp"],
        INPUT_BY_PAIR=params["input_by_pair"], OUTPUT_BY_PAIR=params["output_by_pair"],
        OUTPUT_FLOOR=params["output_floor"],
        HAS_CONTEXT=left_context is not None, HAS_MASK=mask is not None, ZERO_PADDING=zero_padding, STATS=stats,
        BLOCK_D=block_d, GROUP=group, CHUNK=chunk, UNROLL=unroll, EDGE_UNROLL=edge_unroll,
        num_warps=warps, **COMPILE_OPTIONS, **({"maxnreg": STATS_MAX_REGISTERS} if stats else {}),
    )  # fmt: skip
    return out


def _can_run(x, weight, spec, scales, observer, left_context, mask) -> bool:
    if not x.is_cuda or x.dim() != 3 or weight.shape[-1] != TAPS.value:
        return False
    observed = getattr(observer, "mask", None)
    if mask is not None and observed is not None and observed is not mask:
        return False
    if spec.quantized and (scales is None or not kernel_parameters(spec, scales, x.device, x.dtype)["scales_in_range"]):
        return False
    if left_context is not None and tuple(left_context.shape) != (x.shape[0], TAPS.value - 1, x.shape[2]):
        return False
    return observer is None or not getattr(observer, "wants_values", True)


def launch_config(batch: int, length: int, channels: int, quantized: bool) -> tuple[int, int, int, int]:
    """(BLOCK_D, GROUP, CHUNK, num_warps): chunks long enough that the K-1 re-read inputs per chunk
    cost little, and enough programs to fill the GPU. Few distinct values, to bound compilations.
    The quantized modes are bound by their arithmetic and run one warp per program, 32 channels:
    6-11% faster than four warps and 128 channels at lengths up to 128, 0-4% on long sequences
    (with statistics too); the memory-bound fp mode keeps four warps (8-14% faster there). The
    same with and without statistics, so that recording changes nothing but the statistics' own
    work. The configurations measured are in docs/BENCHMARKS.md.
    """
    chunk = 1 if length <= 2 else 8 if length <= 64 else 16 if length <= 512 else 32
    group = min(4, triton.next_power_of_2(triton.cdiv(length, chunk)))
    return (32, group, chunk, 1) if quantized else (128, group, chunk, 4)


def unrolls(chunk: int, stats: bool) -> tuple[int, int]:
    """Positions per turn of the loop in full programs and in programs with edges."""
    edge = EDGE_UNROLL_WITH_STATISTICS if stats else UNROLL
    return tuple(unroll if chunk % unroll == 0 else 1 for unroll in (UNROLL, edge))


@functools.lru_cache(maxsize=4096)
def kernel_parameters(
    spec: quant.QuantSpec, scales: Optional[quant.LayerScales], device: torch.device, dtype: torch.dtype
) -> dict:
    """The kernel's mode ids and fp32 scalars, all taken from quant.py's definitions:
    (in_scale, weight_scale, bias_scale, acc_scale, out_scale), the correctly rounded reciprocals
    of the four quantization scales (in, weight, bias, out), the value bounds (`quant.value_bounds`)
    of the input's codes, those of the input's codes for inputs of `dtype` (`quant.value_bounds_in`)
    and the value bounds of the output's code range, and the reciprocal pairs of the input and
    output scales (`quant.reciprocal_pair`); whether every scale is in SCALE_RANGE (and the bounds
    were found); whether the input's and the output's codes may come from their pair
    (`quant.pair_codes_are_exact`, checked on `device`); whether the output's lower value bound can
    clamp a SiLU output (above `quant.SILU_FLOOR`: almost never, as it lies near -max |y|)."""
    if not spec.quantized:
        scalars = (1.0,) * 9 + (0.0,) * 10
        return {"mode": MODE_FP.value, "rounding": HALF_AWAY.value, "operand_rounding": HALF_AWAY.value, "clamp": False,
                "scales_in_range": True, "input_by_pair": False, "output_by_pair": False, "output_floor": False,
                "scalars": scalars}
    s_x, s_w, s_b = (_fp32(value) for value in (scales.input, scales.weight, scales.bias))
    acc_scale = _fp32(np.float32(s_w) * np.float32(s_x))  # quant: fp32(s_w) * fp32(s_x), in fp32
    s_y = _fp32(spec.effective_scale(scales.output))
    code_range = spec.code_range()
    divisors = (s_x, s_w, s_b, s_y)
    in_range = all(SCALE_RANGE[0] <= scale <= SCALE_RANGE[1] for scale in divisors)
    input_bounds = quant.value_bounds(s_x, quant.INT8_RANGE, quant.KERNEL_ROUNDING) if in_range else None
    fast = spec.epilogue_math == "fast"
    output_bounds = (0.0, 0.0)
    if code_range is not None and fast:  # its quotient is not torch's: the codes are clamped
        output_bounds = tuple(_fp32(bound) for bound in code_range)
    elif code_range is not None and in_range:
        output_bounds = quant.value_bounds(s_y, code_range, spec.output_rounding)
    input_bounds_x = input_bounds and quant.value_bounds_in(input_bounds, dtype, s_x, quant.INT8_RANGE, quant.KERNEL_ROUNDING)
    scales_in_range = in_range and input_bounds_x is not None and output_bounds is not None
    output_by_pair = scales_in_range and code_range is not None and not fast
    return {
        "mode": MODE_INT8_FAST.value if fast else MODE_IDS[spec.kind.arithmetic],
        "rounding": ROUNDING_IDS[spec.output_rounding],
        "operand_rounding": ROUNDING_IDS[spec.operand_rounding],
        "clamp": code_range is not None,
        "scales_in_range": scales_in_range,
        "input_by_pair": scales_in_range
        and quant.pair_codes_are_exact(s_x, quant.INT8_RANGE, quant.KERNEL_ROUNDING, device),
        "output_by_pair": output_by_pair and quant.pair_codes_are_exact(s_y, code_range, spec.output_rounding, device),
        "output_floor": output_bounds is not None and output_bounds[0] > quant.SILU_FLOOR,
        "scalars": (s_x, s_w, s_b, acc_scale, s_y) + tuple(_reciprocal(scale) for scale in divisors)
        + (input_bounds or (0.0, 0.0)) + (input_bounds_x or (0.0, 0.0)) + (output_bounds or (0.0, 0.0))
        + quant.reciprocal_pair(s_x) + quant.reciprocal_pair(s_y),
    }


def _fp32(value) -> float:
    """The fp32 value quant._fp32 makes of `value` (round to nearest even), as an exact Python float."""
    return float(np.float32(value))


def _reciprocal(scale: float) -> float:
    """RN(1 / scale) in fp32: numpy divides fp32 by fp32 with one IEEE rounding (a float64 quotient
    rounded again to fp32 could be off by one ulp)."""
    with np.errstate(divide="ignore", over="ignore"):
        return float(np.float32(1.0) / np.float32(scale))


# ------------------------------------------------------------------ the arithmetic, written once


@triton.jit
def _code(t, scale, reciprocal, ROUNDING: tl.constexpr, BOUNDED: tl.constexpr = False):
    """quant.round_codes(t / scale) bit for bit, signed zeros included: the quotient torch
    computes (`_divide`; BOUNDED: t was clamped to a code range's `quant.value_bounds`), rounded.

    Half away from zero is floor(|q| + 1/2) with q's sign, as trunc(q + copysign(1/2, q)) with the
    sum rounded toward zero: it reaches the next integer only where the exact sum does (rounded to
    nearest, 0.5 - 2**-25 + 0.5 would give 1), and |q| >= 2**23 and inf come out as they are. The
    CPU's trunc formula gives -0.0 for q in (-1/2, 0) and +0.0 for q = -0.0, which a quotient
    plus +0.0 gives here too. Half to even is rint, which keeps the quotient's zero.
    """
    return _rounded(_divide(t, scale, reciprocal, ROUNDING == HALF_AWAY, BOUNDED), ROUNDING)


@triton.jit
def _pair_quotient(t, pair_hi, pair_lo, ROUNDING: tl.constexpr):
    """quant.pair_quotient: t * r_hi + t * r_lo in two FMAs (where `_divide` takes five), for a t
    clamped to `quant.value_bounds` of a scale whose reciprocal pair (`quant.reciprocal_pair`)
    passed `quant.pair_codes_are_exact`: its code is `_code`'s. Half away from zero takes
    RN(t / s) + 0.0, as `_divide` does: never -0.0."""
    if ROUNDING == HALF_AWAY:
        low = libdevice.fma(t, pair_lo, 0.0)  # -0.0 * r_lo + 0.0 is +0.0: t = -0.0 gives +0.0
    else:
        low = libdevice.mul_rn(t, pair_lo)
    return libdevice.fma(t, pair_hi, low)


@triton.jit
def _code_by_pair(t, pair_hi, pair_lo, ROUNDING: tl.constexpr):
    """`_code` of a t clamped to `quant.value_bounds`, from its `_pair_quotient`."""
    return _rounded(_pair_quotient(t, pair_hi, pair_lo, ROUNDING), ROUNDING)


@triton.jit
def _dequantized_code(q, scale, ROUNDING: tl.constexpr):
    """RN(round(q) * scale), signed zeros included, for a quotient |q| < 2**22 that is not -0.0
    where rounding half away (`_pair_quotient`'s), with no rounding instruction: those (FRND) are
    conversions, issued at a quarter of the FMA rate like exp's and the reciprocal's MUFU, and
    without them the kernel ran 3-5% faster (docs/BENCHMARKS.md).
    Adding 2**23 to a |q| + 1/2 that was rounded toward zero (as `_round_half_away` does), toward
    zero again, gives 2**23 + floor(|q| + 1/2); to |q| rounded to nearest, 2**23 + rint(|q|): the
    sums lie in [2**23, 2**24), where fp32 values are the integers. One FMA takes 2**23 * scale
    (exact) off their product with the scale, rounding (|code|) * scale once, and q's sign bit
    goes on after: round(q) is |round(q)| with q's sign, -0.0 for q in (-1/2, 0) included."""
    sign = q.to(tl.uint32, bitcast=True) & SIGN_BIT
    if ROUNDING == HALF_AWAY:
        shifted = libdevice.add_rz(libdevice.add_rz(tl.abs(q), 0.5), MAGIC)
    else:
        shifted = libdevice.add_rn(tl.abs(q), MAGIC)
    magnitude = libdevice.fma(shifted, scale, scale * -MAGIC)
    return (magnitude.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def _rounded(q, ROUNDING: tl.constexpr):
    if ROUNDING == HALF_AWAY:
        return _round_half_away(q)
    else:
        return libdevice.rint(q)


@triton.jit
def _round_half_away(q):
    half = ((q.to(tl.uint32, bitcast=True) & SIGN_BIT) | HALF_BITS).to(tl.float32, bitcast=True)
    return libdevice.trunc(libdevice.add_rz(q, half))


@triton.jit
def _clamp(t, lo, hi):
    # torch.clamp keeps NaN; plain min/max instructions would drop it.
    return tl.minimum(tl.maximum(t, lo, propagate_nan=tl.PropagateNan.ALL), hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _divide(t, scale, reciprocal, POSITIVE_ZERO: tl.constexpr, BOUNDED: tl.constexpr = False):
    """RN(t / scale), the quotient torch computes, for a scale in SCALE_RANGE and its reciprocal
    y = RN(1 / scale); with POSITIVE_ZERO, RN(t / scale) + 0.0 (a -0.0 quotient is +0.0), at no
    cost: +0.0 is the first product's addend.

    q0 = RN(t * y) is within 2 ulps of t / scale (y's relative error is below 2**-24). One
    correction q1 = RN(q0 - RN(scale * q0 - t) * y) leaves an error below ulp/2 + 2**-22 ulp, so
    q1 is one of the two fp32 values around t / scale. For such a q the remainder scale * q - t
    is exact in an FMA, and RN(q - (scale * q - t) * y) is RN(t / scale) (Markstein's theorem;
    Muller et al., Handbook of Floating-Point Arithmetic, section on division with an FMA). The
    remainders are taken as scale * q - t rather than t - scale * q so that a zero quotient keeps
    q0's sign (-0.0 - (+0.0) * y is -0.0, where t - scale * q would give +0.0 - 0.0 = +0.0).
    The theorem assumes no underflow: with the scale in range, the remainder is a multiple of
    2**-149 wherever |t / scale| >= 1/2, hence exact; a smaller quotient may be off in its last
    subnormal bits, but its code is a zero of the same sign either way (unless t / scale is within
    an ulp of 2**-150, which no fp16 input and no SiLU output reaches). NaN and infinite t give
    q0, where the corrections would make NaN of inf. Where t * y overflows, t / scale lies within
    2**-24 of FLT_MAX, whose codes clamp alike (only `better` with clamp=none could see inf where
    torch has FLT_MAX). A BOUNDED t (clamped to `quant.value_bounds`: finite or NaN, its quotient a
    few hundred thousand at most) needs no such guard.
    """
    minus_reciprocal = -reciprocal  # a scalar: negating a tensor costs an instruction per value
    minus_t = t * -1.0  # folded into the FMAs (0.0 - t, Triton's -t, is an instruction, and +0.0 at t = +0.0)
    if POSITIVE_ZERO:
        q0 = libdevice.fma(t, reciprocal, 0.0)
    else:
        q0 = libdevice.mul_rn(t, reciprocal)
    q1 = libdevice.fma(libdevice.fma(q0, scale, minus_t), minus_reciprocal, q0)
    q2 = libdevice.fma(libdevice.fma(q1, scale, minus_t), minus_reciprocal, q1)
    if BOUNDED:
        return q2
    else:
        return tl.where(tl.abs(q0) <= FLT_MAX, q2, q0)


@triton.jit
def _operand_codes(t, scale, reciprocal, ROUNDING: tl.constexpr):
    """quant.quantize_operands: clamp(rnd(t / scale), -128, 127)."""
    return _clamp(_code(t, scale, reciprocal, ROUNDING), -128.0, 127.0)


@triton.jit
def _silu(v, MODE: tl.constexpr, EXACT: tl.constexpr):
    """quant.silu: v / (1 + exp(-v)), or quant.fast_silu for the fast-math INT8 kernel. (v * -1.0
    is -v, which the compiler folds into exp's first instruction; Triton's -v is 0.0 - v, one more
    instruction per value.) The division is correctly rounded both ways: div_rn (EXACT), or
    `_silu_quotient`, which is so only where |v| <= SILU_DOMAIN (the caller checks)."""
    if MODE == MODE_INT8_FAST:
        return _fast_silu(v)
    else:
        denominator = libdevice.add_rn(1.0, libdevice.exp(v * -1.0))
        if EXACT:
            return libdevice.div_rn(v, denominator)
        else:
            return _silu_quotient(v, denominator)


@triton.jit
def _silu_quotient(v, d):
    """RN(v / d) for d = 1 + exp(-v) and |v| <= SILU_DOMAIN: the instructions ptxas emits for
    div_rn's fast path (read off its SASS), without the range check (FCHK) that sends operands
    whose quotient or remainder could over- or underflow to the slow path, and without the branch
    around it: 4 of div_rn's 10 instructions.

    y0 = rcp.approx(d); y1 = y0 + y0 * (1 - d * y0), 1 / d to about 2**-46; q0 = RN(v * y1) is
    within an ulp of v / d; the remainder d * q0 - v is then exact in an FMA, and the correction
    RN(q0 - (d * q0 - v) * y1) gives RN(v / d) (Markstein), provided nothing over- or underflows.
    Where |v| <= 80: 1 <= d <= 1 + e**80 < 2**116, so 1 / d is normal, and v / d is 0 or at least
    2**-109 in magnitude, unless |v| < 2**-25, where exp(-v) is 1, d is 2 and y1 is 1/2 exactly, and
    every step is exact to the last subnormal bit. (The remainders are taken as d * q - v, as in
    `_divide`, so that a zero quotient keeps v's sign.) tests/test_kernels.py checks the steps
    against IEEE division from any estimate within an ulp (CPU) and the compiled function against
    div_rn (GPU).
    """
    minus_d = d * -1.0
    y0 = _reciprocal_estimate(d)
    y1 = libdevice.fma(libdevice.fma(minus_d, y0, 1.0), y0, y0)
    q0 = libdevice.mul_rn(v, y1)
    return libdevice.fma(libdevice.fma(q0, d, v * -1.0), y1 * -1.0, q0)


@triton.jit
def _reciprocal_estimate(d):
    """rcp.approx.ftz.f32 (MUFU.RCP): 1 / d within an ulp, for the normal d `_silu_quotient` sees."""
    return tl.inline_asm_elementwise(
        "rcp.approx.ftz.f32 $0, $1;", "=f,f", [d], dtype=tl.float32, is_pure=True, pack=1
    )


# The fast-math epilogue (quant.py, kernel_math=fast) as the PTX nvcc -O3 --use_fast_math emits for
# it (read off benchmarks/int8_fastmath_reference.cu's build on the H200: fma.rn.ftz, mul.ftz by
# -log2(e), ex2.approx.ftz, add.ftz, div.approx.ftz twice, which ptxas turns into MUFU.RCP and FMUL),
# written out so that the compiler can neither contract nor reorder them.
@triton.jit
def _fast_silu(v):
    return tl.inline_asm_elementwise(
        """{ .reg .f32 t, e, d;
        mul.ftz.f32 t, $1, 0fBFB8AA3B;
        ex2.approx.ftz.f32 e, t;
        add.ftz.f32 d, e, 0f3F800000;
        div.approx.ftz.f32 $0, $1, d; }""",
        "=f,f", [v], dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _fast_quotient(y, scale):
    """quant.fast_quotient: y * rcp.approx(s_y), as div.approx.ftz (ptxas hoists the reciprocal)."""
    return tl.inline_asm_elementwise(
        "div.approx.ftz.f32 $0, $1, $2;",
        "=f,f,f", [y, scale + tl.zeros_like(y)], dtype=tl.float32, is_pure=True, pack=1,
    )


@triton.jit
def _fast_preactivation(acc, acc_scale, bias_term):
    """quant._fast_int8_preactivation: fma(s_w * s_x, acc, s_b * Bq), flushed."""
    return tl.inline_asm_elementwise(
        "fma.rn.ftz.f32 $0, $1, $2, $3;",
        "=f,f,f,f", [acc_scale + tl.zeros_like(acc), acc, bias_term + tl.zeros_like(acc)], dtype=tl.float32,
        is_pure=True, pack=1,
    )


@triton.jit
def _conv_operand(raw, scale, reciprocal, MODE: tl.constexpr, ROUNDING: tl.constexpr):
    """A conv weight as the mode sees it: the value (fp), its int8 code (int8), or the code
    dequantized (same/better)."""
    value = raw.to(tl.float32)
    if MODE == MODE_FP:
        return value
    else:
        return _dequantized(_operand_codes(value, scale, reciprocal, ROUNDING), scale, MODE)


@triton.jit
def _input_operand(raw, input_scales, MODE: tl.constexpr, BY_PAIR: tl.constexpr):
    """A conv input as the mode sees it, `_conv_operand`'s, with its code range's clamp taken
    on the value (`quant.value_bounds`), where it spares the division's overflow guard: on the
    input as loaded where it is fp16 or bf16 (`quant.value_bounds_in`; two values per instruction),
    on its fp32 value otherwise."""
    in_scale, in_reciprocal, in_lo, in_hi, in_lo_x, in_hi_x, in_pair_hi, in_pair_lo = input_scales
    if MODE == MODE_FP:
        return raw.to(tl.float32)
    else:
        if raw.dtype == tl.float32:
            value = _clamp(raw, in_lo, in_hi)
        else:
            value = _clamp(raw, tl.cast(in_lo_x, raw.dtype), tl.cast(in_hi_x, raw.dtype)).to(tl.float32)
        if BY_PAIR and MODE == MODE_SIM:
            return _dequantized_code(_pair_quotient(value, in_pair_hi, in_pair_lo, HALF_AWAY), in_scale, HALF_AWAY)
        elif BY_PAIR:
            return _code_by_pair(value, in_pair_hi, in_pair_lo, HALF_AWAY)
        else:
            return _dequantized(_code(value, in_scale, in_reciprocal, HALF_AWAY, True), in_scale, MODE)


@triton.jit
def _dequantized(codes, scale, MODE: tl.constexpr):
    """int8: the codes; same/better: the codes times their scale."""
    if MODE == MODE_INT8 or MODE == MODE_INT8_FAST:
        return codes
    else:
        return libdevice.mul_rn(codes, scale)


@triton.jit
def _tap(sum_so_far, weight, value, MODE: tl.constexpr):
    # int8: products of codes and their sums are exact integers in fp32 (FMA or not);
    # otherwise quant.causal_conv's `out + w[k] * window[k]`, rounded twice.
    if MODE == MODE_INT8 or MODE == MODE_INT8_FAST:
        return sum_so_far + weight * value
    else:
        return libdevice.add_rn(sum_so_far, libdevice.mul_rn(weight, value))


@triton.jit
def _preactivation(x0, x1, x2, x3, w0, w1, w2, w3, bias_term, acc_scale, MODE: tl.constexpr):
    """The conv over the window x0..x3 (oldest first), taps in order, plus the bias term.
    int8: v = acc_scale * acc + s_b * Bq (quant._int8_kernel_preactivation, or with one rounding,
    quant._fast_int8_preactivation)."""
    if MODE == MODE_INT8 or MODE == MODE_INT8_FAST:
        acc = _tap(_tap(_tap(_tap(0.0, w0, x0, MODE), w1, x1, MODE), w2, x2, MODE), w3, x3, MODE)
        if MODE == MODE_INT8_FAST:
            return _fast_preactivation(acc, acc_scale, bias_term)
        else:
            return libdevice.add_rn(libdevice.mul_rn(acc, acc_scale), bias_term)
    else:
        return _tap(_tap(_tap(_tap(bias_term, w0, x0, MODE), w1, x1, MODE), w2, x2, MODE), w3, x3, MODE)


@triton.jit
def _weight_operand(
    w_ptr, sw_d, sw_k, d, d_ok, k: tl.constexpr, weight_scale, weight_reciprocal, MODE: tl.constexpr,
    OPERAND_ROUNDING: tl.constexpr,
):  # fmt: skip
    w = tl.load(w_ptr + d * sw_d + k * sw_k, mask=d_ok, other=0.0)
    return _conv_operand(w, weight_scale, weight_reciprocal, MODE, OPERAND_ROUNDING)


@triton.jit
def _bias_term(b_ptr, sb_d, d, d_ok, bias_scale, bias_reciprocal, MODE: tl.constexpr, OPERAND_ROUNDING: tl.constexpr):
    """s_b * Bq (mul.ftz in the fast-math INT8 kernel: the same value, bar subnormals)."""
    b = tl.load(b_ptr + d * sb_d, mask=d_ok, other=0.0).to(tl.float32)
    if MODE == MODE_FP:
        return b
    elif MODE == MODE_INT8_FAST:
        return _flush(libdevice.mul_rn(_operand_codes(b, bias_scale, bias_reciprocal, OPERAND_ROUNDING), bias_scale))
    else:
        return libdevice.mul_rn(_operand_codes(b, bias_scale, bias_reciprocal, OPERAND_ROUNDING), bias_scale)


@triton.jit
def _flush(t):
    """quant.flush_subnormals."""
    return tl.where(tl.abs(t) < 1.1754943508222875e-38, t * 0.0, t)


# ------------------------------------------------------------------ the kernel


@triton.jit
def _load_inputs(x_ptr, sx_b, sx_l, sx_d, batch, t, d, d_ok, length):
    """x[batch, t, d] for a (GROUP,) vector of positions t >= 0; zeros past the end."""
    offsets = batch * sx_b + t[:, None].to(tl.int64) * sx_l + d[None, :] * sx_d
    return tl.load(x_ptr + offsets, mask=(t < length)[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _load_turn(x_rows, x_at, sx_l, first: tl.constexpr, ahead, d_ok, UNROLL: tl.constexpr, FULL: tl.constexpr):
    """The UNROLL rows at steps first + step from `x_rows`, as a tuple; zeros from `ahead` steps on
    (the chunk's or the sequence's end) unless the program is FULL."""
    rows = ()
    for step in tl.static_range(UNROLL):
        if FULL:
            rows = rows + (tl.load(x_rows + (x_at + (first + step) * sx_l)),)
        else:
            inside = (first + step < ahead)[:, None] & d_ok[None, :]
            rows = rows + (tl.load(x_rows + (x_at + (first + step) * sx_l), mask=inside, other=0.0),)
    return rows


@triton.jit
def _load_window_start(
    x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, mask_ptr, sm_b, sm_l, batch, t, d, d_ok, length,
    HAS_CONTEXT: tl.constexpr, ZERO_PADDING: tl.constexpr,
):
    """Inputs at positions t < chunk start, which may precede the sequence: left context there
    (the inputs before x), zeros without one; zeros at padding."""
    inside = _load_inputs(x_ptr, sx_b, sx_l, sx_d, batch, tl.maximum(t, 0), d, d_ok, length)
    keep = t >= 0
    if ZERO_PADDING:
        keep = keep & _load_real(mask_ptr, sm_b, sm_l, batch, tl.maximum(t, 0), length, True)
    inside = tl.where(keep[:, None], inside, 0.0)
    if HAS_CONTEXT:
        offsets = batch * sc_b + (t + TAPS - 1)[:, None].to(tl.int64) * sc_l + d[None, :] * sc_d
        before = tl.load(ctx_ptr + offsets, mask=(t < 0)[:, None] & d_ok[None, :], other=0.0)
        inside = tl.where((t < 0)[:, None], before, inside)
    return inside


@triton.jit
def _load_real(mask_ptr, sm_b, sm_l, batch, t, length, HAS_MASK: tl.constexpr):
    """Whether position t (a tensor of positions) is a real token (mask != 0) inside the sequence."""
    inside = t < length
    if HAS_MASK:
        flags = tl.load(mask_ptr + batch * sm_b + t.to(tl.int64) * sm_l, mask=inside, other=0)
        return inside & (flags != 0)
    else:
        return inside


@triton.jit
def _real_bits(mask_ptr, sm_b, sm_l, batch, starts, length, HAS_MASK: tl.constexpr, CHUNK: tl.constexpr):
    """(GROUP,) int32: bit s says whether position starts + s of the row is real. Read once, as
    one (GROUP, CHUNK) tile, so that the loop loads no mask. (A load per position kept CHUNK
    loads in flight at the kernel's start: about 190 registers where 120 do, half the occupancy. The
    tile's reduction leaves the bits in another register layout than the loop's, which costs a
    (GROUP, 1) conversion through shared memory at some steps: far less, measured.)"""
    steps = tl.arange(0, CHUNK)
    real = _load_real(mask_ptr, sm_b, sm_l, batch, starts[:, None] + steps[None, :], length, HAS_MASK)
    return tl.sum(real.to(tl.int32) << steps[None, :], axis=1)  # disjoint bits: the sum is their OR


@triton.jit
def _walk(
    program, MODE: tl.constexpr, ROUNDING: tl.constexpr, CLAMP: tl.constexpr, INPUT_BY_PAIR: tl.constexpr,
    OUTPUT_BY_PAIR: tl.constexpr, OUTPUT_FLOOR: tl.constexpr, HAS_CONTEXT: tl.constexpr, ZERO_PADDING: tl.constexpr,
    STATS: tl.constexpr, EXACT: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr,
    UNROLL: tl.constexpr, FULL: tl.constexpr,
):  # fmt: skip
    """The conv over a program's GROUP chunks (`program`: its memory, positions, channels,
    weights and scales), step by step: stores the output and returns
    the statistics' five per-lane accumulators (sum |error|, sum before**2, sum error**2,
    max |error|, tallies) over real positions, and the largest |preactivation| per lane (where not
    EXACT, and not FULL in a quantized mode: `_program` has bounded it). EXACT divides for SiLU
    with div_rn. A FULL program (`_program`) loads and stores without masks and counts every value.
    The statistics are kept one of two ways (STATS):
    - the fast way multiplies each value by its position's realness (1.0 or 0.0; FULL: every
      value is real) and tallies the clamped values: no comparison and no select per value but
      the clamp's. Where every value is finite, its sums are the exact way's; where one is not,
      the sum of |error| or of before**2 is not finite either (NaN * 0.0 is NaN), and the kernel
      takes the exact way;
    - EXACT leaves out each value that is not real or whose error is not finite, and tallies
      counted + (CHUNK + 1) * clamped: two counts of at most CHUNK each, so that
      trunc(tallies / (CHUNK + 1)) is the clamped count, exactly.
    """
    source, context, padding, target, batch, starts, d, d_ok, length, real_bits, weights, input_scales, output_scales = program  # fmt: skip
    x_ptr, sx_b, sx_l, sx_d = source
    ctx_ptr, sc_b, sc_l, sc_d = context
    mask_ptr, sm_b, sm_l = padding
    out_ptr, so_b, so_l, so_d = target
    w0, w1, w2, w3, bias_term = weights
    acc_scale, out_scale, out_reciprocal, out_lo, out_hi, out_pair_hi, out_pair_lo = output_scales

    x0 = _input_operand(
        _load_window_start(x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, mask_ptr, sm_b, sm_l, batch, starts - 3, d, d_ok, length, HAS_CONTEXT, ZERO_PADDING),
        input_scales, MODE, INPUT_BY_PAIR,
    )  # fmt: skip
    x1 = _input_operand(
        _load_window_start(x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, mask_ptr, sm_b, sm_l, batch, starts - 2, d, d_ok, length, HAS_CONTEXT, ZERO_PADDING),
        input_scales, MODE, INPUT_BY_PAIR,
    )  # fmt: skip
    x2 = _input_operand(
        _load_window_start(x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, mask_ptr, sm_b, sm_l, batch, starts - 1, d, d_ok, length, HAS_CONTEXT, ZERO_PADDING),
        input_scales, MODE, INPUT_BY_PAIR,
    )  # fmt: skip

    zeros = tl.zeros((GROUP, BLOCK_D), dtype=tl.float32)
    sum_abs, sum_signal, sum_sq, max_err, tallies, largest_v = zeros, zeros, zeros, zeros, zeros, zeros
    pending_bits = real_bits  # shifted by a turn at each turn: bit `step` is this turn's step
    # Each turn moves the rows' pointers on and counts down the steps left in each chunk (to its
    # end or the sequence's): a step's address is a pointer plus a constant multiple of the
    # stride, its mask one comparison with a constant. (Positions counted from the loop's index
    # made the compiler widen it to 64 bits, with two instructions per comparison.)
    x_rows = x_ptr + batch * sx_b + starts[:, None].to(tl.int64) * sx_l + d[None, :] * sx_d
    out_rows = out_ptr + batch * so_b + starts[:, None].to(tl.int64) * so_l + d[None, :] * so_d
    ahead = tl.minimum(length - starts, CHUNK)
    x_at, out_at = 0, 0
    rows = _load_turn(x_rows, x_at, sx_l, 0, ahead, d_ok, UNROLL, FULL)
    for _ in range(0, CHUNK, UNROLL):
        # The next turn's rows are loaded before this turn's are computed: their latency overlaps.
        # Past the chunk's last turn, masks keep an edge program's loads inside; a full program,
        # unmasked, loads its last turn's rows again (the chunk may end the tensor).
        if FULL:
            next_rows = _load_turn(x_rows, tl.minimum(x_at + UNROLL * sx_l, (CHUNK - UNROLL) * sx_l), sx_l, 0, ahead, d_ok, UNROLL, FULL)  # fmt: skip
        else:
            next_rows = _load_turn(x_rows, x_at, sx_l, UNROLL, ahead, d_ok, UNROLL, FULL)
        for step in tl.static_range(UNROLL):
            raw = rows[step]
            if not FULL:
                bit = (pending_bits[:, None] >> step) & 1
                real = bit != 0
            if ZERO_PADDING and not FULL:
                x3 = _input_operand(tl.where(real, raw, 0.0), input_scales, MODE, INPUT_BY_PAIR)
            else:
                x3 = _input_operand(raw, input_scales, MODE, INPUT_BY_PAIR)
            v = _preactivation(x0, x1, x2, x3, w0, w1, w2, w3, bias_term, acc_scale, MODE)
            before = _silu(v, MODE, EXACT)
            if not EXACT and MODE != MODE_INT8_FAST and not (FULL and MODE != MODE_FP):
                largest_v = tl.maximum(largest_v, tl.abs(v))  # NaN passes: its quotient is NaN either way
            if MODE == MODE_FP:
                after = before
            else:
                if MODE == MODE_INT8_FAST:  # out_lo, out_hi: the code range itself
                    rounded = _round_half_away(_fast_quotient(before, out_scale))
                    codes = _clamp(rounded, out_lo, out_hi)
                    clamped = codes != rounded
                    after = libdevice.mul_rn(codes, out_scale)
                elif CLAMP:  # clamped on the value (`quant.value_bounds`)
                    if OUTPUT_FLOOR:
                        kept = _clamp(before, out_lo, out_hi)
                    else:
                        kept = tl.minimum(before, out_hi, propagate_nan=tl.PropagateNan.ALL)
                    if OUTPUT_BY_PAIR:
                        after = _dequantized_code(_pair_quotient(kept, out_pair_hi, out_pair_lo, ROUNDING), out_scale, ROUNDING)  # fmt: skip
                    else:
                        after = libdevice.mul_rn(_code(kept, out_scale, out_reciprocal, ROUNDING, True), out_scale)
                    clamped = kept != before
                else:
                    after = libdevice.mul_rn(_code(before, out_scale, out_reciprocal, ROUNDING), out_scale)
            targets = out_rows + (out_at + step * so_l)
            if FULL:
                tl.store(targets, after.to(out_ptr.dtype.element_ty))
            else:
                in_sequence = (step < ahead)[:, None] & d_ok[None, :]
                stored = tl.where(real, after, 0.0) if ZERO_PADDING else after
                tl.store(targets, stored.to(out_ptr.dtype.element_ty), mask=in_sequence)

            if STATS:
                if EXACT:
                    error = after - before
                    counted = (real & d_ok[None, :]) & (tl.abs(error) <= FLT_MAX)
                    error = tl.where(counted, error, 0.0)
                    signal = tl.where(counted, before, 0.0)
                    if CLAMP:
                        tallies += tl.where(counted, tl.where(clamped, CHUNK + 2.0, 1.0), 0.0)
                    else:
                        tallies += counted.to(tl.float32)
                elif FULL:
                    signal = before
                    error = after - before
                    if CLAMP:
                        tallies += clamped.to(tl.float32)
                else:
                    # after - before where real in one FMA (before * -1.0 is exact), +-0.0 elsewhere.
                    realness = bit.to(tl.float32)
                    signal = before * (0.0 - realness)
                    error = libdevice.fma(after, realness, signal)
                    if CLAMP:
                        tallies = libdevice.fma(clamped.to(tl.float32), realness, tallies)
                sum_signal += signal * signal
                if MODE != MODE_FP:  # fp: after is before, and every counted error 0
                    sum_abs += tl.abs(error)
                    sum_sq += error * error
                    max_err = tl.maximum(max_err, tl.abs(error))

            x0, x1, x2 = x1, x2, x3
        rows = next_rows
        pending_bits >>= UNROLL
        x_at += UNROLL * sx_l
        out_at += UNROLL * so_l
        ahead -= UNROLL
    return (sum_abs, sum_signal, sum_sq, max_err, tallies), largest_v


@triton.jit(do_not_specialize=["length"])
def _conv_silu_kernel(
    x_ptr, sx_b, sx_l: tl.constexpr, sx_d,
    ctx_ptr, sc_b, sc_l, sc_d,
    w_ptr, sw_d, sw_k,
    b_ptr, sb_d,
    out_ptr, so_b, so_l: tl.constexpr, so_d,
    mask_ptr, sm_b, sm_l,
    sums_ptr, maxes_ptr,
    length, channels,
    in_scale, weight_scale, bias_scale, acc_scale, out_scale,
    in_reciprocal, weight_reciprocal, bias_reciprocal, out_reciprocal,
    in_lo, in_hi, in_lo_x, in_hi_x, out_lo, out_hi, in_pair_hi, in_pair_lo, out_pair_hi, out_pair_lo,
    MODE: tl.constexpr, ROUNDING: tl.constexpr, OPERAND_ROUNDING: tl.constexpr, CLAMP: tl.constexpr,
    INPUT_BY_PAIR: tl.constexpr, OUTPUT_BY_PAIR: tl.constexpr, OUTPUT_FLOOR: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PADDING: tl.constexpr, STATS: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr, EDGE_UNROLL: tl.constexpr,
):  # fmt: skip
    memory = (
        x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, w_ptr, sw_d, sw_k, b_ptr, sb_d,
        out_ptr, so_b, so_l, so_d, mask_ptr, sm_b, sm_l, length, channels,
    )  # fmt: skip
    quantization = (
        in_scale, weight_scale, bias_scale, acc_scale, out_scale,
        in_reciprocal, weight_reciprocal, bias_reciprocal, out_reciprocal,
        in_lo, in_hi, in_lo_x, in_hi_x, out_lo, out_hi, in_pair_hi, in_pair_lo, out_pair_hi, out_pair_lo,
    )  # fmt: skip
    totals, largest_v = _program(
        memory, quantization, MODE, ROUNDING, OPERAND_ROUNDING, CLAMP, INPUT_BY_PAIR, OUTPUT_BY_PAIR, OUTPUT_FLOOR,
        HAS_CONTEXT, HAS_MASK, ZERO_PADDING, BLOCK_D, GROUP, CHUNK, UNROLL, EDGE_UNROLL, STATS=STATS, EXACT=False,
    )  # fmt: skip
    again = largest_v > SILU_DOMAIN  # see _silu_quotient
    if STATS:
        again = again | ~((totals[SUM_ABS_ERR] <= FLT_MAX) & (totals[SUM_SQ_SIGNAL] <= FLT_MAX))  # see _walk
    if again:
        totals = _program_exactly(
            memory, quantization, MODE, ROUNDING, OPERAND_ROUNDING, CLAMP, INPUT_BY_PAIR, OUTPUT_BY_PAIR, OUTPUT_FLOOR,
            HAS_CONTEXT, HAS_MASK, ZERO_PADDING, STATS, BLOCK_D, GROUP, CHUNK, EDGE_UNROLL
        )  # fmt: skip
    if STATS:
        slot = (tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))) % SLOTS
        row = sums_ptr + slot * N_SUMS  # the recorder's partial rows (recorder.SLOTS)
        # Relaxed: nothing is read back before the stream ends, and Triton's default (acq_rel)
        # makes every program wait for its stores and each atomic's round trip, one after another.
        for column in tl.static_range(N_SUMS):
            tl.atomic_add(row + column, totals[column].to(tl.float64), sem="relaxed")
        tl.atomic_max(maxes_ptr + slot, totals[N_SUMS], sem="relaxed")


@triton.jit(noinline=True)
def _program_exactly(
    memory, quantization, MODE: tl.constexpr, ROUNDING: tl.constexpr, OPERAND_ROUNDING: tl.constexpr, CLAMP: tl.constexpr,
    INPUT_BY_PAIR: tl.constexpr, OUTPUT_BY_PAIR: tl.constexpr, OUTPUT_FLOOR: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PADDING: tl.constexpr, STATS: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr,
):  # fmt: skip
    """The program again, the exact way (div_rn for SiLU, the statistics' exact bookkeeping),
    storing its outputs over the first walk's: for a program whose preactivations left
    `_silu_quotient`'s domain or whose statistics were not finite. A function of its own (not
    inlined), so that the kernel's first walk is compiled as if it were not there: inlined, the
    two walks shared values, which took the kernel from 104 to 123 registers and made it 4-9%
    slower."""
    totals, _ = _program(
        memory, quantization, MODE, ROUNDING, OPERAND_ROUNDING, CLAMP, INPUT_BY_PAIR, OUTPUT_BY_PAIR, OUTPUT_FLOOR,
        HAS_CONTEXT, HAS_MASK, ZERO_PADDING, BLOCK_D, GROUP, CHUNK, UNROLL, UNROLL, STATS=STATS, EXACT=True,
    )  # fmt: skip
    return totals


@triton.jit
def _program(
    memory, quantization, MODE: tl.constexpr, ROUNDING: tl.constexpr, OPERAND_ROUNDING: tl.constexpr, CLAMP: tl.constexpr,
    INPUT_BY_PAIR: tl.constexpr, OUTPUT_BY_PAIR: tl.constexpr, OUTPUT_FLOOR: tl.constexpr, HAS_CONTEXT: tl.constexpr,
    HAS_MASK: tl.constexpr, ZERO_PADDING: tl.constexpr,
    BLOCK_D: tl.constexpr, GROUP: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr, EDGE_UNROLL: tl.constexpr,
    STATS: tl.constexpr, EXACT: tl.constexpr,
):  # fmt: skip
    """One program's work (`_walk`, FULL where it is a full program): its statistics' totals
    (`_program_statistics`) and the largest |preactivation| it met (0 where it is full and in a
    quantized mode)."""
    x_ptr, sx_b, sx_l, sx_d, ctx_ptr, sc_b, sc_l, sc_d, w_ptr, sw_d, sw_k, b_ptr, sb_d, out_ptr, so_b, so_l, so_d, mask_ptr, sm_b, sm_l, length, channels = memory  # fmt: skip
    in_scale, weight_scale, bias_scale, acc_scale, out_scale, in_reciprocal, weight_reciprocal, bias_reciprocal, out_reciprocal, in_lo, in_hi, in_lo_x, in_hi_x, out_lo, out_hi, in_pair_hi, in_pair_lo, out_pair_hi, out_pair_lo = quantization  # fmt: skip
    batch = tl.program_id(2).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = d < channels
    starts = (tl.program_id(1) * GROUP + tl.arange(0, GROUP)) * CHUNK

    w0 = _weight_operand(w_ptr, sw_d, sw_k, d, d_ok, 0, weight_scale, weight_reciprocal, MODE, OPERAND_ROUNDING)[None, :]
    w1 = _weight_operand(w_ptr, sw_d, sw_k, d, d_ok, 1, weight_scale, weight_reciprocal, MODE, OPERAND_ROUNDING)[None, :]
    w2 = _weight_operand(w_ptr, sw_d, sw_k, d, d_ok, 2, weight_scale, weight_reciprocal, MODE, OPERAND_ROUNDING)[None, :]
    w3 = _weight_operand(w_ptr, sw_d, sw_k, d, d_ok, 3, weight_scale, weight_reciprocal, MODE, OPERAND_ROUNDING)[None, :]
    bias_term = _bias_term(b_ptr, sb_d, d, d_ok, bias_scale, bias_reciprocal, MODE, OPERAND_ROUNDING)[None, :]
    real_bits = _real_bits(mask_ptr, sm_b, sm_l, batch, starts, length, HAS_MASK, CHUNK)
    n_real = tl.sum(libdevice.popc(real_bits).to(tl.float32)) * tl.sum(d_ok.to(tl.float32))

    source, context, padding, target = (x_ptr, sx_b, sx_l, sx_d), (ctx_ptr, sc_b, sc_l, sc_d), (mask_ptr, sm_b, sm_l), (out_ptr, so_b, so_l, so_d)  # fmt: skip
    weights = (w0, w1, w2, w3, bias_term)
    input_scales = (in_scale, in_reciprocal, in_lo, in_hi, in_lo_x, in_hi_x, in_pair_hi, in_pair_lo)
    output_scales = (acc_scale, out_scale, out_reciprocal, out_lo, out_hi, out_pair_hi, out_pair_lo)
    # A program whose positions are all real and inside, of channels all inside, walks without
    # masks; in a quantized mode also without tracking |v|, where its weights bound every
    # preactivation inside `_silu_quotient`'s domain (`_preactivation` of the largest input code's
    # magnitude and of |w|, |b|: its roundings are monotone, so it bounds every |v|).
    full = n_real == GROUP * CHUNK * BLOCK_D
    if MODE == MODE_INT8 or MODE == MODE_SIM:
        x_max = _dequantized(128.0, in_scale, MODE)
        v_max = _preactivation(x_max, x_max, x_max, x_max, tl.abs(w0), tl.abs(w1), tl.abs(w2), tl.abs(w3), tl.abs(bias_term), acc_scale, MODE)  # fmt: skip
        full = full & (tl.max(v_max) <= SILU_DOMAIN)
    program = (source, context, padding, target, batch, starts, d, d_ok, length, real_bits, weights, input_scales, output_scales)  # fmt: skip
    if not EXACT and full:  # the exact walk takes every program the checked way
        sums, largest_v = _walk(
            program, MODE, ROUNDING, CLAMP, INPUT_BY_PAIR, OUTPUT_BY_PAIR, OUTPUT_FLOOR, HAS_CONTEXT, ZERO_PADDING, STATS,
            EXACT, BLOCK_D, GROUP, CHUNK, UNROLL, FULL=True,
        )  # fmt: skip
    else:
        sums, largest_v = _walk(
            program, MODE, ROUNDING, CLAMP, INPUT_BY_PAIR, OUTPUT_BY_PAIR, OUTPUT_FLOOR, HAS_CONTEXT, ZERO_PADDING, STATS,
            EXACT, BLOCK_D, GROUP, CHUNK, EDGE_UNROLL, FULL=False,
        )  # fmt: skip
    return _program_statistics(sums, n_real, EXACT, CHUNK), tl.max(largest_v)


@triton.jit
def _program_statistics(sums, n_real, EXACT: tl.constexpr, CHUNK: tl.constexpr):
    """The recorder's columns (COUNT ... NONFINITE) and the largest error, over the program's
    lanes, from `_walk`'s accumulators, in one reduction. Lanes' sums are fp32 (counts are exact:
    below 2**24); the recorder accumulates programs' in fp64. The fast way counts every real
    value: it is taken only where all were finite."""
    sum_abs, sum_signal, sum_sq, max_err, tallies = sums
    if EXACT:
        clamped = libdevice.trunc(tallies / (CHUNK + 1.0))
        counted = tallies - clamped * (CHUNK + 1.0)
    else:
        clamped, counted = tallies, tl.zeros_like(tallies)
    totals = tl.reduce((counted, sum_abs, sum_signal, sum_sq, clamped, max_err), None, _sums_and_max)
    n_counted = totals[0] if EXACT else n_real
    return n_counted, totals[1], totals[2], totals[3], totals[4], n_real - n_counted, totals[5]


@triton.jit
def _sums_and_max(a0, a1, a2, a3, a4, a5, b0, b1, b2, b3, b4, b5):
    return a0 + b0, a1 + b1, a2 + b2, a3 + b3, a4 + b4, tl.maximum(a5, b5)
