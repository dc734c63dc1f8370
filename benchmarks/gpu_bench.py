#!/usr/bin/env python
"""GPU speed of the simulation: the fused Conv1D+SiLU kernel and whole mamba-130m-shaped forwards,
against mamba-ssm and transformers, on the same random weights.

Sections (all by default; --sections picks):
  env      machine, versions, device-to-device copy bandwidth (the memory-traffic ceiling)
  codes    kernel codes vs the CPU reference on large random inputs: how many differ, per mode
  conv     the Conv1D+SiLU alone at B=64, D=1536, L=2048 (fp16, x a strided view of in_proj's
           output): ms, GB/s moved, % of copy bandwidth; configurations; PyTorch path; causal-conv1d
  scan     the selective scan: the Triton kernel vs mamba-ssm's (with the transposes it needs)
  model    ms per batch of a B=64, L=128 forward: mamba-ssm's MambaLMHeadModel (fused fast path),
           transformers' MambaForCausalLM (PyTorch path), and ours in each mode, dumps (recorder)
           off and on, eager and replayed from a CUDA graph as lm_model runs it
Results go to OUT/gpu_bench.json; the tables are printed last.

Usage:  python benchmarks/gpu_bench.py [--out DIR] [--sections env,codes,conv,scan,model]
        [--batch 64 --length 128] [--device cuda]    (--device cpu: a smoke run of the script)
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lm_eval_floatsim import kernels  # noqa: E402
from lm_eval_floatsim.mamba import MambaConfig, MambaLM  # noqa: E402
from lm_eval_floatsim.quant import LayerScales, QuantSpec, conv_silu  # noqa: E402
from lm_eval_floatsim.recorder import Recorder  # noqa: E402

MODES = ("fp", "int8", "same", "better")
SPECS = {mode: QuantSpec(mode) for mode in MODES}
SECTIONS = ("env", "model", "conv", "scan", "codes")
# (BLOCK_D, GROUP, CHUNK, num_warps) of the conv section's configuration sweep
CONV_CONFIGS = [(128, 4, 32, 4), (32, 4, 32, 1), (128, 8, 32, 4), (64, 4, 32, 2), (32, 8, 32, 2), (256, 2, 32, 4), (128, 2, 32, 4)]
UNROLLS = (2, 4)  # positions per turn of full programs' conv loop, measured against each other in these configurations
UNROLL_CONFIGS = [(32, 4, 32, 1), (128, 4, 32, 4)]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=".")
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--conv-shape", default="64,2048,1536", help="B,L,D of the conv section")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--conv-sweeps", action=argparse.BooleanOptionalAction, default=True,
                        help="the conv section's launch-configuration and UNROLL sweeps (--no-conv-sweeps: the kernel's own configuration alone)")
    parser.add_argument("--conv-rounds", type=int, default=5,
                        help="interleaved rounds of the conv section's per-mode rows, each row's median and range")
    parser.add_argument("--layers", type=int, default=24)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ timing


def timed_ms(fn, device, iters=20, warmup=3) -> float:
    """Median ms of one call, each call timed alone (as a harness that reads each batch's result)."""
    for _ in range(warmup):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_timed_ms(fn, device, iters=20, launches=24) -> float:
    """Median GPU ms of one call, from replays of a CUDA graph of `launches` calls (as a graphed
    forward runs a layer's kernels): a kernel timed alone between two events also counts the
    host's time to launch it (0.1 ms for the conv kernel at B=64, L=2048)."""
    if device.type != "cuda":
        return timed_ms(fn, device, iters)
    fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(launches):
            fn()
    return timed_ms(graph.replay, device, iters) / launches


def copy_bandwidth_gbs(device) -> float:
    """Device-to-device copy of 1 GiB, bytes read plus written per second (the bandwidth ceiling)."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = timed_ms(lambda: dst.copy_(src), device, iters=20)
    return 2 * src.numel() * src.element_size() / ms / 1e6


# ------------------------------------------------------------------ inputs


def conv_case(batch, length, channels, device, dtype=torch.float16, seed=0):
    """x as the x half of a random in_proj output (batch, length, 2*channels), a conv weight and
    bias, and scales calibrated on them as SPEC §2 says (s_y from a high quantile of |y|)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    xz = (torch.randn(batch, length, 2 * channels, generator=g) * 2).to(device=device, dtype=dtype)
    w = (torch.randn(channels, 4, generator=g) * 0.5).to(device)
    b = (torch.randn(channels, generator=g) * 0.3).to(device)
    x = xz[..., :channels]
    sample = x[: min(batch, 4), : min(length, 512)].float()
    y = conv_silu(sample, w, b, QuantSpec("fp")).float()
    scales = LayerScales(
        input=x.abs().max().item() / 127,
        output=torch.quantile(y.abs().flatten()[:1_000_000].cpu(), 0.9995).item() / 127,
        weight=w.abs().max().item() / 127,
        bias=b.abs().max().item() / 127,
    )
    return x, w, b, scales


def declines(*args, **kwargs):
    """A fused kernel's dispatch that always declines: the caller runs its PyTorch path."""
    return None


def pytorch_conv():
    """Run quant.conv_silu's PyTorch path even on CUDA (the fused kernel declines every call)."""
    return mock.patch.object(kernels, "fused_conv_silu", declines)


def mamba_ssm_scan_instead():
    """Run mamba-ssm's selective scan (with the transposing copies it needs) where the model would
    run the Triton scan."""
    from lm_eval_floatsim import selective_scan

    return mock.patch.object(selective_scan, "fused_selective_scan", declines)


def padding_mask_like(x):
    """A (batch, length) padding mask whose last row is 3/4 padding, as lm-eval's right-padded
    batches have."""
    mask = torch.ones(x.shape[:2], dtype=torch.long, device=x.device)
    mask[-1, x.shape[1] // 4 :] = 0
    return mask


def statistics_only(n_layer, device) -> Recorder:
    """A Recorder past its snapshot batch: observers only accumulate statistics."""
    recorder = Recorder(n_layer, device=device)
    recorder.arm()
    for layer in range(n_layer):
        recorder.keep_values(layer, None, None, None)
    return recorder


def conv_observer(stats: bool, device, mask=None):
    """A layer's statistics-only observer where the row records statistics, else None."""
    return statistics_only(1, device).layer(0, mask) if stats else None


def kernel_name(mode: str, stats: bool) -> str:
    return f"{mode} kernel{' + statistics' if stats else ''}"


# ------------------------------------------------------------------ sections


def section_env(args, device, results):
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    for name in ("mamba_ssm", "causal_conv1d", "transformers"):
        with contextlib.suppress(Exception):
            info[name] = __import__(name).__version__
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    info["copy_gbs"] = copy_bandwidth_gbs(device)
    results["env"] = info
    print(json.dumps(info), flush=True)


def section_codes(args, device, results):
    """Kernel vs CPU reference on 8 x 512 x 1536 random values: codes that differ, per mode and
    dtype. int8 codes can differ only where libdevice's expf and the CPU's differ in the last bit
    at a rounding tie; better's fine scale puts many more values near a tie."""
    rows = []
    for dtype in (torch.float32, torch.float16):
        x, w, b, scales = conv_case(8, 512, 1536, device, dtype=dtype, seed=1)
        for mode in MODES[1:]:
            spec = SPECS[mode]
            got = conv_silu(x, w, b, spec, scales).cpu()
            want = conv_silu(x.cpu(), w.cpu(), b.cpu(), spec, scales)
            step = spec.effective_scale(scales.output)
            diff = (got.double() / step).round() - (want.double() / step).round()
            differing = int((got != want).sum())
            rows.append(
                {
                    "dtype": str(dtype).replace("torch.", ""),
                    "mode": mode,
                    "values": got.numel(),
                    "outputs_differing": differing,
                    "max_code_diff": float(diff.abs().max()),
                }
            )
            print(rows[-1], flush=True)
    results["codes"] = rows


def section_conv(args, device, results):
    batch, length, channels = (int(v) for v in args.conv_shape.split(","))
    x, w, b, scales = conv_case(batch, length, channels, device)
    moved = 2 * batch * length * channels * x.element_size()  # x read once, output written once
    copy_gbs = results.get("env", {}).get("copy_gbs") or copy_bandwidth_gbs(device)
    floor_ms = moved / copy_gbs / 1e6
    from lm_eval_floatsim.kernels import conv_silu_triton as module
    from lm_eval_floatsim.kernels.conv_silu_triton import conv_silu_triton, launch_config

    rows = []

    def add(name, ms, config=None, bytes_moved=moved, ms_range=None):
        floor = bytes_moved / copy_gbs / 1e6
        rows.append({"name": name, "ms": ms, "gbs": bytes_moved / ms / 1e6, "of_copy": floor / ms, "config": config})
        if ms_range:
            rows[-1].update(ms_range=list(ms_range), of_copy_range=[floor / ms_range[1], floor / ms_range[0]])
        print(rows[-1], flush=True)

    small = conv_case(args.batch, args.length, channels, device)
    if args.conv_sweeps:
        conv_sweeps(args, (x, w, b, scales), small, device, add)
    rows_in_rounds(args, (x, w, b, scales), device, add)
    mask = padding_mask_like(small[0])
    for mode in MODES:
        for stats in (False, True):
            observer = conv_observer(stats, device, mask)
            run = lambda: conv_silu_triton(*small[:3], SPECS[mode], small[3], observer, None, mask)
            config = launch_config(args.batch, args.length, channels, SPECS[mode].quantized)
            name = f"{kernel_name(mode, stats)}, B={args.batch} L={args.length} (the model's batch and mask)"
            add(name, graph_timed_ms(run, device, args.iters), list(config), 2 * small[0].numel() * small[0].element_size())
    with pytorch_conv():
        add("int8 PyTorch path", timed_ms(lambda: conv_silu(x, w, b, SPECS["int8"], scales), device, 5, 1))
    with contextlib.suppress(ImportError):
        from causal_conv1d import causal_conv1d_fn

        xt, wh, bh = x.transpose(1, 2), w.half(), b.half()  # channels-last as (batch, channels, length)
        run = lambda: causal_conv1d_fn(xt, wh, bh, activation="silu")
        add("causal-conv1d fp16 conv+SiLU (unquantized)", graph_timed_ms(run, device, args.iters, 4))

    results["conv"] = {"shape": [batch, length, channels], "bytes": moved, "floor_ms": floor_ms, "rows": rows,
                       "compiled": compiled_report(module._conv_silu_kernel)}  # fmt: skip


def conv_sweeps(args, case, small, device, add):
    """The kernel in other launch configurations, and full programs' UNROLL against each other."""
    from lm_eval_floatsim.kernels import conv_silu_triton as module
    from lm_eval_floatsim.kernels.conv_silu_triton import conv_silu_triton, launch_config

    x, w, b, scales = case
    for mode, stats in (("int8", False), ("same", False), ("same", True)):
        default = launch_config(*x.shape, SPECS[mode].quantized)
        for config in [default] + [c for c in CONV_CONFIGS if c != default]:
            observer = conv_observer(stats, device)
            run = lambda: conv_silu_triton(x, w, b, SPECS[mode], scales, observer, config=config)
            add(kernel_name(mode, stats), graph_timed_ms(run, device, args.iters, 4), list(config))
    default_unroll = module.UNROLL
    for unroll in UNROLLS:  # positions per turn of full programs' loop, against the launch configuration
        module.UNROLL = unroll
        for mode, stats in (("int8", False), ("int8", True), ("same", False), ("better", False), ("better", True)):
            for config in UNROLL_CONFIGS:
                observer = conv_observer(stats, device)
                run = lambda: conv_silu_triton(x, w, b, SPECS[mode], scales, observer, config=config)
                add(f"{kernel_name(mode, stats)}, UNROLL={unroll}", graph_timed_ms(run, device, args.iters, 4), list(config))
                short = (config[0], config[1], 16, config[3])
                run = lambda: conv_silu_triton(*small[:3], SPECS[mode], small[3], observer, config=short)
                add(f"{kernel_name(mode, stats)}, UNROLL={unroll}, B={args.batch} L={args.length}",
                    graph_timed_ms(run, device, args.iters), list(short), 2 * small[0].numel() * small[0].element_size())
    module.UNROLL = default_unroll


def rows_in_rounds(args, case, device, add):
    """Every mode, with and without statistics, in the launch configuration the model runs: timed in
    --conv-rounds interleaved rounds (a slower moment of a shared machine touches every row alike);
    each row's median and range."""
    from lm_eval_floatsim.kernels.conv_silu_triton import conv_silu_triton, launch_config

    x, w, b, scales = case
    variants = [(mode, stats) for mode in MODES for stats in (False, True)]
    times = {variant: [] for variant in variants}
    for _ in range(args.conv_rounds):
        for mode, stats in variants:
            observer = conv_observer(stats, device)
            run = lambda: conv_silu_triton(x, w, b, SPECS[mode], scales, observer)
            times[mode, stats].append(graph_timed_ms(run, device, args.iters, 4))
    for (mode, stats), ms in times.items():
        config = launch_config(*x.shape, SPECS[mode].quantized)
        add(f"{kernel_name(mode, stats)}, {len(ms)} rounds", statistics.median(ms), list(config),
            ms_range=(min(ms), max(ms)))


def compiled_report(jit_function) -> list:
    """Registers, spills and PTX float instructions of each compiled variant of a Triton kernel:
    the *.rn multiplies and adds are the ones written as mul_rn/add_rn (no contraction into FMA);
    the FMAs left belong to exp and to the statistics."""
    report = []
    with contextlib.suppress(Exception):  # Triton's cache layout is not a stable API
        for kernel_cache, *_ in jit_function.device_caches.values():
            for compiled in kernel_cache.values():
                ptx = compiled.asm.get("ptx", "")
                constants = getattr(getattr(compiled, "src", None), "constants", {})
                report.append({
                    "constants": {str(k): str(v) for k, v in dict(constants).items() if not str(v).startswith("<")},
                    "num_warps": compiled.metadata.num_warps,
                    "n_regs": compiled.n_regs, "n_spills": compiled.n_spills,
                    **{op: ptx.count(op) for op in ("fma.rn.f32", "mul.rn.f32", "add.rn.f32", "div.rn.f32", "mul.f32", "add.f32")},
                })  # fmt: skip
    return report


def section_scan(args, device, results):
    from lm_eval_floatsim.kernels.selective_scan_triton import launch_selective_scan
    from lm_eval_floatsim.selective_scan import mamba_ssm_scan

    rows = []
    for batch, length in ((args.batch, args.length), (64, 2048), (8, 2048), (1, 2048)):
        d_inner, d_state = 1536, 16
        g = torch.Generator(device="cpu").manual_seed(2)
        rand = lambda *shape: torch.randn(*shape, generator=g).to(device)
        xz = rand(batch, length, 2 * d_inner).half()
        x_dbl = rand(batch, length, 48 + 2 * d_state).half()
        case = dict(
            u=rand(batch, length, d_inner).half(),
            delta=(rand(batch, length, d_inner) - 1).half(),
            A=-torch.exp(rand(d_inner, d_state) * 0.5),
            B=x_dbl[..., 48 : 48 + d_state],
            C=x_dbl[..., 48 + d_state :],
            D=rand(d_inner),
            z=xz[..., d_inner:],
            delta_bias=rand(d_inner) * 0.5,
        )
        row = {"batch": batch, "length": length}
        row["triton_ms"] = timed_ms(lambda: launch_selective_scan(**case), device, args.iters)
        if mamba_ssm_scan() is not None:
            from lm_eval_floatsim.selective_scan import selective_scan

            with mamba_ssm_scan_instead():
                row["mamba_ssm_ms"] = timed_ms(lambda: selective_scan(**case), device, args.iters)
                theirs = selective_scan(**case).float()
            ours = launch_selective_scan(**case).float()
            row["max_rel_diff"] = ((ours - theirs).abs().max() / theirs.abs().max()).item()
        rows.append(row)
        print(row, flush=True)
    results["scan"] = rows


# ------------------------------------------------------------------ whole models


def random_model(layers, device, dtype=torch.float16):
    """mamba-130m's shape with random weights, in mamba_ssm's dtypes: fp16, A_log and D in fp32."""
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=768, n_layer=layers, vocab_size=50277))
    with torch.no_grad():
        model.backbone.embedding.weight.normal_(std=0.02)  # mamba_ssm's init: moderate logits
        for layer in model.backbone.layers:  # dt in mamba's range, so that the scan does real work
            layer.mixer.dt_proj.bias.uniform_(-4.6, -2.3)
    model = model.to(device=device, dtype=dtype).eval()
    for layer in model.backbone.layers:
        layer.mixer.A_log.data = layer.mixer.A_log.data.float()
        layer.mixer.D.data = layer.mixer.D.data.float()
    return model


def calibrated_scales(model, ids) -> list[LayerScales]:
    """Per layer: s_x from in_proj's x half, s_y from |y| (0.9995 quantile), s_w and s_b from the
    weights (SPEC §2), on one batch: realistic codes for timing."""
    layers = model.backbone.layers
    x_max, y_q = [0.0] * len(layers), [0.0] * len(layers)
    hooks = [
        layer.mixer.in_proj.register_forward_hook(
            lambda module, inp, out, i=i: x_max.__setitem__(i, out[..., : out.shape[-1] // 2].abs().max().item())
        )
        for i, layer in enumerate(layers)
    ]

    class Observe:
        def layer(self, i, mask):
            def observer(before, after, codes, clamped):
                y_q[i] = torch.quantile(before.abs().flatten()[:1_000_000].float().cpu(), 0.9995).item()

            return observer

    model.recorder = Observe()
    with torch.no_grad(), pytorch_conv():
        model(ids)
    model.recorder = None
    for hook in hooks:
        hook.remove()
    return [
        LayerScales(
            input=x_max[i] / 127,
            output=y_q[i] / 127,
            weight=layer.mixer.conv1d.weight.abs().max().item() / 127,
            bias=layer.mixer.conv1d.bias.abs().max().item() / 127,
        )
        for i, layer in enumerate(layers)
    ]


def mamba_ssm_model(model, device):
    from mamba_ssm.models.config_mamba import MambaConfig as SsmConfig
    from mamba_ssm.models.mixer_seq_simple import MambaLMHeadModel

    config = SsmConfig(d_model=768, n_layer=model.config.n_layer, vocab_size=50277, ssm_cfg={}, rms_norm=True,
                       residual_in_fp32=True, fused_add_norm=True, pad_vocab_size_multiple=8)  # fmt: skip
    theirs = MambaLMHeadModel(config, device=device, dtype=torch.float16)
    theirs.load_state_dict(model.state_dict())
    return theirs.eval()


def transformers_model(model, device, modeling):
    """transformers' MambaForCausalLM with our weights (its names: `embeddings`)."""
    hf_config = modeling.MambaConfig(
        vocab_size=model.config.padded_vocab_size, hidden_size=768, state_size=16,
        num_hidden_layers=model.config.n_layer, expand=2, conv_kernel=4, use_bias=False,
        use_conv_bias=True, time_step_rank=48, residual_in_fp32=True, layer_norm_epsilon=1e-5,
        tie_word_embeddings=True,
    )  # fmt: skip
    theirs = modeling.MambaForCausalLM(hf_config).to(device=device, dtype=torch.float16)
    state = {key.replace("backbone.embedding.", "backbone.embeddings."): value for key, value in model.state_dict().items()}
    missing, unexpected = theirs.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return theirs.eval()


def transformers_pytorch_path():
    """transformers' Mamba module imported while mamba-ssm and causal-conv1d look absent, so that it
    binds its PyTorch path (it picks the kernels once, at import)."""
    blocked = {}
    for name in ("mamba_ssm", "causal_conv1d"):
        if name not in sys.modules:
            blocked[name] = sys.modules[name] = None
    try:
        from transformers.models.mamba import modeling_mamba
    finally:
        for name in blocked:
            del sys.modules[name]
    return modeling_mamba


def section_model(args, device, results):
    modeling = transformers_pytorch_path()
    model = random_model(args.layers, device)
    ids = torch.randint(0, 50277, (args.batch, args.length), device=device)
    scales = calibrated_scales(model, ids)
    rows = []

    def add(name, fn, iters=args.iters, **extra):
        with torch.no_grad():
            ms = timed_ms(fn, device, iters)
        rows.append({"name": name, "ms": ms, **extra})
        print(rows[-1], flush=True)

    with torch.no_grad():
        try:
            reference_logits = time_mamba_ssm(model, ids, device, add)
        except ImportError as error:
            reference_logits = None
            print(f"mamba-ssm not available: {error}", flush=True)
        time_transformers(model, ids, device, modeling, add, iters=max(3, args.iters // 4))
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if reference_logits is not None:
            ours = model.quantize(QuantSpec("fp"), None)(ids).float()
            results["fp_vs_mamba_ssm_max_abs_logit_diff"] = (ours - reference_logits).abs().max().item()
            results["logit_scale"] = reference_logits.abs().max().item()

    # (label, context, graphed, modes): the PyTorch conv and mamba-ssm's scan show what the
    # fused kernels buy; "eager" is the model as it runs by default.
    variants = [
        ("eager", contextlib.nullcontext, False, MODES),
        ("CUDA graph (lm_eval's path)", contextlib.nullcontext, True, MODES),
        ("CUDA graph, padding mask", contextlib.nullcontext, "masked", MODES),
        ("eager, PyTorch conv", pytorch_conv, False, ("int8",)),
        ("eager, mamba-ssm scan", mamba_ssm_scan_instead, False, ("int8",)),
    ]
    for mode in MODES:
        model.quantize(SPECS[mode], scales if mode != "fp" else None)
        for label, context, graphed, modes in variants:
            if mode not in modes:
                continue
            for dumps in (False, True):
                with context():
                    add(f"ours {mode}, {label}, dumps {'on' if dumps else 'off'}", forward(model, ids, dumps, graphed, device),
                        mode=mode, variant=label, dumps=dumps)  # fmt: skip
        model.recorder = None
    results["model"] = {"batch": args.batch, "length": args.length, "rows": rows}


def time_mamba_ssm(model, ids, device, add):
    """Time mamba-ssm's model on our weights; its logits, to check that both compute the same."""
    theirs = mamba_ssm_model(model, device)
    try:
        import causal_conv1d  # noqa: F401

        path = "fused fast path"
    except ImportError:
        path = "without causal-conv1d: selective-scan kernel, PyTorch conv1d"
    add(f"mamba-ssm MambaLMHeadModel ({path})", lambda: theirs(ids))
    return theirs(ids).logits.float()


def time_transformers(model, ids, device, modeling, add, iters):
    hf = transformers_model(model, device, modeling)
    add("transformers MambaForCausalLM (PyTorch path)", lambda: hf(ids), iters=iters)


def forward(model, ids, dumps, graphed, device):
    """A callable running one forward: with a recorder past its snapshot batch when dumps are on
    (the snapshot batch itself runs first, untimed), from a CUDA graph when graphed; "masked":
    with a padding mask whose last row is 3/4 padding, as lm-eval's right-padded batches have."""
    model.recorder = Recorder(model.config.n_layer, device=device) if dumps else None
    if dumps:
        model.recorder.arm()
        with torch.no_grad():
            model(ids)  # the snapshot batch
    if graphed and device.type == "cuda":
        from lm_eval_floatsim.kernels.fast_path import GraphedForward

        runner = GraphedForward(model, capture_after=1)
        if graphed == "masked":
            mask = padding_mask_like(ids)
            return lambda: runner(ids, mask)
        return lambda: runner(ids)
    return lambda: model(ids)


# ------------------------------------------------------------------ report


def print_tables(results):
    env = results.get("env", {})
    print(f"\n== {env.get('gpu', '?')}, {env.get('date', '?')}, copy bandwidth {env.get('copy_gbs', 0):.0f} GB/s")
    if "codes" in results:
        print("\n| dtype | mode | values | outputs differing from CPU | max code diff |\n|---|---|---|---|---|")
        for r in results["codes"]:
            print(f"| {r['dtype']} | {r['mode']} | {r['values']} | {r['outputs_differing']} | {r['max_code_diff']:g} |")
    if "conv" in results:
        conv = results["conv"]
        print(f"\nConv1D+SiLU, B,L,D = {conv['shape']}, {conv['bytes'] / 1e6:.0f} MB moved, floor {conv['floor_ms']:.3f} ms")
        print("| variant | config | ms | GB/s | % of copy bw |\n|---|---|---|---|---|")
        for r in conv["rows"]:
            spread = f" ({100 * r['of_copy_range'][0]:.1f}–{100 * r['of_copy_range'][1]:.1f}%)" if "of_copy_range" in r else ""
            print(f"| {r['name']} | {r['config'] or ''} | {r['ms']:.3f} | {r['gbs']:.0f} | {100 * r['of_copy']:.1f}%{spread} |")
    if "scan" in results:
        print("\n| scan B | L | Triton ms | mamba-ssm ms (+ transposes) | max rel diff |\n|---|---|---|---|---|")
        for r in results["scan"]:
            print(f"| {r['batch']} | {r['length']} | {r['triton_ms']:.3f} | {r.get('mamba_ssm_ms', math.nan):.3f} | {r.get('max_rel_diff', math.nan):.1e} |")
    if "model" in results:
        rows = results["model"]["rows"]
        base = next((r["ms"] for r in rows if r["name"].startswith("mamba-ssm")), None)
        print(f"\nForward, B={results['model']['batch']}, L={results['model']['length']}, fp16")
        print("| model | ms/batch | mamba-ssm time / this |\n|---|---|---|")
        for r in rows:
            print(f"| {r['name']} | {r['ms']:.2f} | {base / r['ms']:.2f}x |" if base else f"| {r['name']} | {r['ms']:.2f} | |")
        if "fp_vs_mamba_ssm_max_abs_logit_diff" in results:
            print(f"ours fp vs mamba-ssm: max |logit diff| {results['fp_vs_mamba_ssm_max_abs_logit_diff']:.3g} (logits up to {results['logit_scale']:.3g})")


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    results = {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sections = {"env": section_env, "codes": section_codes, "conv": section_conv, "scan": section_scan, "model": section_model}
    for name in args.sections.split(","):
        start = time.perf_counter()
        try:
            sections[name](args, device, results)
        except Exception as error:  # one failing section must not cost the others' numbers
            import traceback

            traceback.print_exc()
            results.setdefault("errors", {})[name] = repr(error)
        print(f"-- section {name}: {time.perf_counter() - start:.1f} s", flush=True)
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=1))
    print_tables(results)
    return 1 if "errors" in results else 0


if __name__ == "__main__":
    sys.exit(main())
