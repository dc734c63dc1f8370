"""The nvcc `--use_fast_math` INT8 Conv1D+SiLU reference (int8_fastmath_reference.cu) and realistic
inputs for comparing `kernel_math=fast` with it. Used by tests/test_kernels.py (GPU) and
benchmarks/int8_fastmath_check.py; never by the package: building it needs nvcc and a CUDA GPU."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lm_eval_floatsim.quant import LayerScales, QuantSpec, conv_silu

SOURCE = Path(__file__).with_name("int8_fastmath_reference.cu")
FLAGS = ["-O3", "--use_fast_math"]
TAPS = 4


def build(build_dir=None):
    """Compile the reference with nvcc -O3 --use_fast_math (about a minute) and import it."""
    from torch.utils.cpp_extension import load

    options = {}
    if build_dir is not None:
        Path(build_dir).mkdir(parents=True, exist_ok=True)
        options["build_directory"] = str(build_dir)
    return load(name="int8_fastmath_reference", sources=[str(SOURCE)], extra_cuda_cflags=FLAGS, **options)


def realistic_inputs(batch: int, length: int, channels: int, seed: int = 0, device: str = "cuda", outliers: bool = True):
    """Int8 codes as a Mamba conv sees them, on the GPU: inputs with per-channel spreads (with
    `outliers`, a few channels 8x wider, which leaves most output codes small), conv weights and
    bias, each coded with its absmax scale; the output scale from the 0.9995 quantile of |y| (SPEC's
    calibration on these inputs). Without outliers the codes spread over the whole int8 range, where
    rounding ties are densest. Returns (X with the 3 positions before each sequence first, W, Bq,
    scales)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    spread = torch.exp(0.8 * torch.randn(channels, generator=gen, device=device))
    if outliers:
        spread[torch.randperm(channels, generator=gen, device=device)[: max(1, channels // 64)]] *= 8.0
    x = torch.randn(batch, length + TAPS - 1, channels, generator=gen, device=device) * spread
    w = 0.3 * torch.randn(channels, TAPS, generator=gen, device=device)
    b = 0.1 * torch.randn(channels, generator=gen, device=device)
    s_x, s_w, s_b = (float(np.float32(t.abs().max().item() / 127)) for t in (x, w, b))
    X, W, Bq = (torch.clamp(torch.round(t / s), -128, 127) for t, s in ((x, s_x), (w, s_w), (b, s_b)))
    sample = X[: min(batch, 2)].double() * s_x
    y = torch.nn.functional.silu(sum(W[:, k].double() * s_w * sample[:, k : k + length] for k in range(TAPS)) + Bq.double() * s_b)
    s_y = float(np.float32(torch.quantile(y.abs().flatten()[:16_000_000].float(), 0.9995).item() / 127))
    return X.to(torch.int8), W.to(torch.int8), Bq.to(torch.int8), LayerScales(s_x, s_y, s_w, s_b)


def tie_inputs(batch: int, length: int, channels: int, seed: int = 0, device: str = "cuda"):
    """Inputs whose every output sits on a rounding tie, where one rounding more or less decides the
    code: conv weights (0, 0, 0, w), so that acc = w * x; every (w, x, bias code) whose y / s_y, in
    the exact fp32 arithmetic, lies within an ulp of a .5 tie is found, and each channel gets one
    (w, bias) of them and, as inputs, only the x that tie with it. Scales like realistic_inputs'."""
    s_x, s_w, s_b, s_y = (float(np.float32(value)) for value in (0.0473, 0.00874, 0.00247, 0.0157))
    codes = torch.arange(-128, 128, dtype=torch.float32)
    w, x = (t.flatten() for t in torch.meshgrid(codes, codes, indexing="ij"))
    product = (w * x) * torch.tensor(np.float32(s_w) * np.float32(s_x))
    ties: dict[tuple[int, int], list[int]] = {}
    for bias in range(-128, 128):
        v = product + torch.tensor(np.float32(s_b) * np.float32(bias))
        q = (v / (1 + torch.exp(-v))) / torch.tensor(np.float32(s_y))
        near = (q.abs() - q.abs().floor() - 0.5).abs() <= torch.finfo(torch.float32).eps * q.abs()
        for weight, value in zip(w[near & (q.abs() < 127)].tolist(), x[near & (q.abs() < 127)].tolist()):
            ties.setdefault((int(weight), bias), []).append(int(value))
    groups = sorted(ties)
    gen = torch.Generator().manual_seed(seed)
    W = torch.zeros(channels, TAPS, dtype=torch.int8)
    Bq = torch.zeros(channels, dtype=torch.int8)
    X = torch.zeros(batch, length + TAPS - 1, channels, dtype=torch.int8)
    for d in range(channels):
        weight, bias = groups[torch.randint(len(groups), (1,), generator=gen).item()]
        W[d, TAPS - 1], Bq[d] = weight, bias
        choices = torch.tensor(ties[(weight, bias)], dtype=torch.int8)
        X[:, :, d] = choices[torch.randint(len(choices), (batch, length + TAPS - 1), generator=gen)]
    return X.to(device), W.to(device), Bq.to(device), LayerScales(s_x, s_y, s_w, s_b)


def reference_codes(module, X, W, Bq, scales: LayerScales) -> torch.Tensor:
    acc_scale = float(np.float32(scales.weight) * np.float32(scales.input))
    return module.int8_conv_silu(X.contiguous(), W.contiguous(), Bq.contiguous(), acc_scale, scales.bias, scales.output)


def floatsim_codes(X, W, Bq, scales: LayerScales, kernel_math: str) -> torch.Tensor:
    """The codes of our int8 mode on X's device (the Triton kernel on CUDA), from the dequantized
    operands: every code c * s quantizes back to c, so the operands are exactly X, W, Bq."""
    x = X.float() * scales.input
    out = conv_silu(x[:, TAPS - 1 :], W.float() * scales.weight, Bq.float() * scales.bias,
                    QuantSpec("int8", kernel_math=kernel_math), scales, left_context=x[:, : TAPS - 1])
    return torch.round(out.double() / scales.output).to(torch.int8)
