"""Triton kernels for CUDA tensors. Optional: where Triton is missing, or a call needs what a kernel
does not do, these functions return None and the caller runs its PyTorch path, which stays the
reference.

Importing this package imports neither torch nor Triton; the kernel modules load on first use.
"""

from __future__ import annotations

import functools


def fused_conv_silu(x, weight, bias, spec, scales, observer=None, left_context=None, mask=None):
    """`quant.conv_silu` in one fused Triton pass, or None where the PyTorch path must run."""
    module = _kernel_module("conv_silu_triton")
    if module is None:
        return None
    return module.conv_silu_triton(x, weight, bias, spec, scales, observer, left_context, mask)


def fused_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0=None, return_last_state=False):
    """`selective_scan.selective_scan` on channels-last CUDA tensors, or None where it cannot run."""
    module = _kernel_module("selective_scan_triton")
    if module is None:
        return None
    return module.selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, h0, return_last_state)


def fused_rms_norm(x, weight, eps):
    """`mamba.RMSNorm` in one Triton pass, or None where it cannot run."""
    module = _kernel_module("rms_norm_triton")
    if module is None:
        return None
    return module.rms_norm_triton(x, weight, eps)


def resample_sums(picks_t, values, compensated: bool):
    """`bootstrap.python_sum` of the resamples `values[picks_t[:, j]]` on values' CUDA device, as a
    numpy array; only where `resample_sums_available()`."""
    return _kernel_module("resample_sums_triton").resample_sums(picks_t, values, compensated)


def resample_sums_available() -> bool:
    """Whether `resample_sums` can run here: Triton and a CUDA device."""
    if _kernel_module("resample_sums_triton") is None:
        return False
    import torch

    return torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def _kernel_module(name: str):
    """The kernel module, or None where Triton (or a CUDA build of it) cannot be imported."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ImportError:
        return None
