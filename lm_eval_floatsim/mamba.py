"""A Mamba (v1) language model whose Conv1D+SiLU step runs through a quantization site (`sites`).

`MIXERS` maps a mixer type to its class (as mamba_ssm's layer map): `Mamba1`, `FalconMamba`
(Mamba-1 whose selective-scan inputs dt, B and C are RMS-normalised, without weights) and `Mamba2`
(`mamba2.py`).

Parameter names follow mamba_ssm's MambaLMHeadModel (`backbone.layers.N.mixer.conv1d.weight`, ...)
so that original checkpoints load as they are. Activations are channels-last (batch, length,
channels) from in_proj to out_proj. One forward serves prompts and single decoding steps: given a
`DecodingState`, a call continues the sequences held in it and leaves their new state behind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ArgumentError
from .kernels import fused_rms_norm
from .modes import QuantSpec, format_layers
from .quant import LayerScales, SegmentedScales
from .selective_scan import selective_scan
from .mamba2 import Mamba2Mixer
from .sites import ConvSiLU


@dataclass
class MambaConfig:
    d_model: int
    n_layer: int
    vocab_size: int
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: Union[int, str] = "auto"
    rms_norm: bool = True
    norm_epsilon: float = 1e-5
    residual_in_fp32: bool = True
    conv_bias: bool = True
    bias: bool = False
    pad_vocab_size_multiple: int = 8
    tie_embeddings: bool = True
    mixer: str = "Mamba1"
    mixer_rms_eps: float = 1e-6  # eps of the mixer's own RMS norms: FalconMamba's of dt, B, C; Mamba-2's gated one
    headdim: int = 64  # Mamba-2: channels per head, groups sharing B and C, the range dt is clamped to
    ngroups: int = 1
    dt_limit: tuple[float, float] = (0.0, math.inf)

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def conv_dim(self) -> int:
        """Channels of the Conv1D: x for Mamba-1, xBC for Mamba-2."""
        return self.d_inner + (2 * self.ngroups * self.d_state if self.mixer == "Mamba2" else 0)

    def conv_segments(self) -> dict[str, int]:
        """The Conv1D's channels in order, segment name -> width: x for Mamba-1, x, B and C for Mamba-2."""
        if self.mixer != "Mamba2":
            return {"x": self.d_inner}
        return {"x": self.d_inner, "B": self.ngroups * self.d_state, "C": self.ngroups * self.d_state}

    @property
    def dt_rank_value(self) -> int:
        return math.ceil(self.d_model / 16) if self.dt_rank == "auto" else int(self.dt_rank)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.pad_vocab_size_multiple
        return self.vocab_size + (-self.vocab_size) % multiple


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:  # one fused Triton pass computes the same, where it can run
            fused = fused_rms_norm(x, self.weight, self.eps)
            if fused is not None:
                return fused
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(self.weight.dtype)


@dataclass
class DecodingState:
    """Per block: the last d_conv-1 conv inputs (batch, d_conv-1, d_inner) and the SSM state."""

    conv: list[torch.Tensor] = field(default_factory=list)
    ssm: list[Optional[torch.Tensor]] = field(default_factory=list)


class Mixer(nn.Module):
    """The Mamba mixer: in_proj -> Conv1D+SiLU (its site, `conv_silu`) -> x_proj/dt_proj -> selective
    scan -> out_proj."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d_inner, d_state, dt_rank = config.d_inner, config.d_state, config.dt_rank_value
        self.d_state, self.dt_rank = d_state, dt_rank
        self.in_proj = nn.Linear(config.d_model, 2 * d_inner, bias=config.bias)
        self.conv1d = nn.Conv1d(
            d_inner, d_inner, config.d_conv, groups=d_inner, padding=config.d_conv - 1, bias=config.conv_bias
        )
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1).float()).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, config.d_model, bias=config.bias)
        self.conv_silu = ConvSiLU(QuantSpec("fp"))

    def forward(self, hidden, observer, mask, state):
        x, z = self.in_proj(hidden).chunk(2, dim=-1)
        u = self.conv_silu(x, self.conv1d, observer, mask, state, self.layer_idx)  # padding: u = 0

        dt, B, C = self.scan_inputs(u)
        delta = F.linear(dt, self.dt_proj.weight)
        A = -torch.exp(self.A_log.float())
        h0 = state.ssm[self.layer_idx] if state is not None else None
        scanned = selective_scan(
            u, delta, A, B, C, self.D, z, self.dt_proj.bias, h0=h0, return_last_state=state is not None
        )
        if state is not None:
            y, state.ssm[self.layer_idx] = scanned
        else:
            y = scanned
        return self.out_proj(y)

    def conv_input(self, projected: torch.Tensor) -> torch.Tensor:
        """The Conv1D's input (x) within in_proj's output."""
        return projected[..., : self.conv1d.in_channels]

    def scan_inputs(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """dt (before dt_proj), B and C: x_proj of the Conv1D+SiLU output, split."""
        return torch.split(self.x_proj(u), [self.dt_rank, self.d_state, self.d_state], dim=-1)


class FalconMambaMixer(Mixer):
    """FalconMamba's mixer: Mamba-1's, with dt, B and C each RMS-normalised (in fp32, no weight,
    eps `mixer_rms_eps`) before dt_proj and the scan."""

    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.rms_eps = config.mixer_rms_eps

    def scan_inputs(self, u):
        return tuple(_weightless_rms_norm(t, self.rms_eps) for t in super().scan_inputs(u))


def _weightless_rms_norm(t: torch.Tensor, eps: float) -> torch.Tensor:
    t32 = t.float()
    return (t32 * torch.rsqrt(t32.pow(2).mean(-1, keepdim=True) + eps)).to(t.dtype)


MIXERS = {"Mamba1": Mixer, "FalconMamba": FalconMambaMixer, "Mamba2": Mamba2Mixer}


class Block(nn.Module):
    def __init__(self, config: MambaConfig, layer_idx: int):
        super().__init__()
        self.norm = RMSNorm(config.d_model, config.norm_epsilon)
        self.mixer = MIXERS[config.mixer](config, layer_idx)


class Backbone(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.embedding = nn.Embedding(config.padded_vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm_f = RMSNorm(config.d_model, config.norm_epsilon)


class MambaLM(nn.Module):
    def __init__(self, config: MambaConfig):
        super().__init__()
        self.config = config
        self.backbone = Backbone(config)
        self.lm_head = nn.Linear(config.d_model, config.padded_vocab_size, bias=False)
        self.tie_weights()
        self.spec = QuantSpec("fp")
        self.scales: Optional[list[LayerScales]] = None
        self.recorder = None

    def tie_weights(self) -> None:
        """Share the embedding with lm_head when the config ties them (again, after loading weights)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.backbone.embedding.weight

    def quantize(self, spec: QuantSpec, scales: Optional[list[LayerScales]]) -> "MambaLM":
        """Install in every block the Conv1D+SiLU site of `spec` (unquantized outside `spec.layers`),
        with its block's LayerScales (one per block; None for fp)."""
        n_layer = self.config.n_layer
        if spec.quantized and (scales is None or len(scales) != n_layer):
            found = "none" if scales is None else f"{len(scales)} layers"
            raise ArgumentError("scales", found, f"one entry per layer ({n_layer}) for mode={spec.mode}")
        if spec.layers is not None and spec.layers[-1] >= n_layer:
            raise ArgumentError("layers", format_layers(spec.layers), f"blocks of 0-{n_layer - 1} (the model has {n_layer})")
        if scales is not None:
            self._check_segments(scales)
        for layer in self.backbone.layers:
            i = layer.mixer.layer_idx
            layer.mixer.conv_silu = ConvSiLU(spec.for_layer(i), scales[i] if scales is not None else None)
        self.spec, self.scales = spec, scales
        return self

    def _check_segments(self, scales) -> None:
        segments = self.config.conv_segments()
        for i, layer_scales in enumerate(scales):
            if isinstance(layer_scales, SegmentedScales) and dict(zip(layer_scales.names, layer_scales.widths)) != segments:
                found = ", ".join(f"{name} {width}" for name, width in zip(layer_scales.names, layer_scales.widths))
                wanted = ", ".join(f"{name} {width}" for name, width in segments.items())
                raise ArgumentError("scales", f"block {i}: segments {found}", f"this model's conv channels ({wanted})")

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def allocate_state(self, batch: int) -> DecodingState:
        taps, channels = self.config.d_conv, self.config.conv_dim
        conv = [torch.zeros(batch, taps - 1, channels, device=self.device, dtype=self.dtype) for _ in self.backbone.layers]
        return DecodingState(conv=conv, ssm=[None] * self.config.n_layer)

    def forward(
        self,
        input_ids: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        state: Optional[DecodingState] = None,
    ) -> torch.Tensor:
        """Logits (batch, length, padded vocab) in the model dtype.

        mask (batch, length; 1 = real token) lets rows be left-padded: padding positions count as
        zeros in the Conv1D+SiLU's windows and leave it as zeros, so they change neither conv
        window nor SSM state.
        """
        return self.lm_head(self.hidden_states(input_ids, mask, state))

    def hidden_states(
        self,
        input_ids: torch.Tensor,
        mask: Optional[torch.Tensor] = None,
        state: Optional[DecodingState] = None,
    ) -> torch.Tensor:
        """The final normed hidden states (batch, length, d_model): the forward without lm_head."""
        residual = self.backbone.embedding(input_ids)
        if self.config.residual_in_fp32:
            residual = residual.float()
        for layer in self.backbone.layers:
            hidden = layer.norm(residual.to(layer.norm.weight.dtype))
            residual = residual + layer.mixer(hidden, self._observer(layer, mask), mask, state)
        return self.backbone.norm_f(residual.to(self.backbone.norm_f.weight.dtype))

    def step(self, input_ids: torch.Tensor, state: DecodingState) -> torch.Tensor:
        """One decoding step: input_ids (batch,) continue the sequences in `state`; logits (batch, vocab)."""
        return self(input_ids[:, None], state=state)[:, 0]

    def _observer(self, layer: Block, mask):
        if self.recorder is None:
            return None
        return self.recorder.layer(layer.mixer.layer_idx, mask)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        mask: Optional[torch.Tensor] = None,
        eos_token_id: Optional[int] = None,
    ) -> torch.Tensor:
        """Greedy decoding with the recurrent state; returns prompt + new tokens (left-padded rows allowed).

        A row that has produced `eos_token_id` is held at it; the steps the other rows still take
        see it as padding, so it adds nothing to the recorder's statistics (as if decoded alone).
        """
        state = self.allocate_state(input_ids.shape[0])
        logits = self(input_ids, mask=mask, state=state)
        tokens = [input_ids]
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for step in range(max_new_tokens):
            next_token = logits[:, -1].argmax(-1)
            if eos_token_id is not None:
                next_token = torch.where(finished, torch.full_like(next_token, eos_token_id), next_token)
                finished |= next_token == eos_token_id
            tokens.append(next_token[:, None])
            if step == max_new_tokens - 1 or (eos_token_id is not None and bool(finished.all())):
                break
            running = (~finished)[:, None].long() if bool(finished.any()) else None
            logits = self(next_token[:, None], mask=running, state=state)
        return torch.cat(tokens, dim=1)
