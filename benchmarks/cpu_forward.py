#!/usr/bin/env python
"""CPU time per batch of a mamba-130m-shaped forward: our MambaLM in each mode vs. transformers.

Both models hold the same random weights (mamba-130m's shapes: 24 layers, d_model 768, vocabulary
50280). Each repeat runs every implementation once, in turn, so that load from other processes on
a shared machine falls on all of them alike; the table gives the median and the fastest repeat.
The quantized modes use synthetic scales (their cost does not depend on the values).

Usage:  python benchmarks/cpu_forward.py [--batch 8] [--length 128] [--repeats 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402
from lm_eval_floatsim.quant import LayerScales, QuantSpec  # noqa: E402

MODES = ("fp", "int8", "same", "better")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true", help="time our model only")
    return parser.parse_args(argv)


def transformers_model():
    from transformers import MambaConfig as HFMambaConfig
    from transformers import MambaForCausalLM

    torch.manual_seed(0)
    config = HFMambaConfig(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16, initializer_range=0.02)
    return MambaForCausalLM(config).eval()


def our_model(reference) -> MambaLM:
    """MambaLM with the transformers model's weights (its names differ only in `embeddings`)."""
    model = MambaLM(MambaConfig(d_model=768, n_layer=24, vocab_size=50277)).eval()
    weights = {key.replace("backbone.embeddings.", "backbone.embedding."): t for key, t in reference.state_dict().items()}
    model.load_state_dict(weights)
    return model


def synthetic_scales(model: MambaLM) -> list[LayerScales]:
    scales = []
    for layer in model.backbone.layers:
        conv = layer.mixer.conv1d
        weight_scale = conv.weight.abs().max().item() / 127
        bias_scale = conv.bias.abs().max().item() / 127
        scales.append(LayerScales(input=4.0 / 127, output=2.0 / 127, weight=weight_scale, bias=bias_scale))
    return scales


def timed_runs(runners: dict, repeats: int) -> dict[str, list[float]]:
    for run in runners.values():
        run()  # warm-up: allocator, thread pool, lazy initialization
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return times


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    reference = transformers_model()
    model = our_model(reference)
    scales = synthetic_scales(model)
    ids = torch.randint(0, 50277, (args.batch, args.length), generator=torch.Generator().manual_seed(1))

    def ours(mode: str):
        spec = QuantSpec(mode)

        def run():
            model.quantize(spec, None if mode == "fp" else scales)
            with torch.no_grad():
                return model(ids)

        return run

    def theirs():
        with torch.no_grad():
            return reference(ids, use_cache=False).logits

    runners = {f"ours, mode={mode}": ours(mode) for mode in MODES}
    if not args.no_transformers:
        runners["transformers MambaForCausalLM"] = theirs
        logits, expected = ours("fp")(), theirs()
        parity = ((logits - expected).abs().max() / expected.abs().max()).item()
    times = timed_runs(runners, args.repeats)

    print(
        f"mamba-130m-shaped forward, batch {args.batch} x length {args.length}, float32, "
        f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs, "
        f"median (min) of {args.repeats} repeats after a warm-up, load average {os.getloadavg()[0]:.1f}"
    )
    baseline = statistics.median(times["transformers MambaForCausalLM"]) if not args.no_transformers else None
    print(f"{'implementation':34} {'median s':>9} {'min s':>7} {'speed-up':>9}")
    for name, values in times.items():
        median = statistics.median(values)
        speedup = f"{baseline / median:8.2f}x" if baseline else ""
        print(f"{name:34} {median:9.3f} {min(values):7.3f} {speedup:>9}")
    if not args.no_transformers:
        print(f"fp logits vs transformers: max|a-b|/max|b| = {parity:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
