"""The Triton kernels (lm_eval_floatsim.kernels) against the PyTorch reference path on the CPU.

Three layers of tests:
- always: on CPU tensors the dispatch declines and quant.conv_silu runs its PyTorch path;
- where Triton is installed: the kernels' logic (indexing, window, left context, masks, statistics)
  run by Triton's CPU interpreter in a subprocess (TRITON_INTERPRET must be set before Triton is
  imported), against quant.conv_silu on the CPU;
- where CUDA is available: the compiled kernels on large random inputs against the CPU reference:
  int8 codes bit-identical up to libdevice's expf differing from the CPU's in the last bit, the
  float simulation within SPEC §2's rule, the statistics, the selective scan and the RMSNorm.

The reference of every comparison is the CPU run of the project's PyTorch path, which
tests/test_quant.py checks against independent integer / float64 references; here the question is
only whether the kernels compute the same function.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers_models import statistics_recorder
from lm_eval_floatsim import kernels
from lm_eval_floatsim.modes import ROUNDINGS
from lm_eval_floatsim.quant import LayerScales, QuantSpec, conv_silu, pair_codes_are_exact, round_codes
from lm_eval_floatsim.recorder import CLAMPED, COUNT, NONFINITE, SUM_ABS_ERR, SUM_SQ_ERR, SUM_SQ_SIGNAL, Recorder

HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available() and HAS_TRITON
K = 4

SPECS = [
    QuantSpec("fp"),
    QuantSpec("int8"),
    QuantSpec("same"),
    QuantSpec("same", rounding="half_even"),
    QuantSpec("better", divisor=2025),
    QuantSpec("better", divisor=2025, clamp="none"),
    QuantSpec("better", divisor=2.5, rounding="half_even"),
    QuantSpec("int8", operand_rounding="half_even"),
    QuantSpec("same", operand_rounding="half_even"),
]


# ------------------------------------------------------------------ cases


def random_case(seed, batch, length, channels, dtype=torch.float32, device="cpu"):
    """x as the strided x-half of an in_proj output (batch, length, 2*channels), conv weight and
    bias, and scales calibrated on this x the way SPEC §2 says (absmax / 127; output scale from a
    high quantile of |y|) so that values exercise rounding, clamping and ties alike."""
    g = torch.Generator().manual_seed(seed)
    xz = torch.randn(batch, length, 2 * channels, generator=g) * 2
    xz[..., :channels] += torch.randn(channels, generator=g)  # per-channel offsets, as real activations have
    w = torch.randn(channels, K, generator=g) * 0.5
    b = torch.randn(channels, generator=g) * 0.3
    x = xz[..., :channels]
    y = torch.nn.functional.silu(
        torch.nn.functional.conv1d(x.transpose(1, 2), w[:, None, :], b, padding=K - 1, groups=channels)[..., :length]
    )
    scales = LayerScales(
        input=x.abs().max().item() / 127,
        output=torch.quantile(y.abs().flatten()[:100_000], 0.999).item() / 127,
        weight=w.abs().max().item() / 127,
        bias=b.abs().max().item() / 127,
    )
    xz = xz.to(dtype=dtype, device=device)
    return xz[..., :channels], w.to(device), b.to(device), scales


def narrowed_inputs(x, scales, dtype):
    """x in fp16 or bf16 with an input scale a third of the calibrated one, so that the largest
    values of either sign clamp: the kernel clamps them as loaded (`quant.value_bounds_in`)."""
    return x.to(dtype), dataclasses.replace(scales, input=scales.input / 3)


def heavy_weights(w, scales, factor=60.0):
    """Weights that carry preactivations far past `_silu_quotient`'s domain (|v| <= 80) in both
    directions: full programs must not skip tracking |v| there, and the programs that meet such a
    v divide with div_rn."""
    return w * factor, dataclasses.replace(scales, weight=scales.weight * factor)


def preactivation_extremes(x, w, b):
    """The smallest and largest conv output (fp32, before SiLU) of x, for asserting a case reaches them."""
    v = torch.nn.functional.conv1d(x.float().cpu().transpose(1, 2), w.cpu()[:, None, :], b.cpu(), padding=K - 1, groups=w.shape[0])
    return v.min().item(), v.max().item()


def observed_recorder(device):
    """A one-layer Recorder past its snapshot batch: observers only accumulate statistics."""
    recorder = Recorder(1, dump_n=4, device=device)
    recorder.arm()
    empty = torch.zeros(1, 1, 1, device=device)
    recorder.layer(0, None)(empty, empty, empty, torch.zeros_like(empty, dtype=torch.bool))
    recorder.partial_sums.zero_()
    recorder.partial_maxes.zero_()
    return recorder


def reference(x, w, b, spec, scales, left_context=None, mask=None):
    """quant.conv_silu's PyTorch path on the CPU: the output, and what its observer saw
    (before, after, codes, clamped)."""
    seen = []
    cpu = lambda t: None if t is None else t.cpu()
    observer = lambda *values: seen.extend(values)
    out = conv_silu(cpu(x), cpu(w), cpu(b), spec, scales, observer, cpu(left_context), cpu(mask))
    return out, SimpleNamespace(**dict(zip(("before", "after", "codes", "clamped"), seen)))


def expected_statistics(seen, out, mask, spec, scales):
    """The recorder's statistics of the reference's `before` against the kernel's output: where a
    code differs at a near-tie, so does the error, and the comparison should not count that. The
    kernel's `after` is its code times s_eff in fp32, before the output's dtype rounds it."""
    recorder = observed_recorder("cpu")
    if seen.codes is None:  # fp: after is before
        after = seen.before
    else:
        after = codes_of(out.cpu(), spec, scales).float() * np.float32(spec.effective_scale(scales.output))
    recorder.layer(0, None if mask is None else mask.cpu())(seen.before, after, seen.codes, seen.clamped)
    return recorder


def codes_of(out, spec, scales):
    """Output codes recovered from the dequantized output (exact: code * s_eff is one rounding)."""
    return torch.round(out.double() / np.float32(spec.effective_scale(scales.output)))


def near_ties(before, spec, scales, ulps=4):
    """Where the code may legitimately differ: y / s_eff within `ulps` ulps of y (libdevice's expf
    and the CPU's are each within ~2 ulp; SiLU's add and divide keep that) of a rounding tie."""
    scale = np.float64(np.float32(spec.effective_scale(scales.output)))
    y = before.float().numpy()
    q = np.abs(y.astype(np.float64) / scale)
    slack = ulps * np.spacing(np.abs(y)).astype(np.float64) / scale + np.spacing(q.astype(np.float32))
    return np.abs(q - np.floor(q) - 0.5) <= slack


def assert_codes_match(out, expected, before, spec, scales):
    """Codes equal to the reference's except, by at most 1, at near-ties (see near_ties); fp
    outputs equal up to exp's last bits. Returns the number of differing codes."""
    assert out.shape == expected.shape and out.dtype == expected.dtype
    out, expected = out.cpu(), expected.cpu()
    if not spec.quantized:
        torch.testing.assert_close(out.float(), expected.float(), rtol=4e-7, atol=1e-7)  # 2-4 ulp: exp
        return 0
    got, want = codes_of(out, spec, scales), codes_of(expected, spec, scales)
    differ = (got != want).numpy()
    assert (got - want).abs().max().item() <= 1
    assert not (differ & ~near_ties(before, spec, scales)).any(), "codes differ away from a rounding tie"
    return int(differ.sum())


def with_nonfinite_inputs(x):
    """x with NaN and infinities at real positions of row 0 and NaN in row 1's padding
    (positions 0-4, as the checks' masks pad it)."""
    x = x.clone()
    x[0, 10, 3] = float("nan")
    x[0, 20, 5] = float("inf")
    x[0, 30, 7] = -float("inf")
    x[1, 2, 1] = float("nan")
    return x


def assert_nonfinite_outputs_match(out, expected, before, spec, scales):
    """NaN and infinities where the reference has them, codes as assert_codes_match elsewhere."""
    finite = expected.isfinite()
    assert torch.equal(out.isfinite(), finite), "non-finite outputs at other positions"
    torch.testing.assert_close(out[~finite], expected[~finite], equal_nan=True, rtol=0, atol=0)
    keep = lambda t: torch.where(finite, t, torch.zeros_like(t))
    assert_codes_match(keep(out), keep(expected), torch.where(before.isfinite(), before, 0.0), spec, scales)


def assert_same_statistics(recorder, expected, expected_out):
    """Counts are exact. Signal energy: fp32 partials summed in different orders (pairwise on the
    CPU, per lane and per program in the kernel): relative differences ~1e-7, 1e-5 leaves room.
    Error sums: `before` may also differ in its last bit (exp), which moves an error by ~1e-7 of
    the value; with `better`'s fine scale errors are ~1e-6 of the value, so each such position's
    error moves by up to ~10%, and a run's sums by up to ~1e-3 (seen: 1.3e-4): 5e-3. The largest
    error moves by at most the ulps exp moves `before` by."""
    got, want = recorder.sums[0].cpu(), expected.sums[0]
    for column in (COUNT, CLAMPED, NONFINITE):
        assert got[column] == want[column], (column, got, want)
    assert got[SUM_SQ_SIGNAL].item() == pytest.approx(want[SUM_SQ_SIGNAL].item(), rel=1e-5)
    for column in (SUM_ABS_ERR, SUM_SQ_ERR):
        assert got[column].item() == pytest.approx(want[column].item(), rel=5e-3, abs=1e-30), column
    finite = expected_out.float()[expected_out.isfinite()]
    ulp = float(np.spacing(np.float32(finite.abs().max().item())))
    assert recorder.maxes[0].cpu().item() == pytest.approx(expected.maxes[0].item(), rel=1e-6, abs=4 * ulp)


def scan_case(seed, batch, length, channels, d_state, h0=False, device="cpu"):
    """Inputs of the scan in the layouts a block makes: z a view of in_proj's output, B and C
    views of x_proj's, delta before softplus and bias."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g)
    xz = rand(batch, length, 2 * channels)
    x_proj = rand(batch, length, 8 + 2 * d_state)
    case = dict(
        u=rand(batch, length, channels),
        delta=rand(batch, length, channels) - 1,
        A=-torch.exp(rand(channels, d_state) * 0.5),
        B=x_proj[..., 8 : 8 + d_state],
        C=x_proj[..., 8 + d_state :],
        D=rand(channels),
        z=xz[..., channels:],
        delta_bias=rand(channels) * 0.5,
        h0=rand(batch, channels, d_state) if h0 else None,
    )
    return {name: None if t is None else t.to(device) for name, t in case.items()}


def scan_reference(u, delta, A, B, C, D, z, delta_bias, h0=None):
    """The scan's definition (selective_scan.py's docstring), position by position in float64."""
    u, delta, A, B, C, D, z, delta_bias = (t.double().cpu() for t in (u, delta, A, B, C, D, z, delta_bias))
    dt = torch.nn.functional.softplus(delta + delta_bias)
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float64) if h0 is None else h0.double().cpu()
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    y = torch.stack(ys, dim=1) * torch.nn.functional.silu(z)
    return y, h


def assert_scan_matches(out, expected, rtol=1e-4):
    """fp32 with exp2 of ~2 ulp, over a few hundred positions whose state decays: relative errors
    ~1e-6 of the output's scale; rtol 1e-4 of the largest value leaves room."""
    (y, last), (y_ref, last_ref) = out, expected
    scale = y_ref.abs().max().item()
    torch.testing.assert_close(y.cpu().double(), y_ref, rtol=0, atol=rtol * scale)
    torch.testing.assert_close(last.cpu().double(), last_ref, rtol=0, atol=rtol * last_ref.abs().max().item())


def assert_rms_norm_matches(out, x, weight, eps):
    """mamba.RMSNorm's formula in float64; the output is rounded to weight's dtype twice (normed,
    then the product), so 2 ulp of that dtype plus fp32's share."""
    x64 = x.double().cpu()
    expected = weight.double().cpu() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + eps)
    ulp = torch.finfo(weight.dtype).eps
    assert out.dtype == weight.dtype and out.shape == x.shape
    torch.testing.assert_close(out.cpu().double(), expected, rtol=2 * ulp + 1e-6, atol=1e-6)


# ------------------------------------------------------------------ always


def test_cpu_tensors_take_the_pytorch_path():
    x, w, b, scales = random_case(0, 2, 16, 8)
    assert kernels.fused_conv_silu(x, w, b, QuantSpec("int8"), scales) is None
    assert kernels.fused_selective_scan(x, x, -torch.ones(8, 16), x, x, w[:, 0], x, b) is None
    assert kernels.fused_rms_norm(x, b, 1e-5) is None


def fma32(a, b, c):
    """RN(a * b + c) in fp32, exactly, for fp32 arrays: the product is exact in float64 and the
    float64 sum's rounding error e (TwoSum) is known, so s + e is the exact result; rounding s to
    fp32 is right unless s sits on an fp32 midpoint, where e says which side the exact sum is on."""
    a, b, c = (np.asarray(v, dtype=np.float32).astype(np.float64) for v in (a, b, c))
    product = a * b
    s = product + c
    b_virtual = s - product
    e = (product - (s - b_virtual)) + (c - b_virtual)
    nearest = s.astype(np.float32)
    toward_s = np.where(s > nearest, np.float32(np.inf), np.float32(-np.inf))
    other = np.nextafter(nearest, toward_s)
    on_midpoint = (s != nearest) & (s == (nearest.astype(np.float64) + other.astype(np.float64)) / 2)
    exact_is_on_others_side = np.sign(e) == np.sign(other.astype(np.float64) - nearest.astype(np.float64))
    return np.where(on_midpoint & (e != 0) & exact_is_on_others_side, other, nearest)


def divide_as_the_kernel_does(t, scale):
    """conv_silu_triton._divide's steps, in numpy fp32 with exact FMAs."""
    t, scale = np.asarray(t, dtype=np.float32), np.float32(scale)
    reciprocal = np.float32(1) / scale
    q0 = t * reciprocal
    q1 = fma32(fma32(q0, scale, -t), -reciprocal, q0)
    q2 = fma32(fma32(q1, scale, -t), -reciprocal, q1)
    return np.where(np.abs(q0) <= np.finfo(np.float32).max, q2, q0)


def silu_quotient_as_the_kernel_does(v, d, estimate):
    """conv_silu_triton._silu_quotient's steps, in numpy fp32 with exact FMAs, from the
    reciprocal estimate y0 that rcp.approx gave."""
    y1 = fma32(fma32(-d, estimate, 1), estimate, estimate)
    q0 = v * y1
    return fma32(fma32(q0, d, -v), -y1, q0)


def silu_preactivations(rng):
    """v across `_silu_quotient`'s domain |v| <= 80: every fp16 value there, random values of every
    exponent, tiny and subnormal ones, the domain's ends."""
    fp16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    wide = (rng.standard_normal(50_000) * 2.0 ** rng.integers(-149, 7, 50_000)).astype(np.float32)
    edges = np.float32([0.0, -0.0, 80.0, -80.0, 1e-45, -1e-45, 2.0**-126, -(2.0**-126), 2.0**-25, -(2.0**-25)])
    v = np.concatenate([fp16, wide, edges])
    return v[np.abs(v) <= 80]


def silu_quotient_cases(rng):
    """(v, d): SiLU's own, d = 1 + exp(-v) in fp32 for `silu_preactivations`, and pairs with d
    anywhere in [1, 2**116] whose quotient lies next to a midpoint of two fp32 values (v is such a
    midpoint times d, rounded)."""
    v = silu_preactivations(rng)
    d = (np.float32(1) + np.exp(-v)).astype(np.float32)
    d_wide = (2.0 ** rng.uniform(0, 116, 50_000)).astype(np.float32)
    q = (2.0 ** rng.uniform(-100, 6, 50_000)).astype(np.float32)
    midpoints = (q.astype(np.float64) + np.nextafter(q, np.float32(np.inf)).astype(np.float64)) / 2
    v_mid = (midpoints * d_wide * rng.choice([-1, 1], 50_000)).astype(np.float32)
    return np.concatenate([v, v_mid]), np.concatenate([d, d_wide])


def test_silu_quotient_is_correctly_rounded():
    """SiLU's division v / d through a reciprocal estimate and two FMA corrections, where the kernel
    uses it (|v| <= SILU_DOMAIN, d >= 1): IEEE's correctly rounded quotient bit for bit, signed
    zeros included, from the correctly rounded reciprocal and from either neighbour of it
    (rcp.approx is within an ulp of 1 / d). Where |v| < 2**-25, d is 2 and its estimate 1/2."""
    v, d = silu_quotient_cases(np.random.default_rng(0))
    want = v / d
    nearest = np.float32(1) / d
    for estimate in (nearest, np.nextafter(nearest, np.float32(0)), np.nextafter(nearest, np.float32(1))):
        estimate = np.where(d == 2, np.float32(0.5), estimate)
        got = silu_quotient_as_the_kernel_does(v, d, estimate)
        same = got.view(np.uint32) == want.view(np.uint32)
        assert same.all(), (v[~same][:5], d[~same][:5], got[~same][:5], want[~same][:5])


def division_cases(scale, rng):
    """Every finite fp16 value (all conv inputs of an fp16 model), fp32 values across the exponent
    range, and values within a few ulps of the rounding ties (k + 1/2) * scale that decide codes."""
    fp16 = np.arange(2**16, dtype=np.uint16).view(np.float16)
    fp16 = fp16[np.isfinite(fp16)].astype(np.float32)
    wide = (rng.standard_normal(20_000) * 2.0 ** rng.integers(-40, 40, 20_000)).astype(np.float32)
    ties = ((np.arange(-140, 140) + 0.5) * np.float64(scale)).astype(np.float32)
    near_ties = np.concatenate([ties, *(np.nextafter(ties, direction) for direction in (np.inf, -np.inf))])
    near_ties = np.concatenate([near_ties, np.nextafter(near_ties, np.inf), np.nextafter(near_ties, -np.inf)])
    return np.concatenate([fp16, wide, near_ties, np.float32([0.0, -0.0, np.inf, -np.inf, np.nan])])


def test_division_through_the_reciprocal_is_correctly_rounded():
    """The kernel divides by a quantization scale with its reciprocal and FMA corrections; the
    result must be IEEE's correctly rounded quotient, which numpy's fp32 division is, bit for bit,
    for scales across SCALE_RANGE (powers of two, all-ones mantissas, calibration-like).
    Quotients below 2**-60 need only be as small, with the same sign: their codes are 0 either way."""
    rng = np.random.default_rng(0)
    all_ones = np.float32(np.nextafter(np.float32(2), np.float32(0)))  # 1.11...1b
    scales = [2.0**-100, 2.0**100, 1.0, 0.5, float(all_ones), float(all_ones) * 2.0**-20, 1 / 127, 3.0 / 127]
    scales += list(2.0 ** rng.uniform(-30, 10, 40))
    for scale in scales:
        t = division_cases(np.float32(scale), rng)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            got = divide_as_the_kernel_does(t, scale)
            want = t / np.float32(scale)
        tiny = np.abs(want) < 2.0**-60
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        assert (same | tiny).all(), (scale, t[~same][:5], got[~same][:5], want[~same][:5])
        assert (np.abs(got[tiny]) < 2.0**-59).all() and (np.signbit(got) == np.signbit(want))[tiny].all()


def assert_dequantized_codes(dequantize, q, device="cpu"):
    """`_dequantized_code` against quant.py's round_codes(q) * s in fp32, bit for bit, for the
    quotients it takes (|q| < 2**22; half away from zero: RN(t / s) + 0.0, never -0.0) and
    scales across the kernel's range."""
    q = q[q.abs() < 2**22]
    for rounding in ROUNDINGS:
        quotients = q + 0.0 if rounding == "half_away" else q
        for scale in (1.0, 3.7 / 127, 0.0123, 2.0**-100, 2.0**100):
            s = torch.tensor(scale, dtype=torch.float32)
            want = round_codes(quotients, rounding) * s
            assert_same_bits(dequantize(quotients.to(device), s.item(), rounding), want)


def rounding_cases(rng):
    """fp32 values whose rounding is delicate: within ulps of every integer and half-integer up to
    300 and around 2**22..2**24 (where fp32 spacing reaches 1/2, 1, 2), the largest float below
    1/2, signed zeros, subnormals, infinities, NaN, every fp16 value, and values of every exponent."""
    def around(values, ulps=3):
        values = np.asarray(values, dtype=np.float32)
        out = [values]
        up, down = values, values
        for _ in range(ulps):
            up, down = np.nextafter(up, np.float32(np.inf)), np.nextafter(down, np.float32(-np.inf))
            out += [up, down]
        return np.concatenate(out)

    halves = np.arange(-300, 301) * 0.5
    powers = np.float32([2.0**22, 2.0**23, 2.0**24]) + np.arange(-3, 4)[:, None].astype(np.float32)
    fp16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, -1e-45, 1e-40, -1e-40, 0.49999997, -0.49999997]
    wide = (rng.standard_normal(20_000) * 2.0 ** rng.integers(-30, 30, 20_000)).astype(np.float32)
    values = np.concatenate([around(halves), around(powers.ravel()), around([2.0**22, -(2.0**23)], 8),
                             np.float32(special), fp16, wide])
    return torch.from_numpy(values)


def assert_same_bits(got, want):
    """Equal fp32 bit patterns (so signed zeros count), any NaN for NaN."""
    got, want = got.cpu(), want.cpu()
    same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
    assert same.all(), (got[~same][:5].tolist(), want[~same][:5].tolist())


# ------------------------------------------------------------------ Triton on the CPU: launch parameters, the interpreter


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_inputs_the_kernel_cannot_clamp_as_loaded_take_the_pytorch_path():
    """fp16 inputs at s_x = 600: every fp16 value's code is below 127 (65504 / 600 = 109), so no
    fp16 bound clamps as the codes clamp (`quant.value_bounds_in` is None) and the layer runs the
    PyTorch path; the same scale with fp32 or bf16 inputs runs the kernel."""
    from lm_eval_floatsim.kernels import conv_silu_triton as module

    scales = LayerScales(input=600.0, output=0.01, weight=0.01, bias=0.01)
    runs = {dtype: module.kernel_parameters(QuantSpec("int8"), scales, torch.device("cpu"), dtype)["scales_in_range"]
            for dtype in (torch.float16, torch.bfloat16, torch.float32)}  # fmt: skip
    assert runs == {torch.float16: False, torch.bfloat16: True, torch.float32: True}


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_logic_under_the_triton_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(sys.path))
    result = subprocess.run(
        [sys.executable, __file__, "interpret"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "interpreted checks passed" in result.stdout


def _interpreter_libdevice():
    """libdevice's functions as the interpreter can run them (it runs only triton.language's):
    numpy's fp32 operations round every step and divide correctly, as libdevice's *_rn do."""
    import triton.language as tl

    magic = 2.0**23  # adding and removing it rounds |t| < 2**23 to an integer, ties to even

    def rint(t):
        shifted = tl.where(t >= 0, (t + magic) - magic, (t - magic) + magic)
        sign = t.to(tl.int32, bitcast=True) & -(2**31)  # rint(-0.3) is -0.0, as the shifted sum is not
        signed = (shifted.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.where(tl.abs(t) < magic, signed, t)

    def add_rz(a, b):
        # The float64 sum of two fp32 values rounds only where one is below the other's last
        # bit by 2**29, and then not across an fp32 value; stepping back toward zero where
        # rounding to nearest went past the sum gives the sum rounded toward zero.
        exact = a.to(tl.float64) + (tl.zeros_like(a) + b).to(tl.float64)
        nearest = exact.to(tl.float32)
        past = tl.abs(nearest.to(tl.float64)) > tl.abs(exact)
        return tl.where(past, (nearest.to(tl.int32, bitcast=True) - 1).to(tl.float32, bitcast=True), nearest)

    def popc(v):
        v = v - ((v >> 1) & 0x55555555)
        v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
        v = (v + (v >> 4)) & 0x0F0F0F0F
        return ((v * 0x01010101) >> 24) & 0xFF

    return SimpleNamespace(
        trunc=lambda t: tl.where(t < 0, tl.ceil(t), tl.floor(t)),
        rint=rint,
        add_rz=add_rz,
        popc=popc,
        exp=lambda t: tl.exp(t),
        div_rn=lambda a, b: a / b,
        mul_rn=lambda a, b: a * b,
        # The product is exact in float64; the sum is rounded twice, which only an fp32 midpoint
        # could notice (test_division_through_the_reciprocal_is_correctly_rounded covers those).
        fma=lambda a, b, c: (a.to(tl.float64) * b + c).to(tl.float32),
        add_rn=lambda a, b: a + b,
        log1p=lambda t: tl.log(1.0 + t),
    )


def _interpreter_reciprocal_estimate():
    """rcp.approx (inline PTX, which the interpreter cannot run) as numpy's correctly rounded
    reciprocal: one of the estimates test_silu_quotient_is_correctly_rounded covers."""
    import triton

    @triton.jit
    def reciprocal(d):
        return 1.0 / d

    return reciprocal


def _let_the_interpreter_loop_to_a_runtime_bound():
    """Triton 3.6's interpreter turns a scalar argument into a 1-element array, which numpy 2 no
    longer converts with int(): `range(length)` fails. Take its one element instead."""
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched


def _let_the_interpreter_reduce_tuples_over_all_axes():
    """Triton 3.6's interpreter flattens only a tuple's first tensor for a reduction over all axes
    (axis=None), and fails on the others; flatten them all, as compiled Triton does."""
    from triton.runtime import interpreter

    def unravel(self, tensors, axis):
        if axis is not None:
            return tuple(tensors), axis
        return tuple(self.to_tensor(t.handle.data.flatten(), t.dtype) for t in tensors), 0

    interpreter.ReduceOps.unravel = unravel


@contextlib.contextmanager
def refused_pairs(module):
    """conv_silu_triton as for scales whose reciprocal pairs `quant.pair_codes_are_exact` refuses."""
    checked = module.quant.pair_codes_are_exact
    module.quant.pair_codes_are_exact = lambda *args: False
    module.kernel_parameters.cache_clear()
    try:
        yield
    finally:
        module.quant.pair_codes_are_exact = checked
        module.kernel_parameters.cache_clear()


def _interpreted_checks():
    from lm_eval_floatsim.kernels import conv_silu_triton as module
    from lm_eval_floatsim.kernels import selective_scan_triton as scan_module

    module.libdevice = scan_module.libdevice = _interpreter_libdevice()
    module._reciprocal_estimate = _interpreter_reciprocal_estimate()
    _let_the_interpreter_loop_to_a_runtime_bound()
    _let_the_interpreter_reduce_tuples_over_all_axes()
    from lm_eval_floatsim.kernels import rms_norm_triton

    q = rounding_cases(np.random.default_rng(2))
    for rounding in ROUNDINGS:
        assert_same_bits(round_in_kernel(q, rounding), round_codes(q, rounding))
    assert_dequantized_codes(dequantize_in_kernel, q)
    x, weight = torch.randn(5, 3, 37), torch.randn(37)
    assert_rms_norm_matches(rms_norm_triton.launch_rms_norm(x, weight, 1e-5), x, weight, 1e-5)
    for h0 in (False, True):
        case = scan_case(2, 2, 19, 40, 4, h0)
        out = scan_module.launch_selective_scan(**case, return_last_state=True, block_d=16)
        assert_scan_matches(out, scan_reference(**case))
    x, w, b, scales = random_case(1, 2, 37, 20)  # lengths and widths that leave partial blocks
    mask = torch.ones(2, 37, dtype=torch.long)
    mask[1, :5] = 0  # a left-padded row
    left = torch.randn(2, K - 1, 20)
    # (spec, left context, (BLOCK_D, GROUP, CHUNK, num_warps)): every mode once, the window's
    # edges (left context, chunk boundaries, one-position chunks) in a few.
    cases = [(spec, None, (16, 2, 8, 1)) for spec in SPECS] + [
        (SPECS[1], left, (32, 4, 4, 1)),
        (SPECS[5], left, (16, 2, 8, 1)),
        (SPECS[0], left, (8, 1, 1, 1)),
        (SPECS[2], None, (8, 1, 1, 1)),
        (SPECS[3], None, (16, 2, 32, 1)),  # 32-position chunks: the mask's bits fill an int32
    ]
    for spec, context, config in cases:
        assert module.kernel_parameters(spec, scales, x.device, x.dtype)["input_by_pair"] == spec.quantized
        expected, seen = reference(x, w, b, spec, scales, context)
        recorder = observed_recorder("cpu")
        out = module.launch_conv_silu(x, w, b, spec, scales, recorder.layer(0, mask), context, config=config)
        assert_codes_match(out, expected, seen.before, spec, scales)
        assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)
    # scales whose reciprocal pairs the check refuses: the kernel divides (`_divide`) instead
    with refused_pairs(module):
        for spec in (SPECS[1], SPECS[3], SPECS[4]):
            expected, seen = reference(x, w, b, spec, scales)
            out = module.launch_conv_silu(x, w, b, spec, scales, config=(16, 2, 8, 1))
            assert_codes_match(out, expected, seen.before, spec, scales)
    # fp16 inputs that clamp (bf16 on the GPU: the interpreter truncates fp32 to bf16); weights
    # whose preactivations leave `_silu_quotient`'s domain. (16, 2, 8, 1) has full programs (batch
    # 0's first 16 positions and channels) and edge ones.
    heavy, heavy_scales = heavy_weights(w, scales)
    assert preactivation_extremes(x, heavy, b)[0] < -100 < 100 < preactivation_extremes(x, heavy, b)[1]
    for spec in (SPECS[1], SPECS[3]):
        for x_case, scales_case, w_case in [narrowed_inputs(x, scales, torch.float16) + (w,), (x, heavy_scales, heavy)]:
            expected, seen = reference(x_case, w_case, b, spec, scales_case)
            recorder = observed_recorder("cpu")
            out = module.launch_conv_silu(x_case, w_case, b, spec, scales_case, recorder.layer(0, mask), config=(16, 2, 8, 1))
            assert_codes_match(out, expected, seen.before, spec, scales_case)
            assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales_case), expected)
    # padding as the model passes it (the conv's own mask): zeros in, zeros out, NaN in padding inert
    x_padded = x.clone()
    x_padded[1, :5] = float("nan")
    for spec, config in ((SPECS[1], (16, 2, 8, 1)), (SPECS[4], (8, 1, 4, 1)), (SPECS[0], (32, 4, 4, 1))):
        expected, seen = reference(x_padded, w, b, spec, scales, mask=mask)
        recorder = observed_recorder("cpu")
        out = module.launch_conv_silu(x_padded, w, b, spec, scales, recorder.layer(0, mask), None, mask, config=config)
        assert out[1, :5].eq(0).all() and not out.isnan().any()
        assert_codes_match(out, expected, seen.before, spec, scales)
        assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)
    # values that are not finite, at real positions and in padding the conv is not told of: the
    # programs that meet them take the statistics' exact way, the others the fast way
    x_nonfinite = with_nonfinite_inputs(x)
    for spec, config in ((SPECS[0], (16, 2, 8, 1)), (SPECS[1], (8, 1, 4, 1)), (SPECS[5], (32, 4, 4, 1))):
        expected, seen = reference(x_nonfinite, w, b, spec, scales)
        recorder = observed_recorder("cpu")
        out = module.launch_conv_silu(x_nonfinite, w, b, spec, scales, recorder.layer(0, mask), config=config)
        assert_nonfinite_outputs_match(out, expected, seen.before, spec, scales)
        assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)
    print("interpreted checks passed")


# ------------------------------------------------------------------ compiled kernels (CUDA)

cuda_only = pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA and Triton")


@cuda_only
@pytest.mark.parametrize("zero_padding", [False, True], ids=["mask-for-statistics", "mask-for-the-conv"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda spec: f"{spec.mode}-{spec.rounding}-{spec.clamp}-{spec.divisor:g}")
def test_gpu_conv_silu_matches_the_cpu_reference(spec, zero_padding):
    # fp32 activations, so that the output holds code * s_eff exactly; partial channel blocks,
    # a left context, a padded row (whose padding the conv zeroes when it is given the mask).
    x, w, b, scales = random_case(2, 3, 300, 1000, device="cuda")
    left = torch.randn(3, K - 1, 1000, device="cuda")
    mask = torch.ones(3, 300, dtype=torch.bool, device="cuda")
    mask[2, :40] = False
    conv_mask = mask if zero_padding else None
    expected, seen = reference(x, w, b, spec, scales, left, conv_mask)
    recorder = observed_recorder("cuda")
    out = kernels.fused_conv_silu(x, w.cuda(), b.cuda(), spec, scales, recorder.layer(0, mask), left, conv_mask)
    assert out is not None, "the kernel declined"
    assert_codes_match(out, expected, seen.before, spec, scales)
    assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)


# Codes read back from fp16 and bf16 outputs (bf16 holds integers up to 256): the int8 range's specs.
NARROW_CASES = [(spec, case) for spec in SPECS if spec.code_range() == (-128, 127) for case in ("fp16", "bf16")]
# Heavy weights with clamped codes: without a clamp, `better`'s codes of SiLU outputs in the
# thousands pass 2**24, and its errors are fp32's last bits, which exp moves (the statistics'
# tolerances assume errors well above them).
HEAVY_CASES = [(spec, "heavy-weights") for spec in SPECS if spec.code_range() is not None]


@cuda_only
@pytest.mark.parametrize(
    "spec, case", NARROW_CASES + HEAVY_CASES,
    ids=lambda value: value if isinstance(value, str) else f"{value.mode}-{value.rounding}-{value.operand_rounding}-{value.clamp}-{value.divisor:g}",
)
def test_gpu_conv_silu_clamps_narrow_inputs_and_tracks_large_preactivations(spec, case):
    """Inputs clamped as loaded (fp16, bf16: `quant.value_bounds_in`), and full programs of
    weights that carry |v| past `_silu_quotient`'s domain, which must track it and divide with
    div_rn where they meet it: codes and statistics as the CPU's."""
    x, w, b, scales = random_case(6, 3, 300, 512, device="cuda")
    if case == "heavy-weights":
        w, scales = heavy_weights(w, scales)
        assert preactivation_extremes(x, w, b)[0] < -100
    else:
        x, scales = narrowed_inputs(x, scales, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[case]))
    mask = torch.ones(3, 300, dtype=torch.bool, device="cuda")
    mask[2, :40] = False
    expected, seen = reference(x, w, b, spec, scales)
    recorder = observed_recorder("cuda")
    out = kernels.fused_conv_silu(x, w.cuda(), b.cuda(), spec, scales, recorder.layer(0, mask))
    assert out is not None, "the kernel declined"
    assert_codes_match(out, expected, seen.before, spec, scales)
    assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)


@cuda_only
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[3], SPECS[4]], ids=["int8", "same-half-even", "better"])
def test_gpu_conv_silu_divides_where_reciprocal_pairs_are_refused(spec):
    """The kernel's other way to codes (`_divide`, for scales `quant.pair_codes_are_exact` refuses)."""
    from lm_eval_floatsim.kernels import conv_silu_triton as module

    x, w, b, scales = random_case(5, 2, 300, 1000, device="cuda")
    expected, seen = reference(x, w, b, spec, scales)
    with refused_pairs(module):
        assert not module.kernel_parameters(spec, scales, x.device, x.dtype)["input_by_pair"]
        out = kernels.fused_conv_silu(x, w.cuda(), b.cuda(), spec, scales)
    assert_codes_match(out, expected, seen.before, spec, scales)


@cuda_only
def test_gpu_pair_check_gives_the_cpus_verdict():
    """pair_codes_are_exact runs on the kernel's device: the same verdict there as on the CPU,
    the refusal of tests/test_quant.py's scale included."""
    rng = np.random.default_rng(4)
    cases = [(0.056500669568777084, (-128 * 2025, 127 * 2025), "half_away")] + [
        (float(2.0 ** rng.uniform(-12, 4)), code_range, rounding)
        for code_range in ((-128, 127), (-128 * 2025, 127 * 2025)) for rounding in ROUNDINGS for _ in range(5)
    ]
    verdicts = [(pair_codes_are_exact(*case, "cuda"), pair_codes_are_exact(*case, "cpu")) for case in cases]
    assert all(gpu == cpu for gpu, cpu in verdicts) and not verdicts[0][0]


@cuda_only
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[5]], ids=["fp", "int8", "better-unclamped"])
def test_gpu_statistics_with_values_that_are_not_finite(spec):
    """Programs that meet NaN or infinities take the statistics' exact way, the others the fast way:
    together, the reference's counts and sums."""
    x, w, b, scales = random_case(4, 2, 300, 1000, device="cuda")
    mask = torch.ones(2, 300, dtype=torch.bool, device="cuda")
    mask[1, :5] = False
    x = with_nonfinite_inputs(x)
    expected, seen = reference(x, w, b, spec, scales)
    recorder = observed_recorder("cuda")
    out = kernels.fused_conv_silu(x, w.cuda(), b.cuda(), spec, scales, recorder.layer(0, mask))
    assert out is not None, "the kernel declined"
    assert_nonfinite_outputs_match(out.cpu(), expected, seen.before, spec, scales)
    assert recorder.sums[0, NONFINITE].item() > 0
    assert_same_statistics(recorder, expected_statistics(seen, out, mask, spec, scales), expected)


@cuda_only
@pytest.mark.parametrize("mode", ["int8", "same"])
def test_gpu_int8_codes_are_the_cpu_reference_codes_on_a_large_input(mode):
    """fp16 x as a strided view of in_proj's output, 6.3M values: codes differ only where exp's
    last bit moves y across a tie (printed: the count the docs report)."""
    spec = QuantSpec(mode)
    x, w, b, scales = random_case(3, 8, 512, 1536, dtype=torch.float16, device="cuda")
    expected, seen = reference(x, w, b, spec, scales)
    out = kernels.fused_conv_silu(x, w.cuda(), b.cuda(), spec, scales)
    assert out is not None, "the kernel declined"
    differing = assert_codes_match(out, expected, seen.before, spec, scales)
    print(f"{mode}: {differing} of {out.numel()} codes differ from the CPU reference")
    assert differing <= 1e-5 * out.numel()


def fastmath_reference():
    """benchmarks/int8_fastmath_reference.py: the nvcc --use_fast_math reference kernel and its inputs."""
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "int8_fastmath_reference.py")
    spec = importlib.util.spec_from_file_location("int8_fastmath_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@cuda_only
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("inputs", ["realistic", "ties"])
def test_gpu_fast_math_is_bit_identical_to_an_nvcc_fast_math_build(tmp_path_factory, inputs):
    """kernel_math=fast against our own INT8 kernel compiled with nvcc -O3 --use_fast_math: every
    code of 16.8M positions equal, on realistic inputs and on inputs built to sit on rounding ties,
    where exact's codes differ from that build's (so the test can tell the two arithmetics apart)."""
    reference = fastmath_reference()
    built = reference.build(tmp_path_factory.getbasetemp() / "int8_fastmath_reference")
    make = reference.realistic_inputs if inputs == "realistic" else reference.tie_inputs
    X, W, Bq, scales = make(8, 2048, 1024)
    expected = reference.reference_codes(built, X, W, Bq, scales)
    fast = reference.floatsim_codes(X, W, Bq, scales, "fast")
    assert int((fast != expected).sum()) == 0
    exact_differ = int((reference.floatsim_codes(X, W, Bq, scales, "exact") != expected).sum())
    print(f"{inputs}: exact differs from the fast-math build in {exact_differ} of {fast.numel()} codes")
    if inputs == "ties":
        assert exact_differ > 0


@cuda_only
def test_gpu_fast_math_against_the_cpu_emulation():
    """The CPU emulates the FMA and the flushing exactly but not ex2.approx and rcp.approx (the
    GPU's MUFU results): their last bits move a code by one only at a rounding tie."""
    reference = fastmath_reference()
    X, W, Bq, scales = reference.realistic_inputs(4, 1024, 1024, seed=3)
    gpu = reference.floatsim_codes(X, W, Bq, scales, "fast").int()
    cpu = reference.floatsim_codes(X.cpu(), W.cpu(), Bq.cpu(), scales, "fast").int().cuda()
    difference = (gpu - cpu).abs()
    print(f"fast: {int((difference > 0).sum())} of {gpu.numel()} codes differ between the GPU and the CPU emulation")
    assert int(difference.max()) <= 1 and int((difference > 0).sum()) <= 1e-4 * gpu.numel()


if HAS_TRITON:
    import triton
    import triton.language as tl

    from lm_eval_floatsim.kernels.conv_silu_triton import (
        COMPILE_OPTIONS, MODE_FP, ROUNDING_IDS, _code, _dequantized_code, _divide, _silu,
    )  # fmt: skip

    @triton.jit
    def _round_kernel(q_ptr, out_ptr, n, ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
        # q / 1 is q (the reciprocal 1 is exact): the codes of q
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        tl.store(out_ptr + offsets, _code(tl.load(q_ptr + offsets, mask=inside), 1.0, 1.0, ROUNDING), mask=inside)

    def round_in_kernel(q, rounding):
        out = torch.empty_like(q)
        _round_kernel[(triton.cdiv(q.numel(), 1024),)](q, out, q.numel(), ROUNDING=ROUNDING_IDS[rounding], BLOCK=1024,
                                                       **COMPILE_OPTIONS)
        return out

    @triton.jit
    def _dequantize_kernel(q_ptr, out_ptr, n, scale, ROUNDING: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        tl.store(out_ptr + offsets, _dequantized_code(tl.load(q_ptr + offsets, mask=inside), scale, ROUNDING), mask=inside)

    def dequantize_in_kernel(q, scale, rounding):
        out = torch.empty_like(q)
        _dequantize_kernel[(triton.cdiv(q.numel(), 1024),)](q, out, q.numel(), scale, ROUNDING=ROUNDING_IDS[rounding],
                                                            BLOCK=1024, **COMPILE_OPTIONS)  # fmt: skip
        return out

    @triton.jit
    def _divide_kernel(t_ptr, out_ptr, n, scale, reciprocal, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        t = tl.load(t_ptr + offsets, mask=inside, other=1.0)
        tl.store(out_ptr + offsets, _divide(t, scale, reciprocal, False), mask=inside)


    @triton.jit
    def _silu_kernel(v_ptr, out_ptr, n, EXACT: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        tl.store(out_ptr + offsets, _silu(tl.load(v_ptr + offsets, mask=inside), MODE_FP, EXACT), mask=inside)


@cuda_only
def test_gpu_silu_quotient_is_div_rn():
    """The compiled `_silu_quotient` (rcp.approx and FMA corrections) against div_rn, both after
    the same exp, bit for bit, on every v of its domain the CPU test covers."""
    v = torch.from_numpy(silu_preactivations(np.random.default_rng(2))).cuda()
    got, want = torch.empty_like(v), torch.empty_like(v)
    for out, exact in ((got, False), (want, True)):
        _silu_kernel[(triton.cdiv(v.numel(), 1024),)](v, out, v.numel(), EXACT=exact, BLOCK=1024, **COMPILE_OPTIONS)
    got, want = got.cpu().numpy(), want.cpu().numpy()
    same = got.view(np.uint32) == want.view(np.uint32)
    assert same.all(), (v.cpu().numpy()[~same][:5], got[~same][:5], want[~same][:5])


@cuda_only
def test_gpu_division_through_the_reciprocal_is_torchs_division():
    """The compiled `_divide` against torch's CUDA division by a device scalar (quant.py's), bit
    for bit, on every fp16 value, fp32 values across the exponents and around rounding ties."""
    rng = np.random.default_rng(1)
    for scale in [1.0, 1 / 127, 2.0**-100, 2.0**100] + list(2.0 ** rng.uniform(-30, 10, 60)):
        scale = float(np.float32(scale))
        t = torch.from_numpy(division_cases(np.float32(scale), rng)).cuda()
        got = torch.empty_like(t)
        reciprocal = float(np.float32(1) / np.float32(scale))
        _divide_kernel[(triton.cdiv(t.numel(), 1024),)](t, got, t.numel(), scale, reciprocal, BLOCK=1024, **COMPILE_OPTIONS)
        want = t / torch.tensor(scale, dtype=torch.float32, device="cuda")
        got, want = got.cpu().numpy(), want.cpu().numpy()
        tiny = np.abs(want) < 2.0**-60  # code 0 either way (see the CPU test)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want)) | tiny
        assert same.all(), (scale, got[~same][:5], want[~same][:5])


@cuda_only
def test_gpu_rounding_is_quant_py_rounding_bit_for_bit():
    """The compiled roundings against quant.py's on the CPU, signed zeros included: the kernel
    rounds half away with a sum rounded toward zero, the CPU with trunc and the exact fraction;
    `_dequantized_code` rounds with 2**23 and scales in one FMA."""
    q = rounding_cases(np.random.default_rng(3))
    for rounding in ROUNDINGS:
        assert_same_bits(round_in_kernel(q.cuda(), rounding), round_codes(q, rounding))
    assert_dequantized_codes(dequantize_in_kernel, q, "cuda")


@cuda_only
def test_gpu_snapshot_batch_runs_the_pytorch_path():
    x, w, b, scales = random_case(4, 2, 20, 64, device="cuda")
    recorder = Recorder(1, dump_n=5, device="cuda")
    recorder.arm()
    conv_silu(x, w, b, QuantSpec("int8"), scales, recorder.layer(0, None))
    snapshot = recorder.snapshots()[0]
    expected, seen = reference(x, w, b, QuantSpec("int8"), scales)
    assert snapshot.before == seen.before[0].T.flatten()[:5].tolist()
    assert recorder.sums[0, COUNT].item() == x.numel()


@cuda_only
@pytest.mark.parametrize("h0", [False, True])
def test_gpu_selective_scan_matches_float64(h0):
    from lm_eval_floatsim.kernels.selective_scan_triton import launch_selective_scan

    case = scan_case(5, 3, 300, 200, 16, h0, device="cuda")
    assert_scan_matches(launch_selective_scan(**case, return_last_state=True), scan_reference(**case))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_scan_leaves_grids_too_small_for_the_gpu_to_mamba_ssm():
    from lm_eval_floatsim.kernels.selective_scan_triton import default_block_d, prefer_mamba_ssm

    programs = lambda batch: batch * -(-1536 // default_block_d(batch, 1536))
    assert prefer_mamba_ssm(programs(1), 132) and prefer_mamba_ssm(programs(4), 132)
    assert not prefer_mamba_ssm(programs(8), 132) and not prefer_mamba_ssm(programs(64), 132)


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_rms_norm_matches_float64(dtype):
    x, weight = torch.randn(4, 33, 768, device="cuda").to(dtype), torch.randn(768, device="cuda").to(dtype)
    assert_rms_norm_matches(kernels.fused_rms_norm(x, weight, 1e-5), x, weight, 1e-5)


@cuda_only
@pytest.mark.parametrize("length", [32, 33])
@pytest.mark.parametrize("mixer", ["Mamba1", "Mamba2"])
def test_gpu_graphed_forward_replays_the_eager_forward_with_statistics(length, mixer):
    """32 is a bucket length: the replay computes what the eager forward does, bit for bit. 33 is
    padded to 40: cuBLAS may sum the larger matmuls in another order, so logits agree to fp32's
    rounding (1e-5 of logits of order 1) and the statistics count the same positions. Mamba-2's
    scan (mamba_ssm's kernels, where installed) is captured too."""
    from lm_eval_floatsim.kernels.fast_path import GraphedForward
    from lm_eval_floatsim.mamba import MambaConfig, MambaLM

    torch.manual_seed(0)
    shape = {"mixer": "Mamba2", "headdim": 32, "d_state": 16} if mixer == "Mamba2" else {}
    model = MambaLM(MambaConfig(d_model=64, n_layer=2, vocab_size=100, **shape)).cuda().eval()
    model.quantize(QuantSpec("int8"), [LayerScales(0.05, 0.02, 0.01, 0.01)] * 2)
    ids = torch.randint(0, 100, (4, length), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, -7:] = 0
    with torch.no_grad():
        model.recorder = eager_recorder = statistics_recorder(model)
        expected = [model(ids, mask=mask) for _ in range(3)]
        model.recorder = graph_recorder = statistics_recorder(model)
        graphed = GraphedForward(model, capture_after=1)
        got = [graphed(ids, mask) for _ in range(3)]
    assert len(graphed._graphs) == 1
    exact = length == 32
    for logits, want in zip(got, expected):
        if exact:
            assert torch.equal(logits, want)
        else:
            torch.testing.assert_close(logits, want, rtol=0, atol=1e-5)
    assert torch.equal(graph_recorder.sums[:, COUNT], eager_recorder.sums[:, COUNT])
    torch.testing.assert_close(graph_recorder.sums, eager_recorder.sums, rtol=1e-12 if exact else 1e-5, atol=0)
    if exact:
        assert torch.equal(graph_recorder.maxes, eager_recorder.maxes)


if __name__ == "__main__" and sys.argv[1:] == ["interpret"]:
    _interpreted_checks()
