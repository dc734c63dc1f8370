"""The selective scan of a Mamba block: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t.

Implementations of one function, the first that applies: on CUDA the package's Triton kernel
(kernels/selective_scan_triton.py), else mamba-ssm's kernel when it is installed and the call allows
it (no initial state); the PyTorch scan everywhere else, which is the reference. The PyTorch scan
discretizes a chunk of positions at once (large vectorized ops) and runs only the recurrence
itself position by position, in fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

from .kernels import fused_selective_scan

# Elements of one discretized chunk (positions x batch x channels x d_state): its two buffers
# (2 x 4 MiB) stay in cache while the recurrence walks over them. Measured on a 2-core AVX-512 CPU
# (mamba-130m, batch 8 x 128): 2^20 is fastest; 2^21 is 1.2x slower, 2^23 3-5x.
CHUNK_ELEMENTS = 1 << 20
LOG2_E = 1.4426950408889634


@functools.lru_cache(maxsize=None)
def mamba_ssm_scan():
    """mamba-ssm's selective_scan_fn, or None where it (or its CUDA extension) is not installed."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or the extension failing to load on a machine without CUDA
        return None
    return selective_scan_fn


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    h0: Optional[torch.Tensor] = None,
    return_last_state: bool = False,
):
    """Channels-last scan: u, delta, z (batch, length, d_inner); B, C (batch, length, d_state);
    A (d_inner, d_state); D, delta_bias (d_inner,); h0 (batch, d_inner, d_state) or None.

    delta is before softplus and before its bias. Returns y (batch, length, d_inner) in u's dtype,
    and the last state (fp32) when asked.
    """
    if u.is_cuda:
        fused = fused_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0, return_last_state)
        if fused is not None:
            return fused
    kernel = mamba_ssm_scan() if u.is_cuda and h0 is None else None
    if kernel is not None:
        out = kernel(
            u.transpose(1, 2),
            delta.transpose(1, 2),
            A,
            B.transpose(1, 2),
            C.transpose(1, 2),
            D.float(),
            z=z.transpose(1, 2),
            delta_bias=delta_bias.float(),
            delta_softplus=True,
            return_last_state=return_last_state,
        )
        if return_last_state:
            return out[0].transpose(1, 2), out[1].float()
        return out.transpose(1, 2)
    return scan_torch(u, delta, A, B, C, D, z, delta_bias, h0, return_last_state)


def scan_torch(u, delta, A, B, C, D, z, delta_bias, h0=None, return_last_state=False):
    """The scan in PyTorch, fp32, time-major: each position's state is one contiguous block.

    Per chunk of positions, exp(dt A) and dt B u are computed at once; the recurrence then runs
    position by position in place over the dt B u buffer (which becomes the chunk's states, small
    enough to stay in cache), and the outputs are read off the states with C.
    """
    out_dtype = u.dtype
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    u = u.float()
    dt = _time_major(F.softplus(delta.float() + delta_bias.float()))
    dt_u = dt * _time_major(u)
    B, C = _time_major(B.float()), _time_major(C.float())
    # exp(dt A) as 2^(dt A log2(e)): CPU's exp2 takes half the time of exp, within an ulp of it.
    A_log2 = A.float() * LOG2_E
    h = None if h0 is None else h0.float()
    y = u.new_empty(length, batch, d_inner)
    step = max(1, CHUNK_ELEMENTS // (batch * d_inner * d_state))
    for start in range(0, length, step):
        span = slice(start, start + step)
        dA = torch.mul(dt[span, :, :, None], A_log2).exp2_()
        states = torch.mul(dt_u[span, :, :, None], B[span, :, None, :])
        for t in range(states.shape[0]):
            if h is not None:
                states[t].addcmul_(dA[t], h)
            h = states[t]
        h = h.clone()  # the chunk's states are overwritten with their products with C below
        torch.sum(states.mul_(C[span, :, None, :]), dim=-1, out=y[span])
    # Written batch-major (the layout out_proj reads) while y is read time-major.
    y = torch.addcmul(y.transpose(0, 1), u, D.float(), out=torch.empty_like(u)).mul_(F.silu(z.float()))
    if return_last_state:
        return y.to(out_dtype), h
    return y.to(out_dtype)


def _time_major(t: torch.Tensor) -> torch.Tensor:
    """(batch, length, ...) -> a contiguous (length, batch, ...) copy."""
    return t.transpose(0, 1).contiguous()
