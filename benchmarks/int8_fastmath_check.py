"""kernel_math=fast on a GPU against an nvcc -O3 --use_fast_math build of the INT8 kernel: how many
codes differ (at least 15M positions of realistic inputs), how many from `exact` and from the CPU's
emulation, the PTX the reference compiles to, and the Triton kernel's time in both arithmetics
against a device-to-device copy of the same bytes.

    python benchmarks/int8_fastmath_check.py --out DIR      (a CUDA GPU with nvcc)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_bench import timed_ms  # noqa: E402
from int8_fastmath_reference import SOURCE, FLAGS, build, floatsim_codes, realistic_inputs, reference_codes, tie_inputs  # noqa: E402

from lm_eval_floatsim.quant import QuantSpec, conv_silu  # noqa: E402


def differing(a: torch.Tensor, b: torch.Tensor) -> dict:
    diff = (a.int() - b.int()).abs()
    return {"positions": a.numel(), "differ": int((diff > 0).sum()), "max_diff": int(diff.max())}


def reference_ptx() -> str:
    """The epilogue's PTX: the kernel alone (without the torch launcher) compiled with the same flags."""
    kernel = re.sub(r"#include <torch/extension.h>\n", "", SOURCE.read_text()).split("torch::Tensor")[0]
    with tempfile.TemporaryDirectory() as folder:
        source = Path(folder) / "kernel.cu"
        source.write_text(kernel)
        subprocess.run(["nvcc", *FLAGS, "-arch=sm_90", "-ptx", str(source), "-o", str(source.with_suffix(".ptx"))], check=True)
        ptx = source.with_suffix(".ptx").read_text()
    return "\n".join(line.strip() for line in ptx.splitlines() if re.search(r"\b(fma|mul|add|ex2|rcp|div|cvt)\.", line))


def speed(batch=64, length=2048, channels=1536) -> dict:
    X, W, Bq, scales = realistic_inputs(batch, length, channels, seed=1)
    x = (X.float() * scales.input).half()
    w, b = W.float() * scales.weight, Bq.float() * scales.bias
    result = {"shape": [batch, length, channels], "dtype": "float16"}
    copy_source = torch.empty_like(x)
    result["copy_ms"] = timed_ms(lambda: copy_source.copy_(x), x.device, iters=30)
    for kernel_math in ("exact", "fast"):
        spec = QuantSpec("int8", kernel_math=kernel_math)
        result[f"{kernel_math}_ms"] = timed_ms(lambda: conv_silu(x, w, b, spec, scales), x.device, iters=30)  # warm-up compiles
        result[f"{kernel_math}_share_of_copy_bandwidth"] = result["copy_ms"] / result[f"{kernel_math}_ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    module = build(args.out / "build")
    report = {"device": torch.cuda.get_device_name(), "inputs": {}}
    cases = {"realistic": realistic_inputs, "realistic_without_outlier_channels": lambda *shape: realistic_inputs(*shape, outliers=False),
             "ties": tie_inputs}
    for name, make in cases.items():
        X, W, Bq, scales = make(8, 2048, 1024)
        reference = reference_codes(module, X, W, Bq, scales)
        fast, exact = floatsim_codes(X, W, Bq, scales, "fast"), floatsim_codes(X, W, Bq, scales, "exact")
        cpu_fast = floatsim_codes(X.cpu(), W.cpu(), Bq.cpu(), scales, "fast").cuda()
        cpu_exact = floatsim_codes(X.cpu(), W.cpu(), Bq.cpu(), scales, "exact").cuda()
        report["inputs"][name] = {
            "scales": dataclasses.asdict(scales),
            "mean_abs_code": float(reference.float().abs().mean()),
            "gpu_fast_vs_nvcc_fast_math": differing(fast, reference),
            "gpu_exact_vs_nvcc_fast_math": differing(exact, reference),
            "cpu_fast_vs_gpu_fast": differing(cpu_fast, fast),
            "cpu_fast_vs_nvcc_fast_math": differing(cpu_fast, reference),
            "cpu_exact_vs_gpu_exact": differing(cpu_exact, exact),
        }
    report["speed"] = speed()
    (args.out / "reference.ptx.txt").write_text(reference_ptx())
    (args.out / "int8_fastmath.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
