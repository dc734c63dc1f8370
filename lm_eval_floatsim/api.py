"""The Python API, usable without lm-eval: load a Mamba checkpoint with its Conv1D+SiLU in a mode.

    from lm_eval_floatsim.api import load_model
    model, tokenizer, scales = load_model("state-spaces/mamba-130m", mode="better", divisor=2025)
    logits = model(tokenizer("Hello", return_tensors="pt").input_ids)

Quantized modes need scales: a scales file (`scales=PATH`), a `Scales` object, or, by default,
calibration through the cache (`calibration.cached_scales`), so that every mode of one model and
calibration uses the same scales and only the first run calibrates.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

from .calibration import (CalibrationSettings, Scales, cached_scales, check_conv_scales, data_fingerprint,
                          recorded_setting, weights_sha256)
from .errors import ArgumentError, InputError
from .loading import load_pretrained, load_tokenizer, model_label, resolve_dtype
from .modes import QuantSpec, parse_layers


class LoadedModel(NamedTuple):
    model: Any
    tokenizer: Any
    scales: Optional[Scales]


def load_model(
    pretrained: str,
    mode: str = "fp",
    divisor: float = 2025,
    rounding: str = "half_away",
    clamp: str = "range",
    layers: Union[str, int, tuple, None] = None,
    asic_dtype: str = "float32",
    kernel_math: str = "exact",
    operand_rounding: str = "half_away",
    scales: Union[str, Path, Scales, None] = None,
    calib_data: Optional[str] = None,
    calib_samples: Optional[int] = None,
    calib_seqlen: Optional[int] = None,
    percentile: Optional[float] = None,
    conv_scales: Optional[str] = None,
    dtype: str = "float32",
    device: str = "cpu",
    tokenizer: Optional[str] = None,
    revision: Optional[str] = None,
    progress: bool = True,
) -> LoadedModel:
    """(model, tokenizer, scales): a MambaLM in `mode`, its tokenizer, and the scales it uses.

    The calibration arguments default to CalibrationSettings' (the first 512 documents of the Pile
    validation split, 512 tokens each, percentile 0.9995, conv_scales conv: one input and one
    output scale per conv; xbc: one per segment x, B, C of a Mamba-2 conv). Given with `scales`, they must match the
    settings recorded in the scales file. `scales` is None for mode=fp without a scales argument
    (the unquantized model needs none). `layers` ('0-5+12', see `modes.parse_layers`) limits
    the mode to those blocks; the others run unquantized. `asic_dtype` (float32, float16,
    bfloat16) is the format of the float simulation's arithmetic; `kernel_math` (exact, fast) the
    INT8 kernel's epilogue; `operand_rounding` (half_away, half_even) how W and the bias are
    quantized. `revision` (a branch, tag or commit of a hub id) selects
    the checkpoint's version and its own tokenizer's. Every argument is checked before the
    checkpoint is loaded.
    """
    spec = QuantSpec(mode, divisor, rounding, clamp, parse_layers(layers), asic_dtype, kernel_math, operand_rounding)
    explicit = _explicit_calibration(calib_data, calib_samples, calib_seqlen, percentile, conv_scales)
    settings = CalibrationSettings(**explicit)
    resolve_dtype(dtype, device)
    chosen = _given_scales(scales, explicit)

    model = load_pretrained(pretrained, dtype, device, revision)
    tok = load_tokenizer(pretrained, tokenizer, revision)
    _check_vocabulary(tok, model, pretrained)
    check_conv_scales(settings.conv_scales, model.config, pretrained)
    if chosen is not None:
        _check_layer_count(chosen, model, pretrained)
        _check_weights(chosen, model, pretrained)
    elif spec.quantized:
        chosen = cached_scales(model_label(pretrained, revision), model, tok, settings, progress=progress)
    model.quantize(spec, chosen.layers if chosen is not None else None)
    return LoadedModel(model, tok, chosen)


def _explicit_calibration(calib_data, calib_samples, calib_seqlen, percentile, conv_scales) -> dict:
    chosen = dict(calib_data=calib_data, calib_samples=calib_samples, calib_seqlen=calib_seqlen, percentile=percentile,
                  conv_scales=conv_scales)
    return {name: value for name, value in chosen.items() if value is not None}


def _given_scales(scales, explicit: dict) -> Optional[Scales]:
    """The scales the user passed (loaded and checked against explicit calibration settings)."""
    if scales is None:
        return None
    if not isinstance(scales, (str, Path, Scales)):
        raise ArgumentError("scales", scales, "a path to a scales file")
    loaded = scales if isinstance(scales, Scales) else Scales.load(scales)
    source = f"scales file {loaded.path}" if loaded.path is not None else "the given scales"
    for name, value in explicit.items():
        if not _recorded_as(loaded.settings, name, value):
            recorded = recorded_setting(loaded.settings, name)
            raise ArgumentError(name, value, f"{recorded!r} as recorded in {source}, or no {name} argument")
    return loaded


def _recorded_as(settings: dict, name: str, value) -> bool:
    """A local calibration file matches by content (its path may be spelled differently)."""
    if name == "calib_data":
        fingerprint = data_fingerprint(value)
        if fingerprint is not None:
            return settings.get("calib_data_sha256") == fingerprint
    return recorded_setting(settings, name) == value


def _check_layer_count(scales: Scales, model, pretrained: str) -> None:
    n_layer = model.config.n_layer
    if len(scales.layers) != n_layer:
        source = scales.path if scales.path is not None else "the given scales"
        raise InputError(f"{source} has {len(scales.layers)} layers but {pretrained} has {n_layer} blocks")


def _check_vocabulary(tokenizer, model, pretrained: str) -> None:
    """Every id the tokenizer can produce needs an embedding row; otherwise the evaluation would
    stop with an IndexError at the first such token."""
    largest_id = max(tokenizer.get_vocab().values(), default=-1)
    rows = model.config.padded_vocab_size
    if largest_id >= rows:
        name = getattr(tokenizer, "name_or_path", None) or "the tokenizer"
        raise InputError(
            f"tokenizer {name} has token ids up to {largest_id} but {pretrained} has {rows} embedding rows: "
            "use the model's own tokenizer"
        )


def _check_weights(scales: Scales, model, pretrained: str) -> None:
    """Scales calibrated on other weights (recorded when they were calibrated here) do not fit this model.

    The fingerprint covers the dtype too: scales calibrated in another dtype are not compared.
    """
    recorded = scales.settings.get("weights_sha256")
    if recorded is None or scales.settings.get("dtype") != str(model.dtype).removeprefix("torch."):
        return
    actual = weights_sha256(model)
    if actual != recorded:
        source = scales.path if scales.path is not None else "the given scales"
        raise InputError(
            f"{source} was calibrated on other weights than {pretrained} "
            f"(weights_sha256 {recorded[:12]}… in the file, {actual[:12]}… loaded)"
        )
