"""`lm-eval-floatsim dump`: the user's original workflow, without an lm-eval task.

Load the model, calibrate once (or load `--scales`), run one forward pass over a fixed text in each
of `--modes` with those same scales, write each mode's dump file into `--dump-dir`, then run the
checks of `lm-eval-floatsim check` over the files written; the exit code is the checks'.

The text is `--text`, else the first sample of the calibration data, truncated like calibration
samples to `calib_seqlen` tokens. The scales are also saved as `scales.json` beside the dumps, so
the folder says which scales its dumps used (their `config.scales_sha256`) and `--scales` can
reuse them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Optional, Sequence

from .arguments import DEFAULT_PRETRAINED, parse_model_args
from .errors import ArgumentError, InputError
from .modes import QuantSpec, is_quantized, mode_names, parse_mode_list

DEFAULT_MODES = "int8,same,better"
SCALES_FILE = "scales.json"
# Options that are model arguments of `mamba_floatsim`, validated by `arguments.parse_model_args`.
MODEL_OPTIONS = (
    "pretrained", "revision", "tokenizer", "divisor", "rounding", "clamp", "layers", "asic_dtype", "kernel_math", "operand_rounding", "dump_dir", "dump_n", "calib_data",
    "calib_samples", "calib_seqlen", "percentile", "conv_scales", "scales", "dtype", "device",
)


def add_arguments(parser) -> None:
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"comma-separated, each once, of {', '.join(mode_names())} (default {DEFAULT_MODES})")
    parser.add_argument("--text", help="the text of the forward pass (default: the first calibration sample)")
    parser.add_argument("--pretrained", help=f"hub id or local folder (default {DEFAULT_PRETRAINED})")
    parser.add_argument("--revision", help="branch, tag or commit of a hub id (default: its default branch)")
    parser.add_argument("--tokenizer", help="tokenizer hub id or folder (default: the model's)")
    parser.add_argument("--divisor", help="better scale = output scale / divisor (default 2025)")
    parser.add_argument("--rounding", help="output rounding of the float simulation: half_away (default) or half_even")
    parser.add_argument("--clamp", help="better's code range: range (default, the int8 real range) or none")
    parser.add_argument("--layers", help="the blocks the modes apply to, e.g. 0-5+12+20-23 (default: every block)")
    parser.add_argument("--asic-dtype", help="format of the float simulation's arithmetic: float32 (default), float16 or bfloat16")
    parser.add_argument("--kernel-math", help="the INT8 kernel's epilogue: exact (default) or fast (as nvcc --use_fast_math builds it)")
    parser.add_argument("--operand-rounding", help="rounding of the conv weight and bias codes: half_away (default) or half_even")
    parser.add_argument("--dump-dir", help="folder of the dump files (default yzCheckFloatSim)")
    parser.add_argument("--dump-n", help="values dumped per layer (default 10)")
    parser.add_argument("--calib-data", help="calibration data: .txt/.jsonl file or datasets name (default: the Pile validation split)")
    parser.add_argument("--calib-samples", help="calibration samples (default 512)")
    parser.add_argument("--calib-seqlen", help="tokens per calibration sample and of the text (default 512)")
    parser.add_argument("--percentile", help="quantile of |y| per calibration sample (default 0.9995)")
    parser.add_argument("--conv-scales", help="conv: one input and one output scale per conv (default); xbc: one per segment x, B, C (Mamba-2)")
    parser.add_argument("--scales", help="a scales file to use instead of calibrating")
    parser.add_argument("--dtype", help="float32 (default), float16, bfloat16 or auto (float16 on CUDA)")
    parser.add_argument("--device", help="cpu, cuda, cuda:N (default: cuda when available)")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")


def run(args) -> int:
    modes = parse_mode_list(args.modes, "modes")
    if args.text is not None and not args.text.strip():
        raise ArgumentError("text", args.text, "a non-empty text")
    options = parse_model_args({name: getattr(args, name) for name in MODEL_OPTIONS})
    explicit = options.calibration

    import torch

    from .api import load_model
    from .checks import check_dumps, load_dumps, report

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    first_quantized = next((mode for mode in modes if is_quantized(mode)), modes[0])
    loaded = load_model(
        options.pretrained, mode=first_quantized, divisor=options.divisor, rounding=options.rounding,
        clamp=options.clamp, scales=options.scales, dtype=options.dtype, device=device,
        tokenizer=options.tokenizer, revision=options.revision, **explicit,
    )
    text, source = forward_text(args.text, loaded.scales, explicit)
    input_ids = tokenize(loaded.tokenizer, text, calibration_setting("calib_seqlen", loaded.scales, explicit), device)
    meta = {
        "model": options.model_id,
        "scales_sha256": loaded.scales.sha256 if loaded.scales is not None else None,
        "calibration": loaded.scales.settings if loaded.scales is not None else None,
        "input": {"text": source, "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(), "tokens": input_ids.shape[1]},
    }
    specs = [dataclasses.replace(options.spec, mode=mode) for mode in modes]
    layers = loaded.scales.layers if loaded.scales is not None else None
    paths = write_mode_dumps(loaded.model, input_ids, specs, layers, options.dump_dir, options.dump_n, meta)
    if loaded.scales is not None:
        paths.append(loaded.scales.save(Path(options.dump_dir) / SCALES_FILE))
    for path in paths:
        print(f"wrote {path}", file=sys.stderr if args.json else sys.stdout)
    files = load_dumps(options.dump_dir, names=[path.name for path in paths if path.name != SCALES_FILE])
    return report(options.dump_dir, files, check_dumps(files), as_json=args.json)


def write_mode_dumps(model, input_ids, specs: Sequence[QuantSpec], scales, dump_dir, dump_n: int, meta: dict) -> list[Path]:
    """One forward pass of `input_ids` per spec, with the same scales; each mode's dump is written
    (and announced to the plugins). The model is left in the last spec's mode."""
    import torch

    from .dumps import build_dump, save_dump
    from .plugins import plugin_manager
    from .recorder import Recorder

    paths = []
    previous = model.recorder
    for spec in specs:
        model.quantize(spec, scales)
        recorder = Recorder(model.config.n_layer, dump_n, input_ids.device)
        model.recorder = recorder
        recorder.arm()
        try:
            with torch.no_grad():
                model(input_ids)
        finally:
            model.recorder = previous
        dump = build_dump(recorder, spec, scales, meta)
        path = save_dump(dump_dir, dump)
        plugin_manager().hook.floatsim_dump_written(path=path, dump=dump)
        paths.append(path)
    return paths


def forward_text(text: Optional[str], scales, explicit: dict) -> tuple[str, str]:
    """(text, where it came from): `--text`, else the first sample of the calibration data."""
    if text is not None:
        return text, "--text"
    from .calibration import load_calibration_texts

    calib_data = calibration_setting("calib_data", scales, explicit)
    return load_calibration_texts(calib_data, 1)[0], f"first sample of {calib_data}"


def calibration_setting(name: str, scales, explicit: dict):
    """A calibration setting as given, else as the scales record it, else its default."""
    from .calibration import CalibrationSettings

    if name in explicit:
        return explicit[name]
    if scales is not None and name in scales.settings:
        return scales.settings[name]
    return getattr(CalibrationSettings(), name)


def tokenize(tokenizer, text: str, seqlen: int, device):
    import torch

    ids = tokenizer(text, truncation=True, max_length=seqlen)["input_ids"]
    if not ids:
        raise InputError("the text of the forward pass has no tokens")
    return torch.tensor([ids], device=device)
