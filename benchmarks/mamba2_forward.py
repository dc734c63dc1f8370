#!/usr/bin/env python
"""Time per batch of a mamba2-130m-shaped forward (24 layers, d_model 768, d_state 128, headdim 64,
one group, vocabulary 50288): our MambaLM in fp and int8 against transformers' Mamba2ForCausalLM
and, on CUDA with mamba_ssm installed, mamba_ssm's MambaLMHeadModel, all with the same random
weights. Interleaved repeats; median and fastest. int8 uses absmax scales (its cost does not depend
on the values).

Usage:  python benchmarks/mamba2_forward.py --device cpu --batch 1 --length 128
        python benchmarks/mamba2_forward.py --device cuda --batch 64 --length 128 --dtype float16 [--profile "ours int8"]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_eval_floatsim.calibration import scale_from_absmax  # noqa: E402
from lm_eval_floatsim.loading import to_mamba_ssm_names  # noqa: E402
from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402
from lm_eval_floatsim.quant import LayerScales, QuantSpec  # noqa: E402

SHAPE = dict(d_model=768, n_layer=24, vocab_size=50288, d_state=128, headdim=64, ngroups=1)


def transformers_model():
    from transformers import Mamba2Config, Mamba2ForCausalLM

    config = Mamba2Config(hidden_size=SHAPE["d_model"], num_hidden_layers=SHAPE["n_layer"], vocab_size=SHAPE["vocab_size"],
                          state_size=SHAPE["d_state"], head_dim=SHAPE["headdim"], num_heads=2 * SHAPE["d_model"] // SHAPE["headdim"],
                          n_groups=SHAPE["ngroups"], expand=2, tie_word_embeddings=True, initializer_range=0.02)
    torch.manual_seed(0)
    return Mamba2ForCausalLM(config).eval()


def ours_from(reference) -> MambaLM:
    config = MambaConfig(**SHAPE, mixer="Mamba2", mixer_rms_eps=1e-5, pad_vocab_size_multiple=1)  # transformers: layer_norm_epsilon
    model = MambaLM(config).eval()
    missing, unexpected = model.load_state_dict(to_mamba_ssm_names(dict(reference.state_dict()), "transformers", config, "benchmark"), strict=False)
    assert missing == ["lm_head.weight"] and not unexpected, (missing, unexpected)  # lm_head: tied to the embedding
    return model


def mamba_ssm_model(reference, device, dtype):
    from mamba_ssm.models.config_mamba import MambaConfig as SSMConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = SSMConfig(d_model=SHAPE["d_model"], n_layer=SHAPE["n_layer"], vocab_size=SHAPE["vocab_size"], pad_vocab_size_multiple=16,
                       ssm_cfg={"layer": "Mamba2", "d_state": SHAPE["d_state"], "headdim": SHAPE["headdim"], "use_mem_eff_path": False})
    model = MambaLMHeadModel(config, device=device, dtype=dtype).eval()
    state = to_mamba_ssm_names(dict(reference.state_dict()), "transformers", MambaConfig(**SHAPE, mixer="Mamba2"), "benchmark")
    model.load_state_dict(state, strict=False)
    return model


def absmax_scales(model: MambaLM) -> list[LayerScales]:
    """Fixed activation scales and the weights' absmax ones, as calibration makes them (a zero conv
    bias, as transformers initialises it, gets scale 1: a scale of 0 is not one the kernel takes)."""
    scales = []
    for layer in model.backbone.layers:
        conv = layer.mixer.conv1d
        w, b = (scale_from_absmax(t.abs().max().item()) for t in (conv.weight, conv.bias))
        scales.append(LayerScales(4.0 / 127, 2.0 / 127, w, b))
    return scales


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", metavar="NAME", help="also print the top kernels of one run of NAME ('ours int8', ...)")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    reference = transformers_model()
    ours = ours_from(reference).to(args.device, dtype)
    ids = torch.randint(0, SHAPE["vocab_size"], (args.batch, args.length), device=args.device)
    scales = absmax_scales(ours)
    runs = {
        "ours fp": lambda: ours.quantize(QuantSpec("fp"), None)(ids),
        "ours int8": lambda: ours.quantize(QuantSpec("int8"), scales)(ids),
    }
    hf = reference.to(args.device, dtype)
    runs["transformers"] = lambda: hf(ids, use_cache=False).logits
    if args.device.startswith("cuda"):
        try:
            ssm = mamba_ssm_model(reference, args.device, dtype)
            runs["mamba_ssm"] = lambda: ssm(ids).logits
        except Exception as error:  # mamba_ssm not installed
            print(f"mamba_ssm: {type(error).__name__}: {error}", file=sys.stderr)
    with torch.no_grad():  # the same model: logits agree (fp32: ~1e-6 relative; fp16: ~1e-3)
        ours_logits, hf_logits = runs["ours fp"]().float(), runs["transformers"]().float()
    agreement = ((ours_logits - hf_logits).abs().max() / hf_logits.abs().max()).item()
    times = {name: [] for name in runs}
    with torch.no_grad():
        for repeat in range(args.repeats + 1):
            for name, run in runs.items():
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                start = time.perf_counter()
                run()
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                if repeat:  # the first round warms up (compiles kernels)
                    times[name].append(1000 * (time.perf_counter() - start))
    result = {"device": args.device, "dtype": args.dtype, "batch": args.batch, "length": args.length,
              "max_relative_difference_vs_transformers": agreement,
              "ms": {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}}
    print(json.dumps(result, indent=2))
    if args.profile:
        print_profile(runs[args.profile], args.device)


def print_profile(run, device: str) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad(), profile(activities=activities) as prof:
        run()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
    sort = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=15), file=sys.stderr)


if __name__ == "__main__":
    main()
