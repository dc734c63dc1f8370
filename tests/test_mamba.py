"""MambaLM itself: the selective scan against a float64 recurrence, incremental decoding, padding,
half precision, quantized modes and the recorder call.

Tolerances: the fp32 comparisons between two ways of computing the same thing (step by step vs.
the whole sequence, padded vs. unpadded rows) differ only in reduction order and blocking of the
matrix products, a few float32 ulps per op; they use the same scale-free metric as
test_loading.py, max|a-b|/max|b| < 1e-5 (about 100 ulps of the largest value).
"""

from __future__ import annotations

import os
from dataclasses import astuple

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from helpers_models import TOKENIZER_VOCAB, make_checkpoint  # noqa: E402
from lm_eval_floatsim.errors import ArgumentError  # noqa: E402
from lm_eval_floatsim.loading import load_pretrained  # noqa: E402
from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402
from lm_eval_floatsim.quant import LayerScales, QuantSpec, SegmentedScales  # noqa: E402
from lm_eval_floatsim import selective_scan as selective_scan_module  # noqa: E402
from lm_eval_floatsim.selective_scan import selective_scan  # noqa: E402

PARITY = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt"), "mamba_ssm", num_hidden_layers=3, seed=5)
    return load_pretrained(folder)


def random_ids(batch: int, length: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, TOKENIZER_VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# --- the selective scan ----------------------------------------------------------------------------


def reference_scan(u, delta, A, B, C, D, z, delta_bias, h0):
    """The recurrence as the Mamba paper writes it, one position at a time, in float64."""
    u, delta, A, B, C, D, z, delta_bias = (t.double() for t in (u, delta, A, B, C, D, z, delta_bias))
    dt = torch.nn.functional.softplus(delta + delta_bias)
    h = h0.double()
    ys = []
    for t in range(u.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1) + D * u[:, t])
    y = torch.stack(ys, dim=1) * z * torch.sigmoid(z)
    return y, h


@pytest.mark.parametrize("batch, length, with_state", [(3, 37, False), (2, 150, True), (1, 1, True)])
def test_selective_scan_matches_the_float64_recurrence(batch, length, with_state, monkeypatch):
    d_inner, d_state = 24, 8
    # Chunks of 7 positions: the state must carry across chunk boundaries, also into a short last
    # chunk (37 = 5 x 7 + 2); length 1 is a decoding step.
    monkeypatch.setattr(selective_scan_module, "CHUNK_ELEMENTS", 7 * batch * d_inner * d_state)
    g = torch.Generator().manual_seed(batch * 1000 + length)
    u, delta, z = (torch.randn(batch, length, d_inner, generator=g) for _ in range(3))
    B, C = (torch.randn(batch, length, d_state, generator=g) for _ in range(2))
    A = -torch.exp(torch.randn(d_inner, d_state, generator=g))
    D, delta_bias = torch.randn(d_inner, generator=g), torch.randn(d_inner, generator=g)
    h0 = torch.randn(batch, d_inner, d_state, generator=g) if with_state else torch.zeros(batch, d_inner, d_state)
    expected_y, expected_h = reference_scan(u, delta, A, B, C, D, z, delta_bias, h0)
    y, h = selective_scan(u, delta, A, B, C, D, z, delta_bias, h0=h0 if with_state else None, return_last_state=True)
    # fp32 against float64: each output sums d_state products after up to `length` decays; errors
    # stay at a few ulps of the largest output, far below what a wrong term would cause.
    assert y.shape == (batch, length, d_inner) and y.dtype == torch.float32
    assert relative_error(y, expected_y) < PARITY
    assert relative_error(h, expected_h) < PARITY


# --- incremental decoding --------------------------------------------------------------------------


@torch.no_grad()
def decoded(model, ids: torch.Tensor, prompt: int) -> torch.Tensor:
    """The logits of `ids` from a forward over the first `prompt` positions that leaves its state
    behind, then one step per further position, carrying the state."""
    state = model.allocate_state(ids.shape[0])
    prefix = [model(ids[:, :prompt], state=state)] if prompt else []
    steps = [model(ids[:, t : t + 1], state=state) for t in range(prompt, ids.shape[1])]
    return torch.cat(prefix + steps, dim=1)


def test_step_by_step_forward_with_state_equals_the_full_forward(model):
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids)
    assert relative_error(decoded(model, ids, 5), full) < PARITY


def test_step_returns_the_next_token_logits(model):
    ids = random_ids(2, 6)
    with torch.no_grad():
        full = model(ids)
        state = model.allocate_state(2)
        model(ids[:, :5], state=state)
        logits = model.step(ids[:, 5], state)
    assert logits.shape == (2, model.config.padded_vocab_size)
    assert relative_error(logits, full[:, -1]) < PARITY


def test_greedy_generation_follows_the_full_forward_argmax(model):
    prompt = random_ids(2, 7)
    generated = model.generate(prompt, max_new_tokens=6)
    assert generated.shape == (2, 13) and torch.equal(generated[:, :7], prompt)
    with torch.no_grad():
        full = model(generated)
    assert torch.equal(generated[:, 7:], full[:, 6:-1].argmax(-1))


def test_generation_stops_rows_at_eos(model):
    prompt = random_ids(2, 4)
    first = model.generate(prompt, max_new_tokens=1)[:, -1]
    eos = int(first[0])
    generated = model.generate(prompt, max_new_tokens=5, eos_token_id=eos)
    assert (generated[0, 4:] == eos).all()  # row 0 ends at once and is held at eos


def generation_counts(model, prompt: torch.Tensor, eos: int) -> list[int]:
    """Per block, the positions the recorder counted while `prompt` was decoded."""
    from lm_eval_floatsim.recorder import Recorder

    model.recorder = Recorder(model.config.n_layer)
    model.recorder.arm()
    try:
        model.generate(prompt, max_new_tokens=5, eos_token_id=eos)
        return [summary["count"] for summary in model.recorder.layer_summaries()]
    finally:
        model.recorder = None


def test_a_row_held_at_eos_adds_nothing_to_the_statistics(model):
    """Reference: each row decoded alone, which stops at its own eos."""
    prompt = random_ids(2, 4)
    eos = int(model.generate(prompt, max_new_tokens=1)[0, -1])
    assert eos not in model.generate(prompt[1:], max_new_tokens=5)[0, 4:].tolist()  # row 1 runs all 5 steps
    alone = [generation_counts(model, prompt[i : i + 1], eos) for i in range(2)]
    assert alone[0] == [4 * model.config.d_inner] * model.config.n_layer  # the prompt only: row 0 ends at once
    assert generation_counts(model, prompt, eos) == [a + b for a, b in zip(*alone)]


# --- left padding ----------------------------------------------------------------------------------


def left_padded(rows: list[torch.Tensor], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :], mask[i, width - len(row) :] = row, 1
    return ids, mask


def test_left_padded_rows_equal_unpadded_rows(model):
    rows = [random_ids(1, 9, seed=3)[0], random_ids(1, 4, seed=4)[0], random_ids(1, 1, seed=5)[0]]
    ids, mask = left_padded(rows, pad=7)
    with torch.no_grad():
        batched = model(ids, mask=mask)
        for i, row in enumerate(rows):
            alone = model(row[None])
            assert relative_error(batched[i, -len(row) :], alone[0]) < PARITY, i


def test_left_padded_generation_equals_unpadded_generation(model):
    rows = [random_ids(1, 8, seed=6)[0], random_ids(1, 3, seed=7)[0]]
    ids, mask = left_padded(rows)
    generated = model.generate(ids, max_new_tokens=5, mask=mask)
    for i, row in enumerate(rows):
        assert torch.equal(generated[i, ids.shape[1] :], model.generate(row[None], max_new_tokens=5)[0, len(row) :])


# --- dtypes and modes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tolerance", [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_forward_stays_close_to_float32(tmp_path, dtype, tolerance):
    # Unit roundoff: float16 2^-11 = 4.9e-4, bfloat16 2^-8 = 3.9e-3. The weights themselves are
    # rounded once and each of a few dozen ops in sequence rounds again, so logits drift by about
    # one roundoff: measured 3e-4..5e-4 (float16) and 3e-3..5e-3 (bfloat16) over three seeds; the
    # bounds leave ~10x margin. A broken half path (wrong cast, overflow, a dropped fp32 parameter)
    # is off by far more or not finite.
    folder, _ = make_checkpoint(tmp_path / "ckpt", "transformers", num_hidden_layers=3)
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = load_pretrained(folder)(ids)
        half = load_pretrained(folder, dtype=dtype)(ids)
    assert half.dtype == getattr(torch, dtype)
    assert torch.isfinite(half).all()
    assert relative_error(half, full) < tolerance


def layer_scales(model) -> list[LayerScales]:
    scales = []
    for layer in model.backbone.layers:
        conv = layer.mixer.conv1d
        w, b = conv.weight.abs().max().item() / 127, conv.bias.abs().max().item() / 127
        scales.append(LayerScales(input=0.05, output=0.02, weight=w, bias=b))
    return scales


@pytest.mark.parametrize("mode", ["int8", "same", "better"])
def test_quantized_modes_stay_near_fp(model, mode):
    ids = random_ids(2, 10)
    with torch.no_grad():
        fp = model.quantize(QuantSpec("fp"), None)(ids)
        quantized = model.quantize(QuantSpec(mode), layer_scales(model))(ids)
        model.quantize(QuantSpec("fp"), None)
    # The quantized Conv1D+SiLU changes the logits (so the mode is in effect) but only by its
    # quantization error, a small fraction of their range on this well-conditioned model.
    assert torch.isfinite(quantized).all()
    assert 0 < relative_error(quantized, fp) < 0.5


def test_quantize_requires_one_scale_per_layer(model):
    with pytest.raises(ArgumentError, match="one entry per layer"):
        model.quantize(QuantSpec("same"), layer_scales(model)[:-1])


class ValueRecorder:
    """Stands in for recorder.Recorder: keeps each block's before and after values of one forward."""

    def __init__(self):
        self.values = {}

    def layer(self, layer_idx, mask):
        def observe(before, after, codes, clamped):
            self.values[layer_idx] = (before.clone(), after.clone(), codes)

        return observe


def block_values(model, spec, scales, ids):
    recorder = ValueRecorder()
    model.quantize(spec, scales).recorder = recorder
    try:
        with torch.no_grad():
            logits = model(ids)
    finally:
        model.quantize(QuantSpec("fp"), None).recorder = None
    return logits, recorder.values


@pytest.mark.parametrize("mode", ["int8", "better"])
def test_layers_limits_the_mode_to_those_blocks(model, mode):
    ids, scales = random_ids(2, 10), layer_scales(model)
    fp_logits, fp = block_values(model, QuantSpec("fp"), None, ids)
    full_logits, full = block_values(model, QuantSpec(mode), scales, ids)
    every_logits, every = block_values(model, QuantSpec(mode, layers=(0, 1, 2)), scales, ids)
    # Every block listed is the full mode, bit for bit.
    assert torch.equal(every_logits, full_logits)
    assert all(torch.equal(every[i][1], full[i][1]) for i in range(3))

    only_middle_logits, only_middle = block_values(model, QuantSpec(mode, layers=(1,)), scales, ids)
    # Block 0 runs unquantized on the same input as in fp: the same values exactly, and no codes.
    assert torch.equal(only_middle[0][1], fp[0][1]) and only_middle[0][2] is None
    # Block 1 quantizes: its output is its codes times the effective scale.
    before, after, codes = only_middle[1]
    assert codes is not None and not torch.equal(after, before)
    assert torch.equal(after, codes * torch.tensor(QuantSpec(mode).effective_scale(scales[1].output), dtype=torch.float32))
    # Block 2 does not quantize: after is before (its input already carries block 1's error).
    assert only_middle[2][2] is None and torch.equal(only_middle[2][0], only_middle[2][1])
    assert not torch.equal(only_middle_logits, fp_logits) and not torch.equal(only_middle_logits, full_logits)


def test_quantize_installs_each_blocks_site_and_keeps_the_checkpoint_layout(model):
    keys = list(model.state_dict())
    scales = layer_scales(model)
    model.quantize(QuantSpec("better", 7.0, layers=(1,)), scales)
    sites = [layer.mixer.conv_silu for layer in model.backbone.layers]
    try:
        assert [site.spec.mode for site in sites] == ["fp", "better", "fp"]
        assert sites[1].spec.divisor == 7.0 and sites[1].scales == scales[1]
        assert "(conv_silu): ConvSiLU(better/7)" in str(model)  # print(model) says what each block runs
        assert list(model.state_dict()) == keys  # sites hold no parameters: checkpoints load as before
    finally:
        model.quantize(QuantSpec("fp"), None)
    assert all(layer.mixer.conv_silu.spec == QuantSpec("fp") for layer in model.backbone.layers)


def test_layers_beyond_the_model_are_refused(model):
    with pytest.raises(ArgumentError, match=r"^layers='1\+3' is not allowed: expected blocks of 0-2 \(the model has 3\)$"):
        model.quantize(QuantSpec("same", layers=(1, 3)), layer_scales(model))


class CountingRecorder:
    """Stands in for recorder.Recorder: records which layer observed what, with which mask."""

    def __init__(self):
        self.calls = []

    def layer(self, layer_idx, mask):
        def observe(before, after, codes, clamped):
            self.calls.append((layer_idx, mask, before.shape, before.dtype))

        return observe


def test_each_block_reports_to_the_recorder_once_per_forward(model):
    recorder = CountingRecorder()
    ids, mask = left_padded([random_ids(1, 6)[0], random_ids(1, 3)[0]])
    model.recorder = recorder
    try:
        with torch.no_grad():
            model(ids, mask=mask)
    finally:
        model.recorder = None
    d_inner = model.config.d_inner
    assert [call[0] for call in recorder.calls] == list(range(model.config.n_layer))
    assert all(call[1] is mask and call[2] == (2, 6, d_inner) and call[3] == torch.float32 for call in recorder.calls)


def test_untied_embeddings_keep_their_own_lm_head():
    model = MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=30, tie_embeddings=False))
    assert model.lm_head.weight is not model.backbone.embedding.weight
    assert MambaLM(MambaConfig(d_model=16, n_layer=1, vocab_size=30)).lm_head.weight.shape == (32, 16)


# --- CUDA: the Triton kernels (or mamba-ssm's) against the CPU reference path ---------------------

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def assert_cuda_forward_matches_the_cpu(model, spec: QuantSpec, scales=None) -> None:
    """A left-padded batch through copies of `model` in `spec` (with `scales`, else simple ones) on
    CUDA and on the CPU: the real positions' logits agree to PARITY."""
    import copy

    ids, mask = left_padded([random_ids(1, 20)[0], random_ids(1, 13)[0]])
    if scales is None and spec.quantized:
        scales = layer_scales(model)
    gpu = copy.deepcopy(model).cuda().quantize(spec, scales)
    cpu = copy.deepcopy(model).quantize(spec, scales)
    with torch.no_grad():
        expected = cpu(ids, mask=mask)
        got = gpu(ids.cuda(), mask=mask.cuda()).cpu()
    real = mask.bool()
    assert relative_error(got[real], expected[real]) < PARITY


@cuda_only
@pytest.mark.parametrize("mode, layers, mixer", [("fp", None, "Mamba1"), ("same", None, "Mamba1"), ("same", (1,), "Mamba1"),
                                                  ("int8", None, "FalconMamba")])
def test_cuda_forward_matches_the_cpu_forward(model, mode, layers, mixer):
    # Same fp32 arithmetic on other kernels (cuBLAS, the fused scan and RMSNorm, exp2-based exp):
    # a few ulps per op as on CPU, so the same bound applies. TF32 stays off (PyTorch's default for
    # float32 matrix products), else the products alone would differ by ~1e-3.
    import dataclasses

    if mixer != model.config.mixer:
        other = MambaLM(dataclasses.replace(model.config, mixer=mixer))
        other.load_state_dict(model.state_dict())
        model = other.eval()
    assert_cuda_forward_matches_the_cpu(model, QuantSpec(mode, layers=layers))


@cuda_only
def test_cuda_decoding_with_state_matches_the_full_forward(model):
    import copy

    gpu = copy.deepcopy(model).cuda()
    ids = random_ids(2, 12).cuda()
    with torch.no_grad():
        full = gpu(ids)
    assert relative_error(decoded(gpu, ids, 5), full) < PARITY
    generated = gpu.generate(ids[:, :7], max_new_tokens=6).cpu()
    assert torch.equal(generated, model.generate(ids[:, :7].cpu(), max_new_tokens=6))
    # A row held at EOS is padding for the later steps (the masked decoding step on the GPU path).
    eos = int(generated[0, 8])
    held = gpu.generate(ids[:, :7], max_new_tokens=6, eos_token_id=eos).cpu()
    assert torch.equal(held, model.generate(ids[:, :7].cpu(), max_new_tokens=6, eos_token_id=eos))


@cuda_only
def test_cuda_auto_dtype_is_float16_and_close_to_float32(tmp_path):
    # float16 on the GPU path: same bound as the CPU float16 test above (one roundoff is ~5e-4).
    folder, _ = make_checkpoint(tmp_path / "ckpt", "transformers", num_hidden_layers=3)
    ids = random_ids(2, 10)
    gpu = load_pretrained(folder, dtype="auto", device="cuda")
    assert gpu.dtype == torch.float16 and gpu.backbone.layers[0].mixer.A_log.dtype == torch.float32
    with torch.no_grad():
        expected = load_pretrained(folder)(ids)
        got = gpu(ids.cuda()).float().cpu()
    assert torch.isfinite(got).all()
    assert relative_error(got, expected) < 5e-3
    assert gpu.generate(ids.cuda(), max_new_tokens=4).shape == (2, 14)


# --- Mamba-2 ------------------------------------------------------------------------------------


def mamba2_model(seed: int = 0) -> MambaLM:
    """A small random Mamba-2 (4 heads of 8 channels in 2 groups), every parameter off its default."""
    torch.manual_seed(seed)
    model = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=TOKENIZER_VOCAB, d_state=4, mixer="Mamba2", headdim=8, ngroups=2)).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith(("dt_bias", "A_log", "D", "norm.weight", "conv1d.bias")):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


@pytest.mark.parametrize("length", [1, 9, 150])  # one step; one chunk of 64 (padded); three chunks, the last padded
def test_mamba2_scan_against_a_float64_recurrence(length):
    from lm_eval_floatsim.mamba2 import ssd_scan

    gen = torch.Generator().manual_seed(4)
    batch, nheads, headdim, ngroups, d_state = 2, 4, 3, 2, 5
    x = torch.randn(batch, length, nheads, headdim, generator=gen)
    dt = torch.rand(batch, length, nheads, generator=gen)
    A, D = -torch.rand(nheads, generator=gen) * 2, torch.randn(nheads, generator=gen)
    B, C = (torch.randn(batch, length, ngroups, d_state, generator=gen) for _ in range(2))
    h0 = torch.randn(batch, nheads, headdim, d_state, generator=gen)
    y, last = ssd_scan(x, dt, A, B, C, D, h0)
    # Head i reads group i // (nheads // ngroups), one position at a time, in float64.
    expected = torch.zeros(batch, length, nheads, headdim, dtype=torch.float64)
    for b in range(batch):
        for i in range(nheads):
            g = i // (nheads // ngroups)
            h = h0[b, i].double()
            for t in range(length):
                h = torch.exp(dt[b, t, i].double() * A[i].double()) * h + dt[b, t, i].double() * torch.outer(x[b, t, i].double(), B[b, t, g].double())
                expected[b, t, i] = h @ C[b, t, g].double() + D[i].double() * x[b, t, i].double()
            assert torch.allclose(last[b, i].double(), h, rtol=1e-5, atol=1e-6)
    # fp32 sums of O(1) terms, chunk by chunk, and decays whose exponents are sums of their own
    # terms: a few ulps each (measured: 1.4e-7 of the largest |y| at 150 positions).
    assert torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-6)


def test_mamba2_decoding_with_state_and_left_padding_match_the_full_forward():
    model = mamba2_model()
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids)
        assert relative_error(decoded(model, ids, 5), full) < PARITY
        short = ids[1:, 4:]
        padded, mask = left_padded([ids[0], short[0]])
        assert relative_error(model(padded, mask=mask)[1, 4:], model(short)[0]) < PARITY


def segmented_scales(model) -> list[SegmentedScales]:
    """Scales per segment x, B, C of a Mamba-2 conv (conv_scales=xbc), each its own."""
    segments = model.config.conv_segments()
    return [SegmentedScales(tuple(segments), tuple(segments.values()), (0.05, 0.1, 0.02), (0.02, 0.04, 0.01), s.weight, s.bias)
            for s in layer_scales(model)]


def test_mamba2_with_scales_per_segment_decodes_step_by_step_as_it_computes_the_whole():
    """Each segment's conv continues from its own channels of the decoding state."""
    model = mamba2_model().quantize(QuantSpec("int8"), segmented_scales(mamba2_model()))
    ids = random_ids(2, 12)
    with torch.no_grad():
        full = model(ids)
    assert relative_error(decoded(model, ids, 5), full) < PARITY


def test_scales_per_segment_must_fit_the_models_conv():
    scales = segmented_scales(mamba2_model())
    wrong = [SegmentedScales(("x", "B", "C"), (32, 4, 12), *astuple(s)[2:]) for s in scales]
    with pytest.raises(ArgumentError, match=r"scales='block 0: segments x 32, B 4, C 12'.*\(x 32, B 8, C 8\)"):
        mamba2_model().quantize(QuantSpec("same"), wrong)


@pytest.fixture
def torch_scan_on_cuda(monkeypatch):
    """Mamba-2's scan as the CPU computes it (`mamba2.chunked_scan`), also on CUDA."""
    from lm_eval_floatsim import mamba2

    monkeypatch.setattr(mamba2, "mamba_ssm_chunk_scan", lambda: None)


@cuda_only
@pytest.mark.parametrize("mode", ["fp", "int8", "same"])
def test_cuda_mamba2_forward_matches_the_cpu_forward(mode, torch_scan_on_cuda):
    assert_cuda_forward_matches_the_cpu(mamba2_model(), QuantSpec(mode))


@cuda_only
@pytest.mark.parametrize("mode", ["int8", "better"])
def test_cuda_mamba2_with_scales_per_segment_matches_the_cpu_forward(mode, torch_scan_on_cuda):
    """conv_scales=xbc: the fused kernel runs once per segment, on strided channel slices."""
    model = mamba2_model()
    assert_cuda_forward_matches_the_cpu(model, QuantSpec(mode), segmented_scales(model))


@cuda_only
def test_cuda_mamba2_decoding_with_state_matches_the_full_forward(torch_scan_on_cuda):
    model = mamba2_model().cuda()
    ids = random_ids(2, 12).cuda()
    with torch.no_grad():
        full = model(ids)
    assert relative_error(decoded(model, ids, 5), full) < PARITY


@cuda_only
def test_cuda_mamba2_with_mamba_ssms_chunked_scan_stays_near_the_recurrence():
    """mamba_ssm's chunked SSD kernels compute the scan as blocked matrix products, not step by
    step: on the H200 (2026-12-03) their fp32 logits were 1.4e-4 (relative) from the recurrence's,
    hence the looser bound. Without mamba_ssm there is nothing to compare."""
    from lm_eval_floatsim import mamba2

    if mamba2.mamba_ssm_chunk_scan() is None:
        pytest.skip("mamba_ssm is not installed")
    model = mamba2_model().cuda()
    ids = random_ids(2, 40).cuda()
    with torch.no_grad():
        chunked = model(ids)
    assert relative_error(chunked, decoded(model, ids, 0)) < 1e-3  # one position at a time: the recurrence
