"""The Mamba-2 mixer (mamba_ssm's Mamba2, transformers' Mamba2Mixer), with its Conv1D+SiLU step over
xBC running through the quantization site of `sites`, as Mamba-1's does.

in_proj -> (z, xBC, dt); Conv1D+SiLU over xBC (conv_dim = d_inner + 2 * ngroups * d_state channels);
split into x (nheads x headdim), B and C (ngroups x d_state); dt = softplus(dt + dt_bias), clamped to
dt_limit; the multi-head scan h_t = exp(dt_t A) h_{t-1} + dt_t x_t B_t^T, y_t = h_t C_t + D x_t
(heads share their group's B and C); then y * silu(z), RMS-normalised per group, and out_proj.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .modes import QuantSpec
from .sites import ConvSiLU


class Mamba2Mixer(nn.Module):
    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_inner, self.d_state, self.ngroups = config.d_inner, config.d_state, config.ngroups
        self.headdim, self.nheads = config.headdim, config.d_inner // config.headdim
        self.dt_limit = config.dt_limit
        conv_dim = config.conv_dim
        self.in_proj = nn.Linear(config.d_model, self.d_inner + conv_dim + self.nheads, bias=config.bias)
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, config.d_conv, groups=conv_dim, padding=config.d_conv - 1, bias=config.conv_bias)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.log(torch.arange(1, self.nheads + 1).float()))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, self.d_inner // self.ngroups, config.mixer_rms_eps)
        self.out_proj = nn.Linear(self.d_inner, config.d_model, bias=config.bias)
        self.conv_silu = ConvSiLU(QuantSpec("fp"))

    def conv_input(self, projected: torch.Tensor) -> torch.Tensor:
        """The Conv1D's input (xBC) within in_proj's output."""
        return projected[..., self.d_inner : self.d_inner + self.conv1d.in_channels]

    def forward(self, hidden, observer, mask, state):
        z, xBC, dt = torch.split(self.in_proj(hidden), [self.d_inner, self.conv1d.in_channels, self.nheads], dim=-1)
        u = self.conv_silu(xBC, self.conv1d, observer, mask, state, self.layer_idx)  # padding: u = 0
        x, B, C = torch.split(u, [self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        batch, length = x.shape[:2]
        dt = F.softplus(dt.float() + self.dt_bias.float())
        if self.dt_limit != (0.0, math.inf):
            dt = dt.clamp(*self.dt_limit)
        h0 = state.ssm[self.layer_idx] if state is not None else None
        y, last = ssd_scan(
            x.reshape(batch, length, self.nheads, self.headdim), dt, -torch.exp(self.A_log.float()),
            B.reshape(batch, length, self.ngroups, self.d_state), C.reshape(batch, length, self.ngroups, self.d_state),
            self.D.float(), h0,
        )
        if state is not None:
            state.ssm[self.layer_idx] = last
        y = self.norm(y.reshape(batch, length, self.d_inner), z)
        return self.out_proj(y.to(hidden.dtype))


# mamba_ssm's chunked SSD kernels (Triton) work on chunks of this many positions, its default.
CHUNK_SIZE = 256
# The PyTorch chunked scan's chunk: its (chunk x chunk) decay matrices per head stay small on a CPU.
TORCH_CHUNK_SIZE = 64


@functools.lru_cache(maxsize=None)
def mamba_ssm_chunk_scan():
    """mamba_ssm's mamba_chunk_scan_combined, or None where mamba_ssm is not installed."""
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
    except Exception:  # ImportError, or its CUDA extension failing to load without CUDA
        return None
    return mamba_chunk_scan_combined


def ssd_scan(x, dt, A, B, C, D, h0: Optional[torch.Tensor] = None):
    """The multi-head selective scan: x (batch, length, nheads, headdim), dt (batch, length, nheads)
    after softplus, A and D (nheads,), B and C (batch, length, ngroups, d_state), h0 (batch, nheads,
    headdim, d_state) or None. Returns y (fp32, x's shape) and the last state. Prompts go through
    mamba_ssm's chunked kernels on CUDA when it is installed, else through `chunked_scan`; a single
    decoding step is one step of the recurrence. All in fp32."""
    if x.shape[1] == 1:
        return _recurrence(x, dt, A, B, C, D, h0)
    kernel = mamba_ssm_chunk_scan() if x.is_cuda else None
    if kernel is not None:
        y, last = kernel(x.float(), dt, A, B.float(), C.float(), CHUNK_SIZE, D=D, initial_states=h0, return_final_states=True)
        return y.float(), last
    return chunked_scan(x, dt, A, B, C, D, h0)


def chunked_scan(x, dt, A, B, C, D, h0=None, chunk: int = TORCH_CHUNK_SIZE):
    """The scan of `ssd_scan` as the SSD algorithm computes it, in chunks of `chunk` positions.

    With a_t = dt_t A (the log of step t's decay) and u_t = dt_t x_t: within a chunk,
    y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) u_j (matrix products); each chunk's
    contribution to the state, sum_j exp(a_{j+1} + ... + a_end) u_j B_j^T, is carried from chunk to
    chunk (h <- exp(a_1 + ... + a_end) h + contribution), and the state entering a chunk adds
    exp(a_1 + ... + a_i) C_i . h to y_i. Sums of a are taken over exactly their terms (never as a
    difference of running sums), so a decay is as accurate as its exponent however long the chunk.
    """
    batch, length, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    pad = (-length) % chunk  # padding: a = 0 and u = 0 change neither the state nor real outputs
    chunks = (length + pad) // chunk

    def blocks(t, *tail):
        t = F.pad(t.float(), (0, 0) * len(tail) + (0, 0, 0, pad))
        return t.reshape(batch, chunks, chunk, nheads, *tail)

    u = blocks(x * dt[..., None], headdim)  # (batch, chunks, chunk, heads, headdim)
    a = blocks(dt * A)  # (batch, chunks, chunk, heads)
    Bh = blocks(B.float().repeat_interleave(per_group, dim=2), B.shape[-1])
    Ch = blocks(C.float().repeat_interleave(per_group, dim=2), C.shape[-1])

    decay = torch.exp(_segment_sums(a.transpose(2, 3)))  # (batch, chunks, heads, i, j): exp(a_{j+1..i}), 0 above i
    scores = torch.einsum("bcihn,bcjhn->bchij", Ch, Bh) * decay
    y = torch.einsum("bchij,bcjhp->bcihp", scores, u)

    to_end = decay[..., -1, :]  # (batch, chunks, heads, j): exp(a_{j+1..end})
    contributions = torch.einsum("bcjhn,bchj,bcjhp->bchpn", Bh, to_end, u)
    from_start = decay[..., :, 0] * torch.exp(a[:, :, :1].transpose(2, 3))  # exp(a_{1..i}) = exp(a_{2..i}) exp(a_1)
    h = h0.float() if h0 is not None else x.new_zeros(batch, nheads, headdim, Bh.shape[-1], dtype=torch.float32)
    for c in range(chunks):
        y[:, c] += torch.einsum("bihn,bhi,bhpn->bihp", Ch[:, c], from_start[:, c], h)
        whole_chunk = to_end[:, c, :, 0] * torch.exp(a[:, c, 0])  # exp(a_{1..end}), (batch, heads)
        h = h * whole_chunk[..., None, None] + contributions[:, c]
    y = y.reshape(batch, chunks * chunk, nheads, headdim)[:, :length]
    return y + D[:, None] * x.float(), h


def _segment_sums(a: torch.Tensor) -> torch.Tensor:
    """(..., n) -> (..., n, n): sum of a[j+1..i] at [i, j] for i >= j (0 on the diagonal), -inf above it."""
    n = a.shape[-1]
    below = torch.tril(torch.ones(n, n, dtype=torch.bool, device=a.device), diagonal=-1)
    sums = a[..., None, :].expand(*a.shape, n).transpose(-1, -2).masked_fill(~below, 0).cumsum(dim=-2)
    return sums.masked_fill(~torch.tril(torch.ones_like(below)), -math.inf)


def _recurrence(x, dt, A, B, C, D, h0):
    batch, length, nheads, headdim = x.shape
    per_group = nheads // B.shape[2]
    B = B.float().repeat_interleave(per_group, dim=2)
    C = C.float().repeat_interleave(per_group, dim=2)
    x = x.float()
    h = h0.float() if h0 is not None else x.new_zeros(batch, nheads, headdim, B.shape[-1])
    decay = torch.exp(dt * A)  # (batch, length, nheads)
    y = torch.empty_like(x)
    for t in range(length):
        h = h * decay[:, t, :, None, None] + (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y[:, t] = (h * C[:, t, :, None, :]).sum(-1)
    return y + D[:, None] * x, h


class GatedRMSNorm(nn.Module):
    """RMSNorm of y * silu(z) over groups of `group_size` channels, with a weight (norm_before_gate
    False, as mamba_ssm's and transformers' Mamba-2)."""

    def __init__(self, dim: int, group_size: int, eps: float):
        super().__init__()
        self.group_size, self.eps = group_size, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        gated = y.float() * F.silu(z.float())
        groups = gated.unflatten(-1, (-1, self.group_size))
        normed = (groups * torch.rsqrt(groups.pow(2).mean(-1, keepdim=True) + self.eps)).flatten(-2)
        return self.weight * normed.to(self.weight.dtype)
