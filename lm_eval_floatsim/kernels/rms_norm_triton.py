"""mamba.RMSNorm as one Triton kernel: one read of x and one write, instead of the seven passes its
PyTorch expression makes over fp32 temporaries.

out = weight * (x * rsqrt(mean(x^2) + eps)).to(weight.dtype), the statistics in fp32, as
mamba.RMSNorm computes them (rsqrt and the sum's order differ from PyTorch's in the last bits).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """mamba.RMSNorm.forward, or None where this kernel does not apply (not CUDA, a strided last
    dimension, or rows too wide for one program)."""
    if not x.is_cuda or x.stride(-1) != 1 or x.shape[-1] > 16384 or x.numel() == 0:
        return None
    return launch_rms_norm(x, weight, eps)


def launch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dim = x.shape[-1]
    rows = x.reshape(-1, dim)
    out = torch.empty(rows.shape, dtype=weight.dtype, device=x.device)
    block = triton.next_power_of_2(dim)
    _rms_norm_kernel[(rows.shape[0],)](
        rows, rows.stride(0), weight, out, out.stride(0), dim, eps, BLOCK=block, num_warps=min(16, max(1, block // 256))
    )
    return out.reshape(x.shape)


@triton.jit
def _rms_norm_kernel(x_ptr, sx_row, w_ptr, out_ptr, so_row, dim, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < dim
    x = tl.load(x_ptr + row * sx_row + cols, mask=inside, other=0.0).to(tl.float32)
    scale = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * scale).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=inside, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * so_row + cols, out.to(out_ptr.dtype.element_ty), mask=inside)
