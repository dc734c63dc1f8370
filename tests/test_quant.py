"""Independent tests of the quantized Conv1D+SiLU op (lm_eval_floatsim.quant).

Every expected value is computed here from the formulas of SPEC.md, with Python integers and
Fractions, numpy int64 / float32 / float64, or torch float64 -- never with quant.py's own helpers --
so that a mistake in quant.py cannot hide behind the same mistake in its reference.
"""

import functools
from fractions import Fraction
from math import floor
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lm_eval_floatsim.errors import ArgumentError
from lm_eval_floatsim.mamba import MambaConfig, MambaLM
from lm_eval_floatsim.modes import format_divisor
from lm_eval_floatsim import quant
from lm_eval_floatsim.quant import (
    LOG2E,
    SILU_FLOOR,
    LayerScales,
    QuantSpec,
    SegmentedScales,
    conv_silu,
    fma_fp32,
    pair_codes_are_exact,
    quantize_codes,
    quantize_operands,
    round_half_away,
    reciprocal_pair,
    round_half_even,
    silu,
    value_bounds,
    value_bounds_in,
)

K = 4
EPS32 = 2.0**-24  # unit roundoff of fp32 (half an ulp of 1)
INT8_LO, INT8_HI = -128, 127
f32 = np.float32


# ---------------------------------------------------------------- references (no quant.py inside)


def ref_half_away(q):
    """Round half away from zero; exact in float64 for every fp32 input (|q| + 0.5 needs 25 bits)."""
    q = np.asarray(q, dtype=np.float64)
    return np.sign(q) * np.floor(np.abs(q) + 0.5)


def ref_half_even(q):
    """np.rint rounds to nearest, ties to even, exactly in float64."""
    return np.rint(np.asarray(q, dtype=np.float64))


def fraction_half_away(value: Fraction) -> int:
    magnitude = floor(abs(value) + Fraction(1, 2))
    return magnitude if value >= 0 else -magnitude


def fraction_half_even(value: Fraction) -> int:
    low = floor(value)
    rest = value - low
    if rest != Fraction(1, 2):
        return low + (rest > Fraction(1, 2))
    return low + (low % 2)


def ref_operand_codes(values, scale):
    """clamp(round_half_away(values / s), -128, 127), the division in fp32 as the SPEC says."""
    quotient = np.asarray(values, dtype=f32) / f32(scale)
    return np.clip(ref_half_away(quotient), INT8_LO, INT8_HI).astype(np.int64)


def ref_int8_kernel(x, w, b, scales: LayerScales):
    """The INT8 kernel of SPEC.md step by step: (y fp32, y / s_y in fp32, codes int64)."""
    zero_padding = np.zeros((x.shape[0], K - 1, x.shape[2]), dtype=x.dtype)
    X = ref_operand_codes(np.concatenate([zero_padding, x], axis=1), scales.input)
    W = ref_operand_codes(w, scales.weight)
    Bq = ref_operand_codes(b, scales.bias)
    length = x.shape[1]
    acc = np.zeros(x.shape, dtype=np.int64)
    for k in range(K):
        acc += W[:, k] * X[:, k : k + length]
    # Each product and the sum are separate fp32 operations (numpy does not contract to FMA).
    v = (f32(scales.weight) * f32(scales.input)) * acc.astype(f32) + f32(scales.bias) * Bq.astype(f32)
    with np.errstate(over="ignore"):  # exp(-v) = inf for v < -88.7 gives y = -0, as in fp32 anywhere
        y = v / (f32(1) + np.exp(-v))
    q = y / f32(scales.output)
    codes = np.clip(ref_half_away(q), INT8_LO, INT8_HI).astype(np.int64)
    return y, q, codes


def near_tie(q, ulps=8):
    """Positions where q is within `ulps` fp32 ulps of a .5 tie."""
    magnitude = np.abs(q.astype(np.float64))
    distance = np.abs(magnitude - np.floor(magnitude) - 0.5)
    return distance <= ulps * np.spacing(np.abs(q)).astype(np.float64)


def assert_kernel_codes(codes, before, y_ref, q_ref, codes_ref):
    """The op's int8 codes against the reference kernel's; returns how many positions were ambiguous.

    Our y comes from numpy's float32 exp, the op's from torch's: they differ by a few ulps at some
    positions (measured: up to 4 ulps of y, at ~18% of positions), moving y / s_y by up to ~5 ulps.
    A code may then differ only where y differs AND y / s_y lies within 8 ulps of a .5 tie
    ("ambiguous"), and by one at most; everywhere else it must be equal.
    """
    assert np.all(np.abs(before - y_ref) <= 8 * np.spacing(np.abs(y_ref)) + 1e-30)
    ambiguous = near_tie(q_ref) & (before != y_ref)
    assert np.array_equal(codes[~ambiguous], codes_ref[~ambiguous])
    assert np.abs(codes - codes_ref).max() <= 1
    return int(ambiguous.sum())


def ref_conv_fp64(x64, w64, b64):
    """Depthwise causal conv + bias in float64 with torch's conv1d (padding K-1: zero left padding)."""
    channels, length = x64.shape[2], x64.shape[1]
    out = F.conv1d(x64.transpose(1, 2), w64[:, None, :], b64, padding=K - 1, groups=channels)
    return out[..., :length].transpose(1, 2)


def ref_conv_silu_fp64(x64, w64, b64):
    return F.silu(ref_conv_fp64(x64, w64, b64))


def ref_abs_terms_fp64(x64, w64, b64):
    """|b| + sum_k |w_k x_k| per output: the scale of the rounding errors of an fp32 conv."""
    return ref_conv_fp64(x64.abs(), w64.abs(), b64.abs())


def fp32_conv_silu_bound(terms, y_ref):
    """How far an fp32 SiLU(conv + bias) may be from the float64 one.

    The conv rounds up to 3 times per term (two dequantizing products and the tap product) and
    4 times in the 5-term sum, each by at most EPS32 relative to a partial sum bounded by `terms`:
    |dv| <= 7 * EPS32 * terms; SiLU's slope lies in [-0.1, 1.1]. Evaluating v / (1 + exp(-v)) in
    fp32 adds at most ~3 ulps of y (exp, add, divide). 10 and 4 leave room over 7 * 1.1 and 3.
    """
    return 10 * EPS32 * terms + 4 * EPS32 * y_ref.abs() + 1e-30


def calibrated_scales(x, w, b, percentile=0.9995):
    """The SPEC's recipe on one batch: absmax / 127 for x, w, b; |y| quantile / 127 for y."""
    x64, w64, b64 = x.double(), w.double(), b.double()
    y = ref_conv_silu_fp64(x64, w64, b64)
    return LayerScales(
        input=float(x64.abs().max()) / 127,
        output=float(torch.quantile(y.abs().flatten(), percentile)) / 127,
        weight=float(w64.abs().max()) / 127,
        bias=float(b64.abs().max()) / 127,
    )


def random_case(seed, batch, length, channels, x_scale):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, length, channels, generator=gen) * x_scale
    # Mamba's conv1d init: uniform in +-1/sqrt(fan_in), fan_in = K = 4. The bias follows x_scale
    # so that it does not drown the conv at small scales: x_scale moves SiLU from its linear
    # region (small) to its ReLU-like one (large).
    w = torch.rand(channels, K, generator=gen) - 0.5
    b = (torch.rand(channels, generator=gen) - 0.5) * x_scale
    return x, w, b, calibrated_scales(x, w, b)


def run_op(x, w, b, spec, scales, left_context=None):
    """conv_silu with an observer: the output and what the observer was given."""
    seen = {}

    def observer(before, after, codes, clamped):
        seen.update(before=before, after=after, codes=codes, clamped=clamped, calls=seen.get("calls", 0) + 1)

    out = conv_silu(x, w, b, spec, scales, observer=observer, left_context=left_context)
    assert seen["calls"] == 1
    return SimpleNamespace(out=out, **{k: v for k, v in seen.items() if k != "calls"})


def as_codes(codes: torch.Tensor) -> np.ndarray:
    """The codes as int64, after checking that they are integers (SPEC: "the integer codes")."""
    array = codes.numpy().astype(np.float64)
    fractional = np.unique(array[array != np.round(array)])
    assert fractional.size == 0, f"codes must be integers, got {fractional[:4].tolist()}"
    return array.astype(np.int64)


# ---------------------------------------------------------------- int8: the INT8 kernel


@pytest.mark.parametrize(
    "seed, batch, length, channels, x_scale",
    [(0, 2, 9, 3, 1.0), (1, 4, 64, 32, 1e-3), (2, 2, 128, 64, 40.0), (3, 8, 512, 256, 1.0)],
)
def test_int8_codes_equal_integer_reference(seed, batch, length, channels, x_scale):
    x, w, b, scales = random_case(seed, batch, length, channels, x_scale)
    got = run_op(x, w, b, QuantSpec("int8"), scales)
    y_ref, q_ref, codes_ref = ref_int8_kernel(x.numpy(), w.numpy(), b.numpy(), scales)

    codes = as_codes(got.codes)
    assert got.codes.dtype == torch.float32 and got.codes.shape == x.shape
    assert codes.min() >= INT8_LO and codes.max() <= INT8_HI
    ambiguous = assert_kernel_codes(codes, got.before.numpy(), y_ref, q_ref, codes_ref)
    print(f"int8 {tuple(x.shape)} x_scale={x_scale}: {ambiguous} of {codes.size} ambiguous")
    assert ambiguous <= 10 + 1e-4 * codes.size, "the exemption must stay a handful of positions"
    # The 0.9995 quantile scale clamps about 0.05% of |y|: the clamp is exercised.
    unclamped = ref_half_away(q_ref)
    assert np.array_equal(got.clamped.numpy(), (unclamped < INT8_LO) | (unclamped > INT8_HI))
    assert got.clamped.any()


def test_segmented_scales_give_each_segment_the_int8_codes_of_its_own_scales():
    """conv_scales=xbc: the segments x, B and C (here of very different magnitudes, as in Mamba-2)
    each get the integer reference kernel's codes with their own s_x and s_y and the conv's s_w, s_b;
    the observer sees them in channel order, x first."""
    from lm_eval_floatsim.sites import ConvSiLU

    widths, magnitudes = (6, 2, 2), (1.0, 30.0, 0.05)
    gen = torch.Generator().manual_seed(7)
    x = torch.cat([torch.randn(2, 40, width, generator=gen) * m for width, m in zip(widths, magnitudes)], dim=-1)
    w, b = torch.rand(sum(widths), K, generator=gen) - 0.5, torch.rand(sum(widths), generator=gen) - 0.5
    whole = calibrated_scales(x, w, b)
    parts = [slice(0, 6), slice(6, 8), slice(8, 10)]
    own = [calibrated_scales(x[..., part], w[part], b[part]) for part in parts]
    scales = SegmentedScales(("x", "B", "C"), widths, tuple(s.input for s in own), tuple(s.output for s in own), whole.weight, whole.bias)
    conv1d = torch.nn.Conv1d(10, 10, K, groups=10, padding=K - 1)
    with torch.no_grad():
        conv1d.weight.copy_(w[:, None, :])
        conv1d.bias.copy_(b)
    calls = []
    with torch.no_grad():
        out = ConvSiLU(QuantSpec("int8"), scales)(x, conv1d, lambda *seen: calls.append(seen))

    assert [before.shape[-1] for before, *_ in calls] == list(widths)
    for part, segment, (before, after, codes, _) in zip(parts, own, calls):
        reference = LayerScales(segment.input, segment.output, whole.weight, whole.bias)
        y_ref, q_ref, codes_ref = ref_int8_kernel(x[..., part].numpy(), w[part].numpy(), b[part].numpy(), reference)
        assert_kernel_codes(as_codes(codes), before.numpy(), y_ref, q_ref, codes_ref)
        assert torch.equal(out[..., part], after)  # code * the segment's s_y, fp32
    # One scale for all three would have cut B to the int8 range and left C at a few codes.
    _, _, codes_whole = ref_int8_kernel(x.numpy(), w.numpy(), b.numpy(), whole)
    assert not np.array_equal(codes_whole[..., 6:8], as_codes(calls[1][2]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_int8_output_is_code_times_output_scale_in_input_dtype(dtype):
    x, w, b, scales = random_case(4, 2, 40, 16, 1.0)
    x = x.to(dtype)
    got = run_op(x, w, b, QuantSpec("int8"), scales)
    _, q_ref, codes_ref = ref_int8_kernel(x.float().numpy(), w.numpy(), b.numpy(), scales)
    assert not near_tie(q_ref).any()

    expected_after = codes_ref.astype(f32) * f32(scales.output)
    assert np.array_equal(got.after.numpy(), expected_after)
    assert got.out.dtype == dtype
    assert torch.equal(got.out, torch.from_numpy(expected_after).to(dtype))


# ---------------------------------------------------------------- same vs int8


@pytest.mark.parametrize(
    "seed, batch, length, channels, x_scale",
    [(10, 2, 9, 3, 1.0), (11, 4, 64, 32, 1e-3), (12, 2, 128, 64, 40.0), (13, 8, 512, 256, 1.0), (14, 8, 512, 256, 0.05)],
)
def test_same_scale_reproduces_int8_codes(seed, batch, length, channels, x_scale):
    x, w, b, scales = random_case(seed, batch, length, channels, x_scale)
    int8 = as_codes(run_op(x, w, b, QuantSpec("int8"), scales).codes)
    same = run_op(x, w, b, QuantSpec("same"), scales)
    codes = as_codes(same.codes)
    differ = int((codes != int8).sum())
    print(f"same vs int8 {tuple(x.shape)} x_scale={x_scale}: {differ} of {codes.size} codes differ")
    assert np.abs(codes - int8).max() <= 1
    assert (codes == int8).mean() >= 0.9999
    assert np.array_equal(same.after.numpy(), codes.astype(f32) * f32(scales.output))


def test_float_simulation_is_silu_of_dequantized_conv_in_fp32():
    x, w, b, scales = random_case(20, 4, 96, 48, 1.0)
    got = run_op(x, w, b, QuantSpec("same"), scales)
    # Dequantized operands: int8 codes times the fp32 scale, exactly, in float64.
    xd = torch.from_numpy(ref_operand_codes(x.numpy(), scales.input) * float(f32(scales.input)))
    wd = torch.from_numpy(ref_operand_codes(w.numpy(), scales.weight) * float(f32(scales.weight)))
    bd = torch.from_numpy(ref_operand_codes(b.numpy(), scales.bias) * float(f32(scales.bias)))
    y_ref = ref_conv_silu_fp64(xd, wd, bd)
    terms = ref_abs_terms_fp64(xd, wd, bd)
    assert torch.all((got.before.double() - y_ref).abs() <= fp32_conv_silu_bound(terms, y_ref))


class CodeRecorder:
    """The smallest stand-in for model.recorder: keeps each layer's y and codes."""

    def __init__(self):
        self.before, self.codes = {}, {}

    def layer(self, layer_idx, mask):
        def observe(before, after, codes, clamped):
            self.before[layer_idx] = before.clone()
            self.codes[layer_idx] = None if codes is None else codes.clone()

        return observe


def forward_capturing(model, tokens):
    """One forward: each block's conv input (x half of in_proj) and its observation."""
    conv_inputs, d_inner = {}, model.config.d_inner
    handles = [
        layer.mixer.in_proj.register_forward_hook(
            lambda module, args, output, i=i: conv_inputs.__setitem__(i, output[..., :d_inner].detach().clone())
        )
        for i, layer in enumerate(model.backbone.layers)
    ]
    model.recorder = CodeRecorder()
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        for handle in handles:
            handle.remove()
    recorder, model.recorder = model.recorder, None
    return conv_inputs, recorder


def calibrate_model(model, tokens, percentile=0.9995):
    conv_inputs, recorder = forward_capturing(model.quantize(QuantSpec("fp"), None), tokens)
    scales = []
    for i, layer in enumerate(model.backbone.layers):
        conv = layer.mixer.conv1d
        y = recorder.before[i].double().abs().flatten()
        scales.append(
            LayerScales(
                input=float(conv_inputs[i].abs().max()) / 127,
                output=float(torch.quantile(y, percentile)) / 127,
                weight=float(conv.weight.detach().abs().max()) / 127,
                bias=float(conv.bias.detach().abs().max()) / 127,
            )
        )
    return scales


def test_same_scale_reproduces_int8_codes_in_a_real_forward_pass():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=64, n_layer=4, vocab_size=200)).eval()
    gen = torch.Generator().manual_seed(1)
    scales = calibrate_model(model, torch.randint(0, 200, (4, 64), generator=gen))
    tokens = torch.randint(0, 200, (16, 64), generator=gen)

    int8_inputs, int8 = forward_capturing(model.quantize(QuantSpec("int8"), scales), tokens)
    same_inputs, same = forward_capturing(model.quantize(QuantSpec("same"), scales), tokens)

    compared = differ = 0
    for i, layer in enumerate(model.backbone.layers):
        conv = layer.mixer.conv1d
        weight, bias = conv.weight[:, 0, :].detach().numpy(), conv.bias.detach().numpy()
        int8_codes, same_codes = as_codes(int8.codes[i]), as_codes(same.codes[i])

        y_ref, q_ref, codes_ref = ref_int8_kernel(int8_inputs[i].numpy(), weight, bias, scales[i])
        assert_kernel_codes(int8_codes, int8.before[i].numpy(), y_ref, q_ref, codes_ref)
        assert len(np.unique(int8_codes)) > 100, "calibration should spread the codes over the int8 range"

        # A code that differs in an earlier block legitimately changes the later inputs of its row:
        # compare the rows whose conv input is identical in both runs.
        rows = (int8_inputs[i] == same_inputs[i]).flatten(1).all(dim=1).numpy()
        if i == 0:
            assert rows.all()
        assert np.abs(same_codes[rows] - int8_codes[rows]).max() <= 1
        compared += int8_codes[rows].size
        differ += int((same_codes[rows] != int8_codes[rows]).sum())
    print(f"real forward: {differ} of {compared} codes differ between same and int8")
    assert compared >= 0.9 * 4 * tokens.numel() * model.config.d_inner
    assert differ <= 1e-4 * compared


# ---------------------------------------------------------------- better


def in_range_case(seed=30):
    """Random activations with an output scale large enough that nothing clamps."""
    x, w, b, scales = random_case(seed, 4, 128, 32, 1.0)
    y_max = float(ref_conv_silu_fp64(x.double(), w.double(), b.double()).abs().max())
    return x, w, b, LayerScales(scales.input, 1.01 * y_max / 127, scales.weight, scales.bias)


def test_effective_scale_is_the_correctly_rounded_quotient():
    # float(Fraction) rounds the exact quotient to the nearest double, as Python's `/` does.
    rng = np.random.default_rng(0)
    for s_y in 10.0 ** rng.uniform(-6, 1, 200):
        for divisor in (1, 3, 2.5, 7.0, 10.0, 2025.0):
            expected = float(Fraction(float(s_y)) / Fraction(divisor))
            assert QuantSpec("better", divisor=divisor).effective_scale(float(s_y)) == expected
            assert QuantSpec("same", divisor=divisor).effective_scale(float(s_y)) == float(s_y)
            assert QuantSpec("int8", divisor=divisor).effective_scale(float(s_y)) == float(s_y)
    assert QuantSpec("fp").effective_scale(0.5) is None


@pytest.mark.parametrize("rounding, ref_round", [("half_away", ref_half_away), ("half_even", ref_half_even)])
@pytest.mark.parametrize("divisor", [1, 3, 2.5, 7.0, 2025.0])
def test_better_codes_and_dequantized_output(divisor, rounding, ref_round):
    x, w, b, scales = in_range_case()
    s_eff = scales.output / divisor
    got = run_op(x, w, b, QuantSpec("better", divisor=divisor, rounding=rounding), scales)
    before = got.before.numpy()
    codes = as_codes(got.codes)
    assert np.array_equal(codes, ref_round(before / f32(s_eff)))
    assert np.array_equal(got.after.numpy(), codes.astype(f32) * f32(s_eff))
    assert torch.equal(got.out, got.after)
    assert not got.clamped.any()
    # Rounding to the nearest code errs by at most half a step, plus fp32 roundoff in y / s_eff
    # (relative EPS32 of a quotient <= 128 * divisor) and in code * s_eff (EPS32 relative).
    error = np.abs(got.after.numpy().astype(np.float64) - before)
    assert error.max() <= s_eff * (0.5 + 2 * 128 * divisor * EPS32) + 2 * EPS32 * np.abs(before).max()


def test_better_error_falls_as_divisor_grows():
    x, w, b, scales = in_range_case()
    mean_errors = []
    for divisor in (1, 4, 64, 2025):
        got = run_op(x, w, b, QuantSpec("better", divisor=divisor), scales)
        mean_errors.append(float((got.after.double() - got.before.double()).abs().mean()))
    print("mean |after - before| for divisors 1, 4, 64, 2025:", mean_errors)
    assert all(finer < coarser for coarser, finer in zip(mean_errors, mean_errors[1:]))
    # With divisor 1 the float simulation is the same-scale one.
    same = run_op(x, w, b, QuantSpec("same"), scales)
    assert mean_errors[0] == float((same.after.double() - same.before.double()).abs().mean())


def out_of_range_case():
    """y from about -0.28 (SiLU's minimum) to about 50 with s_y = 1e-3: far beyond +-128 codes."""
    x = torch.linspace(-5.0, 50.0, 221).reshape(1, 221, 1).repeat(1, 1, 2)
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 1.0]])
    b = torch.zeros(2)
    return x, w, b, LayerScales(input=50.0 / 127, output=1e-3, weight=1.0 / 127, bias=1.0)


# 2.5: a non-integral divisor puts 127 * divisor between two integers; codes must stay integers.
@pytest.mark.parametrize("divisor", [1, 4, 2.5, 2025])
def test_better_clamp_range_keeps_the_int8_real_range(divisor):
    x, w, b, scales = out_of_range_case()
    got = run_op(x, w, b, QuantSpec("better", divisor=divisor, clamp="range"), scales)
    lo, hi = -floor(-INT8_LO * divisor), floor(INT8_HI * divisor)  # the integers inside the range
    codes = as_codes(got.codes)
    unclamped = ref_half_away(got.before.numpy() / f32(scales.output / divisor))
    assert np.array_equal(codes, np.clip(unclamped, lo, hi))
    assert codes.max() == hi and codes.min() == lo
    assert np.array_equal(got.clamped.numpy(), (unclamped < lo) | (unclamped > hi))


@pytest.mark.parametrize("divisor", [1, 4, 2.5, 2025])
def test_better_clamp_none_does_not_clamp(divisor):
    x, w, b, scales = out_of_range_case()
    got = run_op(x, w, b, QuantSpec("better", divisor=divisor, clamp="none"), scales)
    codes = as_codes(got.codes)
    assert np.array_equal(codes, ref_half_away(got.before.numpy() / f32(scales.output / divisor)))
    assert codes.max() > INT8_HI * divisor and codes.min() < INT8_LO * divisor
    assert not got.clamped.any()


def test_same_clamps_to_int8_range():
    x, w, b, scales = out_of_range_case()
    got = run_op(x, w, b, QuantSpec("same", divisor=4, clamp="none"), scales)
    codes = as_codes(got.codes)
    unclamped = ref_half_away(got.before.numpy() / f32(scales.output))
    assert np.array_equal(codes, np.clip(unclamped, INT8_LO, INT8_HI))
    assert codes.max() == INT8_HI and codes.min() == INT8_LO


# The kernel's scales: int8's and `better`'s code ranges, calibration-like scales, the ends of the
# kernel's SCALE_RANGE, and a scale whose mantissa is all ones.
BOUND_CASES = [
    (scale, code_range, rounding)
    for scale in (3.7 / 127, 0.0123, 1.0, 2.0**-100, 2.0**100, float(np.nextafter(f32(2), f32(0))) * 2.0**-9)
    for code_range in ((INT8_LO, INT8_HI), (-128 * 2025, 127 * 2025), (-floor(128 * 2.5), floor(127 * 2.5)))
    for rounding in ("half_away", "half_even")
]


@pytest.mark.parametrize("scale, code_range, rounding", BOUND_CASES)
def test_value_bounds_are_the_last_values_inside_the_code_range(scale, code_range, rounding):
    """A is the smallest fp32 value whose code reaches lo and B the largest whose code stays at or
    below hi, so that (codes being monotone) clamping the value to [A, B] clamps its code to the
    range, and a code was clamped exactly where the value lies outside [A, B]: checked on the
    bounds' neighbours and on values across and beyond the range, infinities included."""
    lo, hi = code_range
    bounds = value_bounds(scale, code_range, rounding)
    reference = ref_half_away if rounding == "half_away" else ref_half_even

    def code(values):
        return reference(np.asarray(values, dtype=f32) / f32(scale))

    A, B = f32(bounds[0]), f32(bounds[1])
    assert code(A) >= lo > code(np.nextafter(A, f32(-np.inf)))
    assert code(B) <= hi < code(np.nextafter(B, f32(np.inf)))
    rng = np.random.default_rng(0)
    around = np.concatenate([A + np.arange(-40, 41) * np.spacing(A), B + np.arange(-40, 41) * np.spacing(B)])
    values = np.concatenate([around, rng.uniform(2 * lo, 2 * hi, 10_000) * scale, [np.inf, -np.inf, 0.0, -0.0]]).astype(f32)
    with np.errstate(over="ignore"):
        assert np.array_equal(code(np.clip(values, A, B)), np.clip(code(values), lo, hi))
        assert np.array_equal((values < A) | (values > B), (code(values) < lo) | (code(values) > hi))


def every_value_of(dtype: torch.dtype) -> np.ndarray:
    """All 2**16 values of fp16 or bf16 (infinities and NaNs included), as fp32."""
    return torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(dtype).float().numpy()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("scale", [3.7 / 127, 0.0123, 1.0, 2.0**-20, 2.0**-27, 2.0**-100, 300.0, 600.0, 2.0**100])
def test_value_bounds_in_a_narrow_format_clamp_its_every_value_as_the_codes_clamp(dtype, scale):
    """Clamping an fp16 or bf16 input to value_bounds_in's ends gives the clamped code for every
    value of the format (the fused kernel clamps inputs as loaded); None exactly where no value
    of the format has the range's low or high code, so that no pair of ends could."""
    lo, hi = INT8_LO, INT8_HI
    values = every_value_of(dtype)
    code = lambda t: ref_half_away(t / f32(scale))
    ends = value_bounds_in(value_bounds(scale, (lo, hi), "half_away"), dtype, scale, (lo, hi), "half_away")
    with np.errstate(over="ignore", invalid="ignore"):
        codes = code(values)
        if ends is None:
            assert not ((codes == lo).any() and (codes == hi).any())
            return
        A, B = f32(ends[0]), f32(ends[1])
        assert {A, B} <= set(values.tolist())
        assert np.array_equal(code(np.clip(values, A, B)), np.clip(codes, lo, hi), equal_nan=True)


# ---------------------------------------------------------------- the fused kernel's reciprocal pair


def fraction_fp32(value: Fraction) -> np.float32:
    """value rounded to the nearest fp32 value, ties to even (for values in fp32's normal range)."""
    f = f32(float(value))
    candidates = (np.nextafter(f, f32(-np.inf)), f, np.nextafter(f, f32(np.inf)))
    return min(candidates, key=lambda c: (abs(Fraction(float(c)) - value), int(np.array(c).view(np.uint32)) & 1))


def pair_code(t: float, pair, rounding) -> float:
    """The code of RN(t * r_hi + RN(t * r_lo)), the fused kernel's two FMAs, in exact arithmetic."""
    t, hi, lo = (Fraction(float(v)) for v in (t, *pair))
    low = Fraction(float(fraction_fp32(t * lo)))
    q = fraction_fp32(t * hi + low)
    return float((ref_half_away if rounding == "half_away" else ref_half_even)(q))


def near_ties(scale, ks, ulps):
    """fp32 values within `ulps` ulps of (k + 1/2) * scale for each k of ks."""
    centres = ((np.asarray(ks, dtype=np.float64) + 0.5) * np.float64(f32(scale))).astype(f32)
    return np.concatenate([centres + i * np.spacing(centres) for i in range(-ulps, ulps + 1)])


def test_reciprocal_pair_is_the_reciprocal_to_47_bits():
    """r_hi is the largest fp32 value at most 1/s, r_lo >= 0 the rest rounded: within 2**-47 of 1/s."""
    for scale in (3.7 / 127, 0.0123, 1.0, 0.1, 2.0**-100, 2.0**100, float(np.nextafter(f32(2), f32(0))), 1 / 3):
        s = Fraction(float(f32(scale)))
        hi, lo = reciprocal_pair(scale)
        assert f32(hi) == hi and f32(lo) == lo and lo >= 0
        assert Fraction(hi) <= 1 / s < Fraction(float(np.nextafter(f32(hi), f32(np.inf))))
        assert abs(Fraction(hi) + Fraction(lo) - 1 / s) <= Fraction(2) ** -47 / s


PAIR_CASES = [
    (3.7 / 127, (INT8_LO, INT8_HI), "half_away"),
    (0.0123, (INT8_LO, INT8_HI), "half_even"),
    (float(np.nextafter(f32(2), f32(0))) * 2.0**-9, (INT8_LO, INT8_HI), "half_away"),
    (0.3 / 127, (-128 * 16, 127 * 16), "half_away"),
    (0.021, (-128 * 2025, 127 * 2025), "half_away"),
]


@pytest.mark.parametrize("scale, code_range, rounding", PAIR_CASES)
def test_pair_codes_match_division_where_the_check_allows_them(scale, code_range, rounding):
    """Where pair_codes_are_exact says so, the codes of the two FMAs (computed here with Fractions)
    are the codes of IEEE's t / s (numpy's fp32 division) around rounding ties, where they could
    differ, and (int8's range) on every fp16 value inside the value bounds."""
    assert pair_codes_are_exact(scale, code_range, rounding)
    lo, hi = code_range
    ks = np.arange(lo - 1, hi + 1)
    if len(ks) > 600:
        ks = np.random.default_rng(0).choice(ks, 600, replace=False)
    values = near_ties(scale, ks, 6)
    if code_range == (INT8_LO, INT8_HI):
        fp16 = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(f32)
        bounds = value_bounds(scale, code_range, rounding)
        values = np.concatenate([values, fp16[(fp16 >= bounds[0]) & (fp16 <= bounds[1]) & (fp16 != 0)]])
    reference = ref_half_away if rounding == "half_away" else ref_half_even
    want = reference(values / f32(scale))
    pair = reciprocal_pair(scale)
    got = np.array([pair_code(t, pair, rounding) for t in values])
    assert np.array_equal(got, want)


def test_pair_check_refuses_a_scale_with_a_value_the_pair_gets_wrong():
    """1/s to 2**-47 is not always enough: for this scale (better at divisor 2025) the quotient of
    13104.849609375 lies 2**-35 / s below a rounding decision, closer than the pair's error, and
    the pair's code is one more than division's. The check says no."""
    scale, code_range, t = 0.056500669568777084, (-128 * 2025, 127 * 2025), 13104.849609375
    assert ref_half_away(f32(t) / f32(scale)) == 231941
    assert pair_code(t, reciprocal_pair(scale), "half_away") == 231942
    assert not pair_codes_are_exact(scale, code_range, "half_away")


def test_pair_check_refuses_a_plain_reciprocal(monkeypatch):
    """With RN(1/s) alone (r_lo = 0) codes differ at many ties: the check must see that, and the
    values it would have let through do differ."""
    scale, code_range = 3.7 / 127, (INT8_LO, INT8_HI)
    plain = (float(f32(1) / f32(scale)), 0.0)
    values = near_ties(scale, range(INT8_LO - 1, INT8_HI + 1), 2)
    differing = [t for t in values if pair_code(t, plain, "half_away") != ref_half_away(t / f32(scale))]
    assert differing
    monkeypatch.setattr(quant, "reciprocal_pair", lambda s: plain)
    assert not pair_codes_are_exact(scale, code_range, "half_away")


def test_silu_stays_above_its_floor():
    """SILU_FLOOR lies below every fp32 SiLU output: checked on every fp32 v in [-20, -1/2]; for
    v in [-1/2, 0], silu(v) >= v / 2 >= -1/4, and below -20 |silu(v)| < 20 e**-20."""
    assert SILU_FLOOR < -0.2784645427610738
    start, stop = (np.array(v, dtype=f32).view(np.int32) for v in (-0.5, -20.0))
    for first in range(int(start), int(stop) + 1, 2**23):
        bits = torch.arange(first, min(first + 2**23, int(stop) + 1), dtype=torch.int32)
        assert silu(bits.view(torch.float32)).min().item() > SILU_FLOOR


# ---------------------------------------------------------------- rounding


TIE_SCALE = 2.0**-7  # a power of two: t / scale is exact, so (k + 0.5) * scale is an exact tie


@pytest.mark.parametrize("k", range(-6, 6))
def test_quantize_codes_on_exact_ties_and_their_neighbours(k):
    tie = f32((k + 0.5) * TIE_SCALE)
    below, above = np.nextafter(tie, f32(-np.inf)), np.nextafter(tie, f32(np.inf))
    t = torch.from_numpy(np.array([tie, below, above], dtype=f32))
    doubled = 2 * k + 1  # tie = doubled / 2
    expected = {
        "half_away": [fraction_half_away(Fraction(doubled, 2)), (doubled - 1) // 2, (doubled + 1) // 2],
        "half_even": [fraction_half_even(Fraction(doubled, 2)), (doubled - 1) // 2, (doubled + 1) // 2],
    }
    for rounding, codes in expected.items():
        got, clamped = quantize_codes(t, TIE_SCALE, rounding, None)
        assert got.tolist() == codes, rounding
        assert not clamped.any()


def test_rounding_examples():
    values = [2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 0.49999997, -0.49999997, 1.5, 8388607.5, -8388607.5]
    t = torch.tensor(values, dtype=torch.float32)
    exact = [Fraction(float(f32(v))) for v in values]
    assert round_half_away(t).tolist() == [fraction_half_away(v) for v in exact]
    assert round_half_even(t).tolist() == [fraction_half_even(v) for v in exact]
    # The textbook cases, spelled out.
    assert round_half_away(t)[:4].tolist() == [3, -3, 4, -4]
    assert round_half_even(t)[:4].tolist() == [2, -2, 4, -4]
    assert round_half_away(t)[6:8].tolist() == [0, 0] and round_half_even(t)[6:8].tolist() == [0, 0]


@settings(max_examples=300, deadline=None, database=None)
@given(st.floats(min_value=-(2.0**25), max_value=2.0**25, width=32))
def test_rounding_matches_exact_rational_rounding(value):
    t = torch.tensor([value], dtype=torch.float32)
    exact = Fraction(value)
    assert round_half_away(t).item() == fraction_half_away(exact)
    assert round_half_even(t).item() == fraction_half_even(exact)


def tie_case(x_values):
    """One position per channel, conv = identity on the last tap, zero bias.

    With unit weight and bias scales the weight codes are [0, 0, 0, 1] and v = s_x * X exactly in
    every mode (products of powers of two and integers), so y is the same fp32 number in every mode.
    """
    channels = len(x_values)
    x = torch.tensor(x_values, dtype=torch.float32).reshape(1, 1, channels)
    w = torch.tensor([[0.0, 0.0, 0.0, 1.0]] * channels)
    return x, w, torch.zeros(channels)


def tie_scales(input_scale, output_scale):
    return LayerScales(input_scale, output_scale, weight=1.0, bias=1.0)


def test_output_rounding_on_positive_ties_through_conv_silu():
    # For v >= 20, exp(-v) < 2^-25, so 1 + exp(-v) rounds to 1 and y = v exactly.
    x, w, b = tie_case([20.0, 28.0, 36.0, 44.0, 19.0, 21.0])
    ratios = [Fraction(v, 8) for v in (20, 28, 36, 44, 19, 21)]  # 2.5, 3.5, 4.5, 5.5, 2.375, 2.625
    half_away = [fraction_half_away(r) for r in ratios]
    half_even = [fraction_half_even(r) for r in ratios]
    assert half_away[:4] == [3, 4, 5, 6] and half_even[:4] == [2, 4, 4, 6]

    def codes(spec, s_y=8.0):
        got = run_op(x, w, b, spec, tie_scales(1.0, s_y))
        assert got.before.flatten().tolist() == [20.0, 28.0, 36.0, 44.0, 19.0, 21.0]
        return got.codes.flatten().tolist()

    assert codes(QuantSpec("same", rounding="half_away")) == half_away
    assert codes(QuantSpec("same", rounding="half_even")) == half_even
    assert codes(QuantSpec("better", divisor=2, rounding="half_away"), s_y=16.0) == half_away
    assert codes(QuantSpec("better", divisor=2, rounding="half_even"), s_y=16.0) == half_even
    assert codes(QuantSpec("int8", rounding="half_away")) == half_away
    assert codes(QuantSpec("int8", rounding="half_even")) == half_away


def exact_scale_for_tie(y: float, odd: int):
    """s with fp32(s) == 2|y| / odd exactly, so y / s is exactly -odd/2 for negative y; else None."""
    wanted = 2 * abs(Fraction(y)) / odd
    s = f32(float(wanted))
    return float(s) if Fraction(float(s)) == wanted else None


@pytest.mark.parametrize("odd", [1, 5, 7])
def test_output_rounding_on_negative_ties_through_conv_silu(odd):
    # X = -1..-64 with s_x = 1/4: v = X / 4 in [-16, -0.25], y = SiLU(v) in (-0.28, 0).
    x, w, b = tie_case([-0.25 * n for n in range(1, 65)])
    y = run_op(x, w, b, QuantSpec("same"), tie_scales(0.25, 1.0)).before.flatten().tolist()
    candidates = [(i, exact_scale_for_tie(v, odd)) for i, v in enumerate(y)]
    channel, s_eff = next((i, s) for i, s in candidates if s is not None)
    tie = Fraction(-odd, 2)

    def code(spec, s_y):
        got = run_op(x, w, b, spec, tie_scales(0.25, s_y))
        assert got.before.flatten()[channel].item() == y[channel]
        return got.codes.flatten()[channel].item()

    assert code(QuantSpec("same", rounding="half_away"), s_eff) == fraction_half_away(tie)
    assert code(QuantSpec("same", rounding="half_even"), s_eff) == fraction_half_even(tie)
    assert code(QuantSpec("better", divisor=4, rounding="half_even", clamp="none"), 4 * s_eff) == fraction_half_even(tie)
    assert code(QuantSpec("int8", rounding="half_even"), s_eff) == fraction_half_away(tie)


def test_int8_output_rounding_ignores_the_rounding_argument():
    assert QuantSpec("int8", rounding="half_even").output_rounding == "half_away"
    assert QuantSpec("same", rounding="half_even").output_rounding == "half_even"


# ---------------------------------------------------------------- fp


@pytest.mark.parametrize("x_scale", [1e-2, 1.0, 30.0])
def test_fp_mode_is_float64_conv_silu_within_fp32_roundoff(x_scale):
    x, w, b, scales = random_case(40, 3, 80, 24, x_scale)
    got = run_op(x, w, b, QuantSpec("fp"), None)
    y_ref = ref_conv_silu_fp64(x.double(), w.double(), b.double())
    # Here the operands are used as they are: no dequantizing roundings, so the bound is looser
    # than needed by 2 * EPS32 * terms.
    bound = fp32_conv_silu_bound(ref_abs_terms_fp64(x.double(), w.double(), b.double()), y_ref)
    assert torch.all((got.out.double() - y_ref).abs() <= bound)
    assert got.codes is None and got.clamped is None
    assert torch.equal(got.before, got.after) and torch.equal(got.out, got.before)


# ---------------------------------------------------------------- left context


MODE_SPECS = [
    QuantSpec("fp"),
    QuantSpec("int8"),
    QuantSpec("same"),
    QuantSpec("same", rounding="half_even"),
    QuantSpec("better", divisor=2025),
    QuantSpec("better", divisor=16, clamp="none"),
]


@pytest.mark.parametrize("spec", MODE_SPECS, ids=lambda s: f"{s.mode}-{s.divisor}-{s.rounding}-{s.clamp}")
@pytest.mark.parametrize("split", [1, 2, 3, 17])
def test_left_context_continues_a_sequence_exactly(spec, split):
    x, w, b, scales = random_case(50, 2, 30, 8, 1.0)
    whole = run_op(x, w, b, spec, scales)
    first = run_op(x[:, :split], w, b, spec, scales)
    # The K-1 inputs before the second piece: zeros before the sequence start, then x.
    context = torch.cat([torch.zeros(2, K - 1, 8), x[:, :split]], dim=1)[:, -(K - 1) :]
    second = run_op(x[:, split:], w, b, spec, scales, left_context=context)
    assert torch.equal(torch.cat([first.out, second.out], dim=1), whole.out)
    if spec.quantized:
        assert torch.equal(torch.cat([first.codes, second.codes], dim=1), whole.codes)


# ---------------------------------------------------------------- NaN inputs


@pytest.mark.parametrize("spec", MODE_SPECS, ids=lambda s: f"{s.mode}-{s.divisor}-{s.rounding}-{s.clamp}")
def test_nan_input_poisons_exactly_the_windows_that_contain_it(spec):
    x, w, b, scales = random_case(60, 2, 12, 4, 1.0)
    x[1, 5, 2] = float("nan")
    got = run_op(x, w, b, spec, scales)
    expected = torch.zeros(x.shape, dtype=torch.bool)
    expected[1, 5 : 5 + K, 2] = True
    assert torch.equal(torch.isnan(got.out), expected)
    assert torch.isfinite(got.out[~expected]).all()
    if spec.quantized:
        assert torch.equal(torch.isnan(got.codes), expected)


# ---------------------------------------------------------------- QuantSpec and format_divisor


@pytest.mark.parametrize(
    "argument, value",
    [
        ("mode", "int4"),
        ("mode", "INT8"),
        ("rounding", "nearest"),
        ("clamp", "saturate"),
        ("divisor", 0),
        ("divisor", -1),
        ("divisor", float("nan")),
        ("divisor", float("inf")),
        ("divisor", float("-inf")),
        ("divisor", "2025"),
    ],
)
def test_quant_spec_rejects_bad_values(argument, value):
    with pytest.raises(ArgumentError) as error:
        QuantSpec(**{"mode": "better", argument: value})
    assert error.value.argument == argument
    message = str(error.value)
    assert argument in message and str(value) in message
    assert "\n" not in message


def test_quant_spec_accepts_every_documented_value():
    for mode in ("fp", "int8", "same", "better"):
        for rounding in ("half_away", "half_even"):
            for clamp in ("range", "none"):
                QuantSpec(mode, divisor=2.5, rounding=rounding, clamp=clamp)


def test_quantized_modes_require_scales():
    x, w, b, _ = random_case(70, 1, 4, 2, 1.0)
    with pytest.raises(ArgumentError):
        conv_silu(x, w, b, QuantSpec("int8"), None)


@pytest.mark.parametrize("divisor, text", [(2025.0, "2025"), (2.5, "2.5"), (16, "16"), (0.1, "0.1"), (2025, "2025")])
def test_format_divisor(divisor, text):
    assert format_divisor(divisor) == text


# --- the float simulation in float16 and bfloat16 (asic_dtype) -------------------------------------


def round_to_format(values: np.ndarray, fmt: str) -> np.ndarray:
    """Float64 values rounded to nearest-even in `fmt`: numpy's own float16; bfloat16 by keeping 8
    significant bits (the values here are normal or zero)."""
    if fmt == "float16":
        return values.astype(np.float16).astype(np.float64)
    mantissa, exponent = np.frexp(values)
    return np.ldexp(np.rint(np.ldexp(mantissa, 8)), exponent - 8)


def emulated_float_sim(X, W, Bq, s_x, s_w, s_b, s_eff, fmt):
    """SPEC's float simulation with every operand, product, sum, exp, 1 + exp and division rounded to
    `fmt`, in float64 (exact for every single operation on these formats) and numpy."""
    R = functools.partial(round_to_format, fmt=fmt)
    scale = lambda s: R(np.float64(np.float32(s)))  # noqa: E731 - stored as fp32, then held in fmt
    xs, ws, bs = R(X * scale(s_x)), R(W * scale(s_w)), R(Bq * scale(s_b))
    length = X.shape[1] - K + 1
    out = np.broadcast_to(bs, (X.shape[0], length, X.shape[2]))
    for k in range(K):
        out = R(out + R(ws[:, k] * xs[:, k : k + length]))
    y = R(out / R(1 + R(np.exp(-out))))
    q = R(y / scale(s_eff))
    codes = np.clip(np.sign(q) * np.floor(np.abs(q) + 0.5), INT8_LO, INT8_HI)
    return y, codes


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_asic_dtype_rounds_every_step_to_its_format(fmt):
    gen = np.random.default_rng(7)
    batch, length, channels = 4, 300, 48
    X = gen.integers(-128, 128, (batch, length + K - 1, channels)).astype(np.float64)
    W = gen.integers(-128, 128, (channels, K)).astype(np.float64)
    Bq = gen.integers(-128, 128, channels).astype(np.float64)
    # Powers of two for the operands' scales, so that x = X * s_x quantizes back to X exactly.
    scales = LayerScales(input=2.0**-7, output=float(np.float32(0.0173)), weight=2.0**-9, bias=2.0**-8)
    spec = QuantSpec("same", asic_dtype=fmt)
    seen = {}

    def observe(before, after, codes, clamped):
        seen.update(before=before.numpy().astype(np.float64), codes=codes.numpy())

    x = torch.tensor(X[:, K - 1 :] * scales.input, dtype=torch.float32)
    left = torch.tensor(X[:, : K - 1] * scales.input, dtype=torch.float32)
    conv_silu(x, torch.tensor(W * scales.weight, dtype=torch.float32), torch.tensor(Bq * scales.bias, dtype=torch.float32),
              spec, scales, observe, left_context=left)
    y, codes = emulated_float_sim(X, W, Bq, scales.input, scales.weight, scales.bias, scales.output, fmt)

    # torch's exp is fp32's (within an ulp of the true exp) before the rounding to fmt; where that
    # ulp straddles a rounding boundary of fmt (about 2^-13 of values for float16, 2^-16 for
    # bfloat16) y differs by one ulp of fmt, and a code at a tie by one.
    assert np.mean(seen["before"] == y) > 0.999
    assert np.abs(seen["codes"] - codes).max() <= 1 and np.mean(seen["codes"] == codes) > 0.999
    # Not the fp32 path: the format shows in the values.
    fp32 = {}
    conv_silu(x, torch.tensor(W * scales.weight, dtype=torch.float32), torch.tensor(Bq * scales.bias, dtype=torch.float32),
              QuantSpec("same"), scales, lambda b, a, c, m: fp32.update(before=b.numpy()), left_context=left)
    assert np.mean(fp32["before"] != seen["before"]) > 0.3
    assert np.array_equal(round_to_format(seen["before"], fmt), seen["before"])  # before_quant holds fmt values


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_asic_dtype_on_cuda_computes_what_the_cpu_computes(fmt):
    """The fused kernel is float32 only: a float16/bfloat16 simulation on CUDA takes the PyTorch
    path, which rounds each step as the CPU does."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 256, 64, generator=gen)
    weight, bias = 0.3 * torch.randn(64, K, generator=gen), 0.1 * torch.randn(64, generator=gen)
    scales = LayerScales(input=float(x.abs().max()) / 127, output=0.01, weight=float(weight.abs().max()) / 127,
                         bias=float(bias.abs().max()) / 127)
    spec = QuantSpec("same", asic_dtype=fmt)
    seen = {}

    def observer(device):
        return lambda before, after, codes, clamped: seen.update({device: (before.cpu(), codes.cpu())})

    cpu = conv_silu(x, weight, bias, spec, scales, observer("cpu"))
    gpu = conv_silu(x.cuda(), weight.cuda(), bias.cuda(), spec, scales, observer("cuda")).cpu()
    # Every +, * and / of a 16-bit format is correctly rounded on both devices; only exp (fp32's,
    # within an ulp, before the rounding to fmt) may differ, moving y by one ulp of fmt where that ulp
    # straddles a rounding boundary (about 2^-13 of values) and a code at a tie by one.
    (cpu_before, cpu_codes), (gpu_before, gpu_codes) = seen["cpu"], seen["cuda"]
    assert torch.mean((cpu_before == gpu_before).float()) > 0.999
    assert (cpu_codes - gpu_codes).abs().max() <= 1 and torch.mean((cpu_codes == gpu_codes).float()) > 0.999
    assert torch.mean((gpu == cpu).float()) > 0.999


# --- kernel_math=fast: the INT8 kernel as nvcc -O3 --use_fast_math builds it -----------------------

FLT_MIN = 2.0**-126


def fraction_to_fp32(value: Fraction) -> float:
    """The fp32 value nearest to `value`, ties to even: one rounding of the exact value."""
    guess = np.float32(float(value))
    candidates = [np.nextafter(guess, f32(-np.inf)), guess, np.nextafter(guess, f32(np.inf))]
    def distance(c):
        return abs(Fraction(float(c)) - value), int(np.float32(c).view(np.uint32)) & 1
    return float(min(candidates, key=distance))


def test_fma_rounds_once():
    # 1 + 2**-11 + 2**-24 is the midpoint between two fp32 neighbours; the exact sum lies 2**-60
    # above (below) it, so one rounding goes up (down), where rounding through float64 would land
    # on the midpoint and round to even both times.
    a = b = 1 + 2.0**-12
    for tiny, expected in ((2.0**-60, 1 + 2.0**-11 + 2.0**-23), (-(2.0**-60), 1 + 2.0**-11)):
        c = torch.tensor([tiny], dtype=torch.float32)
        assert fma_fp32(torch.tensor([a]), torch.tensor([b]), c).item() == expected
    gen = np.random.default_rng(11)
    n = 20000
    a = (gen.standard_normal(n) * 10).astype(f32)
    b = gen.standard_normal(n).astype(f32)
    c = (gen.standard_normal(n) * 3).astype(f32)
    c[: n // 2] = (-(a[: n // 2].astype(np.float64) * b[: n // 2])).astype(f32) * f32(1 + 2.0**-20)  # cancellation
    got = fma_fp32(torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(c)).numpy()
    expected = [fraction_to_fp32(Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))) for x, y, z in zip(a, b, c)]
    assert np.array_equal(got, np.array(expected, dtype=f32))


def fast_reference(X, W, Bq, scales: LayerScales):
    """The fast-math epilogue step by step in numpy and Fractions: the exact FMA, then fp32 numpy
    operations (no contraction) with ex2.approx and rcp.approx taken as numpy's exp2 and a
    correctly rounded reciprocal, subnormal results flushed. Returns (v, y, codes)."""
    flush = lambda t: np.where(np.abs(t) < FLT_MIN, t * f32(0), t).astype(f32)  # noqa: E731
    length = X.shape[1] - K + 1
    acc = np.zeros((X.shape[0], length, X.shape[2]), dtype=np.int64)
    for k in range(K):
        acc += W[:, k].astype(np.int64) * X[:, k : k + length].astype(np.int64)
    acc_scale = f32(scales.weight) * f32(scales.input)
    bias_term = flush(f32(scales.bias) * Bq.astype(f32))
    exact = np.vectorize(lambda a, b: fraction_to_fp32(Fraction(float(acc_scale)) * int(a) + Fraction(float(b))), otypes=[np.float64])
    v = flush(exact(acc, np.broadcast_to(bias_term, acc.shape)).astype(f32))
    with np.errstate(over="ignore"):
        e = flush(np.exp2(flush(v * f32(-LOG2E))))
    denominator = flush(f32(1) + e)
    y = flush(v * flush(f32(1) / denominator))
    q = flush(y * flush(f32(1) / f32(scales.output)))
    return v, y, q, np.clip(ref_half_away(q), INT8_LO, INT8_HI)


def test_kernel_math_fast_against_a_step_by_step_reference():
    gen = np.random.default_rng(5)
    batch, length, channels = 2, 200, 64
    X = gen.integers(-128, 128, (batch, length + K - 1, channels))
    W = gen.integers(-128, 128, (channels, K))
    Bq = gen.integers(-128, 128, channels)
    scales = LayerScales(input=2.0**-6, output=float(f32(0.0137)), weight=2.0**-10, bias=2.0**-9)
    seen = {}
    x = torch.tensor(X[:, K - 1 :] * scales.input, dtype=torch.float32)
    left = torch.tensor(X[:, : K - 1] * scales.input, dtype=torch.float32)
    w = torch.tensor(W * scales.weight, dtype=torch.float32)
    b = torch.tensor(Bq * scales.bias, dtype=torch.float32)
    for math_ in ("fast", "exact"):
        conv_silu(x, w, b, QuantSpec("int8", kernel_math=math_), scales,
                  lambda before, after, codes, clamped, m=math_: seen.update({m: (before.numpy(), codes.numpy())}),
                  left_context=left)
    v_ref, y_ref, q_ref, codes_ref = fast_reference(X, W, Bq, scales)
    y, codes = seen["fast"]
    # Every step but exp2 is one correctly rounded fp32 operation on both sides; torch's and numpy's
    # exp2 may differ in the last bit, which the sum 1 + e, the reciprocal and the product each
    # round again: y moves by up to ~3 ulps, and a code only at a tie.
    assert np.all(np.abs(y - y_ref) <= 4 * np.spacing(np.abs(y_ref)))
    # The two exp2 agree on most inputs: 97.8% measured on the CPU box, 91.5% on the H200 machine's
    # CPU (another torch build); a wrong formula would agree almost nowhere.
    assert np.mean(y == y_ref) > 0.5
    ambiguous = near_tie(q_ref) & (y != y_ref)
    assert np.array_equal(codes[~ambiguous], codes_ref[~ambiguous])
    # The fast epilogue is another arithmetic: its y differs from exact's at many positions.
    assert np.mean(seen["exact"][0] != y) > 0.1


def test_operand_rounding_half_even_rounds_weight_and_bias_ties_to_even_and_leaves_the_input():
    s = 2.0**-4
    ties = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 3.25]) * s  # exact multiples of s/2
    X, W, Bq = quantize_operands(ties[None, :, None].expand(1, 6, 1), ties[:, None], ties, LayerScales(s, s, s, s), "half_even")
    assert W[:, 0].tolist() == [0.0, 2.0, 2.0, -0.0, -2.0, 3.0] and Bq.tolist() == W[:, 0].tolist()
    assert X[0, :, 0].tolist() == [1.0, 2.0, 3.0, -1.0, -3.0, 3.0]  # the kernel's roundf
    # A conv whose weights sit on ties computes with half_even what it computes, half_away, with
    # the weights rounded to even beforehand.
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(2, 50, 6, generator=gen)
    weight = torch.randint(-20, 20, (6, 4), generator=gen) * s + s / 2
    bias = torch.randint(-20, 20, (6,), generator=gen) * s + s / 2
    scales = LayerScales(float(x.abs().max()) / 127, 0.01, s, s)
    evened = {"w": torch.round(weight / s) * s, "b": torch.round(bias / s) * s}
    for mode in ("int8", "same"):
        spec = QuantSpec(mode, operand_rounding="half_even")
        assert torch.equal(conv_silu(x, weight, bias, spec, scales), conv_silu(x, evened["w"], evened["b"], QuantSpec(mode), scales))
        assert not torch.equal(conv_silu(x, weight, bias, QuantSpec(mode), scales), conv_silu(x, weight, bias, spec, scales))
