"""SASS instructions per value of the fused Conv1D+SiLU kernel's loops, compiled for sm_90
without a GPU (Triton's wheel carries ptxas and nvdisasm), for the launch the model makes at
B=64, L=2048, D=1536 with fp16 activations.

The quantized kernel is bound by the instructions it issues per value, not by memory
(docs/BENCHMARKS.md), so this count predicts its speed between GPU sessions:

    pip install triton==3.6.0 && python benchmarks/conv_instructions.py

Each program walks one of two loops: a full program's (every position real and inside, every
channel inside; in a quantized mode its weights bound |v|), without masks, and an edge program's.
Each is the largest backward branch of its kind without div_rn's range check (FCHK), i.e. not
`_program_exactly`'s.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from lm_eval_floatsim.kernels import conv_silu_triton as module  # noqa: E402

LENGTH, CHANNELS = 2048, 1536
MODES = {"fp": module.MODE_FP.value, "int8": module.MODE_INT8.value, "same/better": module.MODE_SIM.value}


def compiled(mode: int, stats: bool):
    """The kernel as `launch_conv_silu` launches it for x, a view of in_proj's fp16 output."""
    block_d, group, chunk, warps = module.launch_config(64, LENGTH, CHANNELS, mode != module.MODE_FP.value)
    pointers = {"x_ptr": "*fp16", "ctx_ptr": "*fp16", "w_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp16",
                "mask_ptr": "*fp16", "sums_ptr": "*fp64" if stats else "*fp16", "maxes_ptr": "*fp32" if stats else "*fp16"}  # fmt: skip
    integers = {"sx_b": LENGTH * 2 * CHANNELS, "sx_l": 2 * CHANNELS, "sx_d": 1, "sc_b": LENGTH * 2 * CHANNELS,
                "sc_l": 2 * CHANNELS, "sc_d": 1, "sw_d": 4, "sw_k": 1, "sb_d": 1, "so_b": LENGTH * CHANNELS,
                "so_l": CHANNELS, "so_d": 1, "sm_b": 0, "sm_l": 0, "length": LENGTH, "channels": CHANNELS}  # fmt: skip
    unroll, edge_unroll = module.unrolls(chunk, stats)
    switches = dict(
        MODE=mode, ROUNDING=0, OPERAND_ROUNDING=0, CLAMP=mode != module.MODE_FP.value, INPUT_BY_PAIR=True,
        OUTPUT_BY_PAIR=True, OUTPUT_FLOOR=False, HAS_CONTEXT=False, HAS_MASK=False, ZERO_PADDING=False, STATS=stats,
        BLOCK_D=block_d, GROUP=group, CHUNK=chunk, UNROLL=unroll, EDGE_UNROLL=edge_unroll,
    )
    signature, constants, attributes = {}, {}, {}
    for index, parameter in enumerate(module._conv_silu_kernel.params):
        name = parameter.name
        if name in pointers:
            signature[name], attributes[(index,)] = pointers[name], [["tt.divisibility", 16]]
        elif parameter.is_constexpr or integers.get(name) in (0, 1) and name != "length":
            signature[name], constants[(index,)] = "constexpr", switches.get(name, integers.get(name))
        elif name in integers:
            signature[name] = "i32"  # length is not specialized (do_not_specialize)
            if integers[name] % 16 == 0 and name != "length":
                attributes[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "fp32"
    options = dict(num_warps=warps, **module.COMPILE_OPTIONS)
    if stats:
        options["maxnreg"] = module.STATS_MAX_REGISTERS
    kernel = triton.compile(ASTSource(module._conv_silu_kernel, signature, constants, attributes),
                            target=GPUTarget("cuda", 90, 32), options=options)  # fmt: skip
    per_step = group * block_d // (32 * warps)
    return kernel, {"full": per_step * unroll, "edge": per_step * edge_unroll}


def sass(kernel) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
        return subprocess.run([nvdisasm, "-c", cubin.name], capture_output=True, text=True, check=True).stdout


def walk_loops(text: str) -> dict[str, list[str]]:
    """The instructions of the walks' loops (a label and a backward branch to it; the largest
    without div_rn's FCHK of each kind): "full" programs' loads are unpredicated, "edge" programs'
    are masked."""
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            pending.append(label.group(1))
            continue
        instruction = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if instruction:
            address = int(instruction.group(1), 16)
            labels.update((name, address) for name in pending)
            pending = []
            instructions.append((address, instruction.group(2)))
    loops = {"full": [], "edge": []}
    for address, text in instructions:
        branch = re.search(r"BRA.*`\((\.L_x_\d+)\)", text)
        if branch and labels.get(branch.group(1), address + 1) <= address:
            body = [i for a, i in instructions if labels[branch.group(1)] <= a <= address]
            loads = [i for i in body if " LDG" in f" {i}"]
            if not loads or any("FCHK" in i for i in body):
                continue
            kind = "edge" if any(i.startswith("@") for i in loads) else "full"
            if len(body) > len(loops[kind]):
                loops[kind] = body
    return loops


def main() -> None:
    print("| mode | statistics | programs | loop instructions | values per thread and turn | per value | most frequent |")
    print("|---|---|---|---:|---:|---:|---|")
    for name, mode in MODES.items():
        for stats in (False, True):
            kernel, values = compiled(mode, stats)
            for kind, body in walk_loops(sass(kernel)).items():
                ops = collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", i).split()[0] for i in body)
                top = ", ".join(f"{op} {count / values[kind]:g}" for op, count in ops.most_common(6))
                per_value = len(body) / values[kind]
                print(f"| {name} | {'yes' if stats else 'no'} | {kind} | {len(body)} | {values[kind]} | {per_value:.1f} | {top} |")


if __name__ == "__main__":
    main()
