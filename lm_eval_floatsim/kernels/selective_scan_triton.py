"""The selective scan of selective_scan.py as one Triton kernel over channels-last tensors.

h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t,  y_t = (C_t . h_t + D u_t) * silu(z_t),
dt_t = softplus(delta_t + delta_bias), in fp32, as selective_scan.scan_torch computes it.

The tensors stay in the layout the block makes them in, (batch, length, channels) with any strides
(u from the conv, z a view of in_proj's output, B and C views of x_proj's): no transposing copies,
which mamba-ssm's kernel needs. Each program owns BLOCK_D channels of one sequence and walks the
positions in order, its state (d_state x BLOCK_D, one channel's states per thread) in registers,
loading each position's inputs one step ahead. An initial state (decoding) is supported.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import libdevice
except ImportError:  # Triton releases that keep libdevice outside the CUDA backend folder
    from triton.language.extra import libdevice

LOG2E = tl.constexpr(1.4426950408889634)
SOFTPLUS_THRESHOLD = tl.constexpr(20.0)  # torch.nn.functional.softplus's default


def selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, h0=None, return_last_state=False, block_d=None):
    """selective_scan.selective_scan's contract, or None where this kernel does not apply (not
    CUDA, a d_state that is not a power of two) or where mamba-ssm's kernel is faster."""
    d_state = A.shape[1]
    if not u.is_cuda or d_state & (d_state - 1) or u.dim() != 3:
        return None
    batch, _, channels = u.shape
    block_d = block_d or default_block_d(batch, channels)
    if h0 is None and _mamba_ssm_installed():
        programs = batch * triton.cdiv(channels, block_d)
        if prefer_mamba_ssm(programs, _multiprocessors(u.device.index or 0)):
            return None
    return launch_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0, return_last_state, block_d)


def default_block_d(batch: int, channels: int) -> int:
    return 32 if batch * channels <= 32 * 1024 else 64


def prefer_mamba_ssm(programs: int, multiprocessors: int) -> bool:
    """Each program walks its sequence position by position; with fewer than two programs per
    multiprocessor the GPU idles, and mamba-ssm's kernel, parallel over positions too, wins.
    Measured on an H100 (132 SMs), d_inner 1536, L 2048, this kernel vs mamba-ssm's: batch 64
    2.18 vs 8.01 ms, batch 8 (384 programs) 1.10 vs 1.05 ms, batch 1 (48 programs) 0.72 vs 0.18 ms."""
    return programs < 2 * multiprocessors


@functools.lru_cache(maxsize=None)
def _multiprocessors(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _mamba_ssm_installed() -> bool:
    from ..selective_scan import mamba_ssm_scan

    return mamba_ssm_scan() is not None


def launch_selective_scan(u, delta, A, B, C, D, z, delta_bias, h0=None, return_last_state=False, block_d=None):
    batch, length, channels = u.shape
    d_state = A.shape[1]
    y = torch.empty((batch, length, channels), dtype=u.dtype, device=u.device)
    last = torch.empty((batch, channels, d_state), dtype=torch.float32, device=u.device) if return_last_state else y
    block_d = block_d or default_block_d(batch, channels)
    init = h0 if h0 is not None else last  # placeholders (never touched) where there is no such state
    grid = (triton.cdiv(channels, block_d), batch)
    _scan_kernel[grid](
        u, *u.stride(), delta, *delta.stride(), z, *z.stride(),
        B, *B.stride(), C, *C.stride(),
        A, *A.stride(), D, D.stride(0), delta_bias, delta_bias.stride(0),
        init, *init.stride(), y, *y.stride(), last, *last.stride(),
        length, channels,
        D_STATE=d_state, BLOCK_D=block_d, HAS_H0=h0 is not None, STORE_LAST=return_last_state,
        num_warps=max(1, block_d // 32),
    )  # fmt: skip
    return (y, last) if return_last_state else y


@triton.jit
def _softplus(v):
    return tl.where(v > SOFTPLUS_THRESHOLD, v, libdevice.log1p(tl.exp(v)))


@triton.jit
def _scan_kernel(
    u_ptr, su_b, su_l, su_d, dt_ptr, sdt_b, sdt_l, sdt_d, z_ptr, sz_b, sz_l, sz_d,
    b_ptr, sb_b, sb_l, sb_n, c_ptr, sc_b, sc_l, sc_n,
    a_ptr, sa_d, sa_n, dskip_ptr, sds_d, dbias_ptr, sdb_d,
    h0_ptr, sh_b, sh_d, sh_n, y_ptr, sy_b, sy_l, sy_d, last_ptr, sl_b, sl_d, sl_n,
    length, channels,
    D_STATE: tl.constexpr, BLOCK_D: tl.constexpr, HAS_H0: tl.constexpr, STORE_LAST: tl.constexpr,
):  # fmt: skip
    batch = tl.program_id(1).to(tl.int64)
    d = tl.program_id(0) * BLOCK_D + tl.arange(0, BLOCK_D)
    n = tl.arange(0, D_STATE)
    d_ok = d < channels
    state_ok = (n < D_STATE)[:, None] & d_ok[None, :]

    # State-major tiles (d_state, BLOCK_D): a thread holds one channel's states, so C . h sums
    # within a thread. exp(dt A) = exp2(dt (A log2 e)).
    a2 = tl.load(a_ptr + d[None, :] * sa_d + n[:, None] * sa_n, mask=state_ok, other=0.0).to(tl.float32) * LOG2E
    d_skip = tl.load(dskip_ptr + d * sds_d, mask=d_ok, other=0.0).to(tl.float32)
    d_bias = tl.load(dbias_ptr + d * sdb_d, mask=d_ok, other=0.0).to(tl.float32)
    if HAS_H0:
        h = tl.load(h0_ptr + batch * sh_b + d[None, :] * sh_d + n[:, None] * sh_n, mask=state_ok, other=0.0)
        h = h.to(tl.float32)
    else:
        h = tl.zeros((D_STATE, BLOCK_D), dtype=tl.float32)

    u_row = u_ptr + batch * su_b + d * su_d
    dt_row = dt_ptr + batch * sdt_b + d * sdt_d
    z_row = z_ptr + batch * sz_b + d * sz_d
    b_row = b_ptr + batch * sb_b + n * sb_n
    c_row = c_ptr + batch * sc_b + n * sc_n
    y_row = y_ptr + batch * sy_b + d * sy_d

    u = tl.load(u_row, mask=d_ok & (length > 0), other=0.0)
    dt = tl.load(dt_row, mask=d_ok & (length > 0), other=0.0)
    z = tl.load(z_row, mask=d_ok & (length > 0), other=0.0)
    bt = tl.load(b_row, mask=length > 0, other=0.0)
    ct = tl.load(c_row, mask=length > 0, other=0.0)
    for t in range(length):
        ahead = t + 1 < length
        nxt = t + 1  # t * stride stays far below 2**31 (the batch offset is int64)
        u_next = tl.load(u_row + nxt * su_l, mask=d_ok & ahead, other=0.0)
        dt_next = tl.load(dt_row + nxt * sdt_l, mask=d_ok & ahead, other=0.0)
        z_next = tl.load(z_row + nxt * sz_l, mask=d_ok & ahead, other=0.0)
        bt_next = tl.load(b_row + nxt * sb_l, mask=ahead, other=0.0)
        ct_next = tl.load(c_row + nxt * sc_l, mask=ahead, other=0.0)

        uf = u.to(tl.float32)
        step = _softplus(dt.to(tl.float32) + d_bias)
        h = tl.exp2(step[None, :] * a2) * h + (step * uf)[None, :] * bt.to(tl.float32)[:, None]
        y = tl.sum(h * ct.to(tl.float32)[:, None], axis=0) + d_skip * uf
        zf = z.to(tl.float32)
        y = y * (zf / (1.0 + tl.exp(-zf)))
        tl.store(y_row + t * sy_l, y.to(y_ptr.dtype.element_ty), mask=d_ok)

        u, dt, z, bt, ct = u_next, dt_next, z_next, bt_next, ct_next

    if STORE_LAST:
        tl.store(last_ptr + batch * sl_b + d[None, :] * sl_d + n[:, None] * sl_n, h, mask=state_ok)
