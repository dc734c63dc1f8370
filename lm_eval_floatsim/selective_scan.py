"""The selective scan of a Mamba block: h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t.

Two implementations of one function: mamba-ssm's CUDA kernel when it is installed and the call
allows it (CUDA tensors, no initial state), and a PyTorch scan otherwise. The PyTorch scan
discretizes a chunk of positions at once (large vectorized ops) and runs only the recurrence
itself position by position, in fp32.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F

# Elements of one discretized chunk (batch x positions x channels x d_state): large enough for
# vectorized ops to dominate the per-position loop, small enough to bound memory (3 x 32 MiB).
CHUNK_ELEMENTS = 1 << 23


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
    out_dtype = u.dtype
    u, B, C = u.float(), B.float(), C.float()
    delta = F.softplus(delta.float() + delta_bias.float())
    batch, length, d_inner = u.shape
    d_state = A.shape[1]
    A = A.float()
    h = u.new_zeros(batch, d_inner, d_state) if h0 is None else h0.float()
    step = max(1, CHUNK_ELEMENTS // (batch * d_inner * d_state))
    ys = []
    for start in range(0, length, step):
        span = slice(start, start + step)
        dA = torch.exp(delta[:, span, :, None] * A)
        dBu = (delta[:, span, :, None] * B[:, span, None, :]) * u[:, span, :, None]
        states = torch.empty_like(dA)
        for t in range(dA.shape[1]):
            h = torch.addcmul(dBu[:, t], dA[:, t], h, out=states[:, t])
        ys.append(torch.einsum("bldn,bln->bld", states, C[:, span]))
    y = torch.cat(ys, dim=1) if len(ys) > 1 else ys[0]
    y = (y + u * D.float()) * F.silu(z.float())
    if return_last_state:
        return y.to(out_dtype), h.clone()
    return y.to(out_dtype)
