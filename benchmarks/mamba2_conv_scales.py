#!/usr/bin/env python
"""Quantization error of a Mamba-2's Conv1D+SiLU with one scale per conv against one per segment
(conv_scales conv vs xbc): per-layer SQNR of int8, same and better on a calibrated random model.

The model is mamba2-130m-shaped (24 layers, d_model 768, d_state 128, headdim 64, one group) with
transformers' random initialisation, calibrated as the package calibrates (`calibration.calibrate`,
percentile 0.9995) on random token sequences, then evaluated on other random sequences; SQNR is
the recorder's, over every value of the evaluation batch. In a random model x, B and C come out of
the same in_proj initialisation and have similar ranges; `--bc-gain G` multiplies in_proj's B rows
by G and its C rows by 1/G, as a trained model's differing ranges would (a construct, said so).

Usage:  python benchmarks/mamba2_conv_scales.py [--bc-gain 8] [--samples 16] [--length 128] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_eval_floatsim.calibration import calibrate  # noqa: E402
from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402
from lm_eval_floatsim.quant import QuantSpec  # noqa: E402
from lm_eval_floatsim.recorder import Recorder  # noqa: E402

SHAPE = dict(d_model=768, n_layer=24, vocab_size=50288, d_state=128, headdim=64, ngroups=1)
MODES = ("int8", "same", "better")


class RandomTokens:
    """Stands in for a tokenizer: each calibration 'text' is a seed of `length` random token ids."""

    def __init__(self, length: int):
        self.length = length

    def __call__(self, text, truncation=True, max_length=None):
        ids = torch.randint(0, SHAPE["vocab_size"], (self.length,), generator=torch.Generator().manual_seed(int(text)))
        return {"input_ids": ids[:max_length].tolist()}


def random_model(bc_gain: float) -> MambaLM:
    from transformers import Mamba2Config, Mamba2ForCausalLM

    from lm_eval_floatsim.loading import to_mamba_ssm_names

    hf_config = Mamba2Config(hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layer"], vocab_size=SHAPE["vocab_size"],
                             state_size=SHAPE["d_state"], head_dim=SHAPE["headdim"], num_heads=2 * SHAPE["d_model"] // SHAPE["headdim"],
                             n_groups=SHAPE["ngroups"], expand=2, initializer_range=0.02)
    torch.manual_seed(0)
    reference = Mamba2ForCausalLM(hf_config).eval()
    config = MambaConfig(**SHAPE, mixer="Mamba2", mixer_rms_eps=1e-5, pad_vocab_size_multiple=1)
    model = MambaLM(config).eval()
    model.load_state_dict(to_mamba_ssm_names(dict(reference.state_dict()), "transformers", config, "benchmark"), strict=False)
    model.tie_weights()
    b_rows = slice(2 * config.d_inner, 2 * config.d_inner + config.ngroups * config.d_state)  # in_proj: z, x, B, C, dt
    c_rows = slice(b_rows.stop, b_rows.stop + config.ngroups * config.d_state)
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight[b_rows] *= bc_gain
            layer.mixer.in_proj.weight[c_rows] /= bc_gain
    return model


def sqnr_per_layer(model: MambaLM, spec: QuantSpec, scales, ids) -> list[float]:
    model.quantize(spec, scales)
    model.recorder = recorder = Recorder(model.config.n_layer, 1, model.device)
    recorder.arm()
    with torch.no_grad():
        model(ids)
    model.recorder = None
    return [summary["sqnr_db"] for summary in recorder.layer_summaries()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bc-gain", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = random_model(args.bc_gain).to(args.device)
    tokens = RandomTokens(args.length)
    texts = [str(seed) for seed in range(args.samples)]
    evaluation = torch.randint(0, SHAPE["vocab_size"], (4, args.length), generator=torch.Generator().manual_seed(10_000)).to(args.device)
    result = {"bc_gain": args.bc_gain, "calibration": f"{args.samples} x {args.length} random tokens", "sqnr_db": {}}
    for conv_scales in ("conv", "xbc"):
        scales = calibrate(model, tokens, texts, args.length, 0.9995, progress=False, conv_scales=conv_scales)
        for mode in MODES:
            per_layer = sqnr_per_layer(model, QuantSpec(mode), scales, evaluation)
            result["sqnr_db"][f"{mode} conv_scales={conv_scales}"] = {
                "mean": statistics.fmean(per_layer), "min": min(per_layer), "max": max(per_layer)}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
