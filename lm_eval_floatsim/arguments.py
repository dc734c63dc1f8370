"""Model arguments of `mamba_floatsim`: parsed and validated, all of them, before anything is loaded.

`parse_model_args(dict) -> ModelArgs` is shared by the lm-eval model (`lm_model.FloatSimLM`) and
the `lm-eval-floatsim dump` command. Values may arrive typed (lm-eval's `--model_args` parser turns
"2025" into 2025) or as strings (a command line); both are accepted. A bad value raises
`ArgumentError` naming the argument, the value and what is allowed.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .calibration import LOCAL_SUFFIXES, parse_dataset_name
from .errors import ArgumentError
from .loading import DTYPES as TORCH_DTYPES
from .loading import model_label, refuse_revision_of_folder
from .modes import QuantSpec, parse_layers, registry
from .quant import CONV_SCALES

logger = logging.getLogger(__name__)

DEFAULT_PRETRAINED = "state-spaces/mamba-130m"
DTYPES = (*TORCH_DTYPES, "auto")
CALIBRATION_ARGUMENTS = ("calib_data", "calib_samples", "calib_seqlen", "percentile", "conv_scales")  # auto: float16 on CUDA (as lm-eval's mamba_ssm model), float32 elsewhere

# lm-eval's own HFLM arguments that make sense for this model; they are passed to HFLM unchanged.
# trust_remote_code is accepted because `lm_eval --trust_remote_code` adds it to every model's
# arguments; no remote code is ever run.
HARNESS_ARGUMENTS = (
    "batch_size",
    "max_batch_size",
    "max_length",
    "truncation",
    "logits_cache",
    "add_bos_token",
    "prefix_token_id",
    "softmax_dtype",
    "trust_remote_code",
)

# Hub ids are "name" or "owner/name"; anything else that is not an existing folder is a typo'd path.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?")
_PATH_PREFIXES = ("/", "./", "../", "~", ".\\", "..\\")


@dataclass(frozen=True)
class ModelArgs:
    """Every argument of `mamba_floatsim`, validated. `harness` holds lm-eval's own (see HARNESS_ARGUMENTS).

    The calibration arguments stay None unless given: their defaults are CalibrationSettings'
    (512 Pile documents of 512 tokens, percentile 0.9995), and a scales file is only checked
    against the settings the user actually chose.
    """

    pretrained: str = DEFAULT_PRETRAINED
    revision: Optional[str] = None
    tokenizer: Optional[str] = None
    mode: str = QuantSpec.mode
    divisor: float = QuantSpec.divisor
    rounding: str = QuantSpec.rounding
    clamp: str = QuantSpec.clamp
    layers: Optional[tuple[int, ...]] = QuantSpec.layers
    asic_dtype: str = QuantSpec.asic_dtype
    kernel_math: str = QuantSpec.kernel_math
    operand_rounding: str = QuantSpec.operand_rounding
    dump_dir: str = "yzCheckFloatSim"
    dump_n: int = 10
    calib_data: Optional[str] = None
    calib_samples: Optional[int] = None
    calib_seqlen: Optional[int] = None
    percentile: Optional[float] = None
    conv_scales: Optional[str] = None
    scales: Optional[str] = None
    dtype: str = "float32"
    device: Optional[str] = None
    harness: dict = field(default_factory=dict)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.mode, self.divisor, self.rounding, self.clamp, self.layers, self.asic_dtype,
                         self.kernel_math, self.operand_rounding)

    @property
    def calibration(self) -> dict:
        """The calibration settings given (`calibration.CalibrationSettings`' names), for
        `api.load_model`; the others keep their defaults, or the scales file's record."""
        chosen = {name: getattr(self, name) for name in CALIBRATION_ARGUMENTS}
        return {name: value for name, value in chosen.items() if value is not None}

    @property
    def model_id(self) -> str:
        return model_label(self.pretrained, self.revision)


def known_arguments() -> tuple[str, ...]:
    names = [name for name in ModelArgs.__dataclass_fields__ if name != "harness"]
    return tuple(sorted(names + list(HARNESS_ARGUMENTS)))


def parse_model_args(given: dict[str, Any]) -> ModelArgs:
    """Validate `given` (argument name -> value; None means the default) into ModelArgs."""
    _reject_unknown(given)
    values = {name: value for name, value in given.items() if value is not None}
    parsed = {
        "pretrained": _model_location("pretrained", values.get("pretrained", DEFAULT_PRETRAINED)),
        "revision": _optional(values, "revision", _text),
        "tokenizer": _optional(values, "tokenizer", _model_location),
        "mode": values.get("mode", ModelArgs.mode),
        "divisor": _positive_number("divisor", values.get("divisor", ModelArgs.divisor)),
        "rounding": values.get("rounding", ModelArgs.rounding),
        "clamp": values.get("clamp", ModelArgs.clamp),
        "layers": parse_layers(values.get("layers")),
        "asic_dtype": values.get("asic_dtype", ModelArgs.asic_dtype),
        "kernel_math": values.get("kernel_math", ModelArgs.kernel_math),
        "operand_rounding": values.get("operand_rounding", ModelArgs.operand_rounding),
        "dump_dir": _dump_dir(values.get("dump_dir", ModelArgs.dump_dir)),
        "dump_n": _positive_int("dump_n", values.get("dump_n", ModelArgs.dump_n)),
        "calib_data": _optional(values, "calib_data", _calibration_data),
        "calib_samples": _optional(values, "calib_samples", _positive_int),
        "calib_seqlen": _optional(values, "calib_seqlen", _positive_int),
        "percentile": _optional(values, "percentile", _percentile),
        "conv_scales": _optional(values, "conv_scales", lambda name, value: _choice(name, value, CONV_SCALES)),
        "scales": _optional(values, "scales", _existing_file),
        "dtype": _choice("dtype", values.get("dtype", ModelArgs.dtype), DTYPES),
        "device": _optional(values, "device", _device),
        "harness": _harness_arguments(values),
    }
    # QuantSpec validates mode, rounding and clamp, with the messages every other entry point gives.
    QuantSpec(parsed["mode"], parsed["divisor"], parsed["rounding"], parsed["clamp"], asic_dtype=parsed["asic_dtype"],
              kernel_math=parsed["kernel_math"], operand_rounding=parsed["operand_rounding"])
    refuse_revision_of_folder(parsed["pretrained"], parsed["revision"])
    args = ModelArgs(**parsed)
    if "divisor" in values and not args.spec.kind.takes_divisor:
        takers = " or ".join(f"mode={mode.name}" for mode in registry().values() if mode.takes_divisor)
        logger.warning("divisor=%s only applies to %s; mode=%s ignores it", values["divisor"], takers, args.mode)
    if "asic_dtype" in values and not args.spec.kind.float_sim:
        logger.warning("asic_dtype=%s only applies to the float simulation; mode=%s ignores it", values["asic_dtype"], args.mode)
    if "kernel_math" in values and args.spec.epilogue_math != args.kernel_math:
        logger.warning("kernel_math=%s only applies to the INT8 kernel; mode=%s ignores it", values["kernel_math"], args.mode)
    return args


def _reject_unknown(given: dict[str, Any]) -> None:
    known = known_arguments()
    for name in sorted(given):
        if name not in known:
            raise ArgumentError(name, given[name], "a model argument of mamba_floatsim: " + ", ".join(known))


def _optional(values: dict[str, Any], name: str, check):
    return check(name, values[name]) if name in values else None


def _text(name: str, value) -> str:
    if isinstance(value, Path):
        return str(value)
    if not isinstance(value, str) or not value:
        raise ArgumentError(name, value, "a non-empty string")
    return value


def _choice(name: str, value, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ArgumentError(name, value, "one of " + ", ".join(allowed))
    return value


def _number(value) -> Optional[float]:
    """The value as a float, or None when it is not a number (booleans are not numbers here)."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _positive_number(name: str, value) -> float:
    number = _number(value)
    if number is None or not math.isfinite(number) or number <= 0:
        raise ArgumentError(name, value, "a positive finite number")
    return number


def _positive_int(name: str, value) -> int:
    number = _number(value)
    if number is None or not number.is_integer() or number < 1 or isinstance(value, float):
        raise ArgumentError(name, value, "an integer >= 1")
    return int(number)


def _percentile(name: str, value) -> float:
    number = _number(value)
    if number is None or not 0 < number <= 1:
        raise ArgumentError(name, value, "a number in (0, 1]")
    return number


def looks_like_path(value: str) -> bool:
    """A path, not a hub id: an explicit prefix, backslashes, more than one '/', or a first part that exists here."""
    if value in (".", "..") or value.startswith(_PATH_PREFIXES) or "\\" in value or value.count("/") > 1:
        return True
    return Path(value.split("/")[0]).exists() and "/" in value


def _model_location(name: str, value) -> str:
    """A local folder (checked here) or a hub id (checked when it is downloaded)."""
    text = _text(name, value)
    allowed = f"an existing model folder or a Hugging Face hub id such as {DEFAULT_PRETRAINED}"
    local = Path(text).expanduser()
    if local.is_dir():
        return str(local)
    if local.exists():
        raise ArgumentError(name, value, allowed + " (this is a file, not a folder)")
    if looks_like_path(text):
        raise ArgumentError(name, value, allowed + " (no such folder)")
    if not _HUB_ID.fullmatch(text):
        raise ArgumentError(name, value, allowed)
    return text


def _existing_file(name: str, value) -> str:
    path = Path(_text(name, value)).expanduser()
    if not path.is_file():
        raise ArgumentError(name, value, "an existing file (no such file)")
    return str(path)


def _calibration_data(name: str, value) -> str:
    """A local .txt/.jsonl file (checked here) or a datasets name (its spelling checked here)."""
    text = _text(name, value)
    path = Path(text).expanduser()
    allowed = "an existing .txt or .jsonl file, or a datasets name (NAME, NAME:SPLIT or NAME:CONFIG:SPLIT)"
    if text.lower().endswith(LOCAL_SUFFIXES):
        if not path.is_file():
            raise ArgumentError(name, value, allowed + " (no such file)")
        return str(path)
    if path.is_file():
        raise ArgumentError(name, value, allowed + " (a local file must be .txt or .jsonl)")
    dataset = text.split(":", 1)[0]  # a local dataset folder may carry a split: /data/corpus:validation
    if looks_like_path(dataset) and not Path(dataset).expanduser().is_dir():
        raise ArgumentError(name, value, allowed + " (no such file or folder)")
    parse_dataset_name(text)
    return text


def _dump_dir(value) -> str:
    """A folder that exists or can be made, and where files can be created: found out now, not
    when the dump is written at the end of the evaluation."""
    text = _text("dump_dir", value)
    path = Path(text).expanduser()
    if path.is_file():
        raise ArgumentError("dump_dir", value, "a folder (this is a file)")
    existing = next(folder for folder in (path, *path.parents) if folder.exists())
    try:
        tempfile.TemporaryFile(dir=existing).close()  # permission bits do not stop root; trying does
    except OSError as error:
        raise ArgumentError("dump_dir", value, f"a folder that can be written ({existing}: {error.strerror})") from None
    return str(path)


def _device(name: str, value) -> str:
    """cpu, cuda or cuda:N. HFLM silently runs on the CPU for a device it does not know (a typo);
    a cuda device without a GPU falls back to the CPU as lm-eval's default device does."""
    import torch

    text = _text(name, value)
    try:
        device_type = torch.device(text).type
    except (RuntimeError, ValueError):
        device_type = None
    if device_type not in ("cpu", "cuda"):
        raise ArgumentError(name, value, "cpu, cuda or cuda:N")
    return text


def _harness_arguments(values: dict[str, Any]) -> dict[str, Any]:
    harness = {name: values[name] for name in HARNESS_ARGUMENTS if name in values}
    if "batch_size" in harness:
        _batch_size(harness["batch_size"])
    for name in ("max_batch_size", "max_length"):
        if name in harness:
            harness[name] = _positive_int(name, harness[name])
    return harness


def _batch_size(value) -> None:
    """HFLM's forms: an integer, "auto" (probe once) or "auto:N" (probe N times over the run)."""
    if re.fullmatch(r"auto(:[0-9]+(\.[0-9]+)?)?", str(value)):
        return
    number = _number(value)
    if number is None or not number.is_integer() or number < 1:
        raise ArgumentError("batch_size", value, "an integer >= 1, auto or auto:N")
