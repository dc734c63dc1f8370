"""Quantization sites: the steps of a block that a recipe quantizes, as modules the block calls.

`MambaLM.quantize` installs one module per site in every block (the module swap): what a block
computes is then visible in `print(model)`, and a block outside `layers` simply holds the
unquantized op. Today there is one site, the Conv1D+SiLU step; a new one (a quantized in_proj, the
selective scan's inputs) is one class here, one entry of `SITES`, the call in the mixer, and its
scales in the scales file (`calibration.Scales`, which stores scales per site).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Union

import torch
import torch.nn as nn

from .modes import QuantSpec
from .quant import LayerScales, Observer, SegmentedScales, conv_silu


class ConvSiLU(nn.Module):
    """The Conv1D+SiLU step of one block in its spec's mode (`quant.conv_silu`). It holds no
    parameters: the mixer passes its conv, so checkpoints keep their layout."""

    scale_keys = ("input_scale", "output_scale", "weight_scale", "bias_scale")

    def __init__(self, spec: QuantSpec, scales: Union[LayerScales, SegmentedScales, None] = None):
        super().__init__()
        self.spec, self.scales = spec, scales

    def forward(
        self,
        x: torch.Tensor,
        conv1d: nn.Conv1d,
        observer: Optional[Observer] = None,
        mask: Optional[torch.Tensor] = None,
        state=None,
        layer_idx: int = 0,
    ) -> torch.Tensor:
        """SiLU(conv1d(x)) of channels-last x; padding (mask 0) counts as zeros in and out. With a
        decoding state, x continues the sequences whose last conv inputs `state.conv[layer_idx]`
        holds, and leaves x's last inputs there. Segmented scales quantize each segment's channels
        with its own; the observer sees the segments one after the other, x first, so a dump's
        values come from x's channels."""
        left_context = state.conv[layer_idx] if state is not None else None
        weight = conv1d.weight[:, 0, :]
        bias = conv1d.bias if conv1d.bias is not None else weight.new_zeros(weight.shape[0])
        if self.spec.quantized and isinstance(self.scales, SegmentedScales):
            out = torch.cat([
                conv_silu(x[..., part], weight[part], bias[part], self.spec, scales, observer,
                          None if left_context is None else left_context[..., part], mask)
                for _, part, scales in self.scales.segments()
            ], dim=-1)
        else:
            out = conv_silu(x, weight, bias, self.spec, self.scales, observer, left_context, mask)
        if state is not None:
            state.conv[layer_idx] = _last_conv_inputs(left_context, x, mask)
        return out

    def extra_repr(self) -> str:
        return replace(self.spec, layers=None).label


SITES = {"conv_silu": ConvSiLU}


def _last_conv_inputs(left_context: torch.Tensor, x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The last K-1 conv inputs, padding as zeros (as the conv saw them), for the next step."""
    keep = left_context.shape[1]
    if mask is not None:
        tail = min(keep, x.shape[1])
        x = x[:, -tail:].masked_fill((mask[:, -tail:] == 0).unsqueeze(-1), 0)
    if x.shape[1] >= keep:
        return x[:, -keep:].clone()
    return torch.cat([left_context, x], dim=1)[:, -keep:]
