"""Dump files in the user's format (``yzCheckFloatSim/``): names, JSON layout, writing, reading.

One file per mode, one entry per Mamba block::

    {"config": {"float_sim_asic": ..., "float_sim_better_scale": ..., <extras>},
     "layers": [{"layer_idx", "effective_scale", "output_scale", "before_quant", "after_quant",
                 "codes", "input_scale", "weight_scale", "bias_scale", "stats"}, ...]}

A conv quantized in segments (conv_scales=xbc) also has "segments": [{"name", "channels",
"input_scale", "output_scale", "effective_scale"}, ...] per block; its dumped values come from the
first segment's channels (x), whose scales are the block's input_scale, output_scale and
effective_scale.

`dump.schema.json` beside this module is the JSON Schema of the layout. A dump holds no timestamp,
host name or anything else that varies between runs: the same mode, model, scales and input give
the same bytes. Values that are not finite (NaN or infinite activations) are written as null,
since JSON has no such numbers; `lm-eval-floatsim check` reports them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from . import __version__
from .errors import InputError
from .files import write_json_atomic
from .modes import INT8_KERNEL, get_mode, mode_names, registry
from .quant import LayerScales, QuantSpec, SegmentedScales, effective_scale as quant_effective_scale

DUMP_FORMAT = "lm_eval_floatsim.dump/1"
DEFAULT_DUMP_DIR = "yzCheckFloatSim"
# What the caller knows about the run and the dump records in `config` (None when unknown).
META_KEYS = ("model", "scales_sha256", "calibration")
MESSAGE_LIMIT = 300  # characters of a schema problem shown in an error


def dump_filename(mode: str, divisor: float = 2025.0) -> str:
    """int8_baseline.json, floatsim_samescale.json, floatsim_betterscale_<divisor>.json, fp_reference.json,
    or a plugin mode's file (`modes.Mode.dump_filename`)."""
    return get_mode(mode).dump_filename(divisor)


def parse_filename(name: str) -> Optional[tuple[str, Optional[float]]]:
    """(mode, divisor) of a dump file name (divisor None unless the mode takes one); None for other files."""
    return next(filter(None, (mode.match_dump_filename(name) for mode in registry().values())), None)


def build_dump(recorder, spec: QuantSpec, scales: Optional[Sequence[LayerScales]], meta: Optional[dict] = None) -> dict:
    """The dump of one run: `recorder`'s snapshot and statistics, with the scales of every block.

    scales: one LayerScales per block (None only for fp without calibration). meta: `model`
    (the model id as given), `scales_sha256` and `calibration` (the calibration settings); any
    further keys are recorded in `config` as they are, so they must not vary between identical runs.
    """
    meta = meta or {}
    extras = {key: value for key, value in meta.items() if key not in META_KEYS}
    config = {
        **spec.kind.config_flags(),
        "format": DUMP_FORMAT,
        **spec.settings(),
        **{key: meta.get(key) for key in META_KEYS},
        "n_layer": recorder.n_layer,
        "dump_n": recorder.dump_n,
        "package_version": __version__,
    }
    clashes = sorted(set(extras) & set(config))
    if clashes:
        raise ValueError(f"meta keys {clashes} would overwrite the dump's own config keys")
    config.update(extras)
    snapshots = recorder.snapshots()
    summaries = recorder.layer_summaries()
    layers = [
        _layer_entry(spec.for_layer(i), scales[i] if scales is not None else None, snapshots[i], summaries[i], recorder.dump_n)
        for i in range(recorder.n_layer)
    ]
    return {"config": config, "layers": layers}


def write_dump(dump_dir, recorder, spec: QuantSpec, scales, meta: Optional[dict] = None) -> Path:
    """Write the run's dump atomically to ``dump_dir/dump_filename(mode, divisor)``; returns the path."""
    return save_dump(dump_dir, build_dump(recorder, spec, scales, meta))


def save_dump(dump_dir, dump: dict) -> Path:
    """Write a dump made by `build_dump` atomically into `dump_dir`, under its mode's file name."""
    config = dump["config"]
    path = Path(dump_dir) / dump_filename(config["mode"], config["divisor"])
    return write_json_atomic(path, dump)


def read_dump(path) -> dict:
    """A dump file's content, checked against `dump.schema.json`; InputError (one line) when unusable."""
    path = Path(path)
    try:
        raw = path.read_bytes()
        dump = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except json.JSONDecodeError as error:
        raise InputError(f"{path}: invalid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except ValueError as error:
        raise InputError(f"{path}: invalid JSON: {error}") from None
    except RecursionError:
        raise InputError(f"{path}: invalid JSON: nested too deeply") from None
    problem = _schema_problem_of_content(raw, dump)
    if problem:
        raise InputError(f"{path}: not a dump file: {problem}")
    return dump


# schema_problem's verdicts by file content (sha256) and registered modes. Why: every run's report
# reads the dumps of the runs before it in its folder, so the runs of a sweep or a sensitivity
# analysis read each dump again and again, and validating is most of reading one.
_verdicts: dict = {}


def _schema_problem_of_content(raw: bytes, dump) -> Optional[str]:
    key = (hashlib.sha256(raw).digest(), mode_names())
    if key not in _verdicts:
        _verdicts[key] = schema_problem(dump)
    return _verdicts[key]


def schema_problem(dump) -> Optional[str]:
    """The most relevant way `dump` departs from the schema, in one line, or None when it conforms."""
    import jsonschema

    error = jsonschema.exceptions.best_match(_validator().iter_errors(dump))
    if error is None:
        return None
    where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in error.absolute_path)
    return _shortened(f"{where.lstrip('.') or 'top level'}: {error.message}")


def schema() -> dict:
    """dump.schema.json, with the modes registered here as the values `config.mode` may take."""
    loaded = json.loads(resources.files(__package__).joinpath("dump.schema.json").read_text(encoding="utf-8"))
    loaded["properties"]["config"]["properties"]["mode"]["enum"] = list(mode_names())
    return loaded


def _validator():
    return _validator_for(mode_names())


@functools.lru_cache(maxsize=None)
def _validator_for(modes: tuple[str, ...]):
    import jsonschema

    return jsonschema.Draft202012Validator(schema())


def _shortened(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """jsonschema quotes the offending value whole: a list of a million numbers is no message."""
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _layer_entry(spec: QuantSpec, block_scales, snapshot, summary: dict, dump_n: int) -> dict:
    segments = block_scales.segments() if isinstance(block_scales, SegmentedScales) else None
    scales: Optional[LayerScales] = segments[0][2] if segments else block_scales  # the dumped values' channels
    output_scale = scales.output if scales is not None else None
    effective_scale = quant_effective_scale(spec, output_scale) if spec.quantized else None
    if snapshot is None:
        before = after = [None] * dump_n
        codes = [None] * dump_n if spec.quantized else None
    else:
        before, after, codes = snapshot.before, snapshot.after, snapshot.codes
        if spec.kind.arithmetic == INT8_KERNEL:
            before = _int8_before_quant(codes, output_scale)
    entry = {
        "layer_idx": summary["layer_idx"],
        "effective_scale": effective_scale,
        "output_scale": output_scale,
        "before_quant": _json_numbers(before),
        "after_quant": _json_numbers(after),
        "codes": codes,
        "input_scale": scales.input if scales is not None else None,
        "weight_scale": scales.weight if scales is not None else None,
        "bias_scale": scales.bias if scales is not None else None,
        "stats": {key: value for key, value in summary.items() if key != "layer_idx"},
    }
    if segments:
        entry["segments"] = [_segment_entry(spec, name, part, segment_scales) for name, part, segment_scales in segments]
    return entry


def _segment_entry(spec: QuantSpec, name: str, channels: slice, scales: LayerScales) -> dict:
    return {
        "name": name,
        "channels": channels.stop - channels.start,
        "input_scale": scales.input,
        "output_scale": scales.output,
        "effective_scale": quant_effective_scale(spec, scales.output) if spec.quantized else None,
    }


def _int8_before_quant(codes: list, output_scale: float) -> list:
    """The user's document: the kernel's fp32 y is not observable, so before_quant is code * output_scale (fp32)."""
    scale = np.float32(output_scale)
    return [None if code is None else float(np.float32(code) * scale) for code in codes]


def _json_numbers(values: list) -> list:
    return [value if value is not None and math.isfinite(value) else None for value in values]
