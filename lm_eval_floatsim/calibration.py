"""Calibration: the per-block scales s_x, s_y, s_w, s_b of SPEC §2, their file format and cache.

Calibration runs the unquantized model over calibration text, as Quamba does: the first
`calib_samples` documents, each truncated (never padded) to `calib_seqlen` tokens, one at a time.
- s_x: absmax of the conv input over all calibration tokens / 127.
- s_y: per sample, the `percentile` quantile of |conv+SiLU output| (linear interpolation between
  order statistics, numpy.quantile's default), smoothed across samples by the EMA
  w <- w + 0.01 (q - w) started at the first sample's q; s_y = w / 127.
- s_w, s_b: absmax of the conv weight and bias (whole tensor) / 127.
With `conv_scales=xbc` (Mamba-2), s_x and s_y are computed so for each of the conv's channel
segments x, B and C alone (`quant.SegmentedScales`); s_w and s_b stay the whole conv's.
Every scale is rounded to fp32 once, so the value a scales file holds is exactly the factor the
arithmetic of `quant` multiplies by.

`calib_data` is a local `.txt` file (one sample per non-empty line), a local `.jsonl` file (one JSON
object per line, field `text`), or a datasets name spelled `NAME`, `NAME:SPLIT` or
`NAME:CONFIG:SPLIT` (split `validation` when omitted), streamed so that only the documents used
are read. NAME may be a hub id or a local dataset folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy as np
import torch

from .errors import ArgumentError, InputError
from .files import write_json_atomic
from .modes import INT8_RANGE, QuantSpec
from .quant import CONV_SCALES, LayerScales, SegmentedScales
from .sites import SITES

logger = logging.getLogger(__name__)

DEFAULT_CALIB_DATA = "monology/pile-uncopyrighted"
DEFAULT_SPLIT = "validation"
# Hub datasets whose held-out splits are single files beside a train/ folder: datasets' split
# detection then finds the folder only, and NAME:validation would be "Bad split". The Pile holds
# train/00..29.jsonl.zst, val.jsonl.zst and test.jsonl.zst; its validation split is val.jsonl.zst,
# as Quamba reads it (data_files="val.jsonl.zst").
SPLIT_FILES = {DEFAULT_CALIB_DATA: {"validation": "val.jsonl.zst", "test": "test.jsonl.zst"}}
TEXT_FIELD = "text"
LOCAL_SUFFIXES = (".txt", ".jsonl")
EMA_RATE = 0.01
QMAX = INT8_RANGE[1]
# Version 2 stores each block's scales per quantization site ({"layer_idx": 0, "conv_silu":
# {...}}); version 1 held the Conv1D+SiLU scales at the top of a block's entry. Both are read; a
# scales object keeps its file's version, so its sha256 (which dumps and caches record) never changes.
FORMAT = "lm_eval_floatsim.scales/2"
FORMAT_V1 = "lm_eval_floatsim.scales/1"
CONV_SITE = "conv_silu"
SEGMENTS = "segments"


@dataclass(frozen=True)
class CalibrationSettings:
    """What the user chooses about calibration; Quamba's defaults (512 samples of 512 tokens)."""

    calib_data: str = DEFAULT_CALIB_DATA
    calib_samples: int = 512
    calib_seqlen: int = 512
    percentile: float = 0.9995
    conv_scales: str = "conv"

    def __post_init__(self):
        if not isinstance(self.calib_data, str) or not self.calib_data.strip():
            raise ArgumentError("calib_data", self.calib_data, "a .txt/.jsonl file or a datasets name")
        for name in ("calib_samples", "calib_seqlen"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ArgumentError(name, value, "a positive integer")
        _check_percentile(self.percentile)
        _check_conv_scales_value(self.conv_scales)

    def record(self) -> dict:
        """The settings as scales files record them: a setting added later is left out at its
        default, so that files and caches written before it existed keep their content and sha256."""
        return {name: value for name, value in asdict(self).items()
                if not (name in OMITTED_AT_DEFAULT and OMITTED_AT_DEFAULT[name] == value)}


# Settings that a record leaves out at their default (`CalibrationSettings.record`).
OMITTED_AT_DEFAULT = {"conv_scales": "conv"}


def recorded_setting(settings: dict, name: str):
    """A setting as a scales file's record holds it, its default where the record leaves it out."""
    return settings.get(name, OMITTED_AT_DEFAULT.get(name))


def check_conv_scales(conv_scales: str, config, model_id: str) -> None:
    """conv_scales is one of CONV_SCALES, and xbc needs a conv of several segments (Mamba-2's x, B and C)."""
    _check_conv_scales_value(conv_scales)
    if conv_scales == "xbc" and len(config.conv_segments()) == 1:
        raise ArgumentError("conv_scales", conv_scales, f"conv for {model_id}: its {config.mixer} conv holds x only (xbc needs Mamba-2)")


def _check_conv_scales_value(conv_scales) -> None:
    if conv_scales not in CONV_SCALES:
        raise ArgumentError("conv_scales", conv_scales, "one of " + ", ".join(CONV_SCALES))


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_percentile(percentile) -> None:
    if not (_is_number(percentile) and 0 < percentile <= 1):
        raise ArgumentError("percentile", percentile, "a number in (0, 1]")


# --- calibration texts ----------------------------------------------------------------------


def load_calibration_texts(calib_data: str, n_samples: int) -> list[str]:
    """The first `n_samples` samples of `calib_data` (see the module docstring for the spellings)."""
    local = Path(calib_data).expanduser()
    if calib_data.lower().endswith(LOCAL_SUFFIXES):
        texts = list(itertools.islice(_local_texts(local), n_samples))
    elif local.is_file():
        raise InputError(f"calib_data={calib_data!r}: a local file must be .txt or .jsonl")
    else:
        texts = _dataset_texts(calib_data, n_samples)
    if not any(text.strip() for text in texts):
        raise InputError(f"calib_data={calib_data!r} holds no non-empty text samples")
    if len(texts) < n_samples:
        logger.warning("calib_data=%r holds %d samples, fewer than calib_samples=%d", calib_data, len(texts), n_samples)
    return texts


def _local_texts(path: Path) -> Iterator[str]:
    if not path.is_file():
        raise InputError(f"calib_data={str(path)!r}: no such file")
    jsonl = path.suffix.lower() == ".jsonl"
    try:
        with path.open(encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                yield _jsonl_text(path, line_number, line) if jsonl else line.rstrip("\r\n")
    except UnicodeDecodeError:
        raise InputError(f"calib_data={str(path)!r}: not UTF-8 text") from None


def _jsonl_text(path: Path, line_number: int, line: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise InputError(f"calib_data={str(path)!r}: line {line_number} is not JSON ({error.msg})") from None
    text = record.get(TEXT_FIELD) if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise InputError(f"calib_data={str(path)!r}: line {line_number} has no string field {TEXT_FIELD!r}")
    return text


def parse_dataset_name(calib_data: str) -> tuple[str, Optional[str], str]:
    """'NAME' | 'NAME:SPLIT' | 'NAME:CONFIG:SPLIT' -> (name, config, split)."""
    parts = calib_data.split(":")
    if len(parts) > 3 or not all(parts):
        raise ArgumentError("calib_data", calib_data, "a .txt/.jsonl file, NAME, NAME:SPLIT or NAME:CONFIG:SPLIT")
    if len(parts) == 1:
        return parts[0], None, DEFAULT_SPLIT
    if len(parts) == 2:
        return parts[0], None, parts[1]
    return parts[0], parts[1], parts[2]


def _dataset_texts(calib_data: str, n_samples: int) -> list[str]:
    name, config, split = parse_dataset_name(calib_data)
    import datasets

    split_file = SPLIT_FILES.get(name, {}).get(split) if config is None else None
    files = {"data_files": {split: split_file}} if split_file is not None else {}
    try:
        stream = datasets.load_dataset(name, config, split=split, streaming=True, **files)
        records = list(itertools.islice(stream, n_samples))
    # datasets and the hub raise a zoo of types (ConnectionError offline, FileNotFoundError,
    # ValueError for a bad split, pyarrow errors for a bad file): all mean "unusable calib_data".
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise InputError(f"calib_data={calib_data!r} cannot be loaded with datasets: {reason}") from None
    texts = [record.get(TEXT_FIELD) for record in records]
    if not all(isinstance(text, str) for text in texts):
        raise InputError(f"calib_data={calib_data!r}: its documents have no string field {TEXT_FIELD!r}")
    return texts


def data_fingerprint(calib_data: str) -> Optional[str]:
    """sha256 of a local calibration file (its content may change under one name); None for datasets."""
    path = Path(calib_data).expanduser()
    if not (calib_data.lower().endswith(LOCAL_SUFFIXES) and path.is_file()):
        return None
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- the statistics ---------------------------------------------------------------------------


def upper_quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """The q-quantile of each row of `values` (rows, n), as float64 (rows,).

    Linear interpolation between the order statistics at (n - 1) q, like numpy.quantile's default.
    Only the top n - floor((n - 1) q) values are selected (topk), which for the high quantiles
    of calibration is far cheaper than sorting, and has no size limit (torch.quantile has one).
    """
    n = values.shape[-1]
    position = q * (n - 1)
    below = math.floor(position)
    fraction = position - below
    top = values.topk(n - below, dim=-1, sorted=True).values.double()
    lower = top[:, -1]
    upper = top[:, -2] if n - below >= 2 else lower
    return lower + fraction * (upper - lower)


def ema(values: Iterable[float], rate: float = EMA_RATE) -> float:
    """w <- w + rate (v - w) over `values`, started at the first value."""
    iterator = iter(values)
    w = next(iterator)
    for value in iterator:
        w = w + rate * (value - w)
    return w


def scale_from_absmax(absmax: float) -> float:
    """absmax / 127 rounded to fp32. An all-zero tensor (a conv without bias) gets scale 1: any
    positive scale codes zeros exactly, and 0 would divide zero by zero."""
    scale = float(np.float32(absmax / QMAX))
    return scale if scale > 0 else 1.0


class _CalibrationDone(Exception):
    """Raised after the last block: the norm and lm_head (a third of the compute) are not needed."""


class _OutputObserver:
    """The `quant.conv_silu` observer of one block: records each sample's |y| quantile, one per
    channel segment (shape (segments,)).

    `wants_values` is always true, so that any fused kernel hands this observer the full values
    instead of accumulating into recorder statistics it does not have.
    """

    wants_values = True

    def __init__(self, quantiles: list, percentile: float, widths: tuple[int, ...]):
        self.quantiles, self.percentile, self.widths = quantiles, percentile, widths

    def __call__(self, before, after, codes, clamped) -> None:
        per_segment = [
            upper_quantile(segment.abs().reshape(before.shape[0], -1), self.percentile)
            for segment in before.split(self.widths, dim=-1)
        ]
        self.quantiles.extend(torch.stack(per_segment, dim=-1).unbind())


class _ActivationStats:
    """Stands in for the model's recorder during calibration, per block and channel segment (one
    segment, the whole conv, unless conv_scales=xbc); statistics stay on the device until the
    end, so a GPU is not synchronised per sample."""

    def __init__(self, n_layer: int, percentile: float, widths: tuple[int, ...]):
        self.input_absmax: list[Optional[torch.Tensor]] = [None] * n_layer
        self.output_quantiles: list[list[torch.Tensor]] = [[] for _ in range(n_layer)]
        self.percentile, self.widths = percentile, widths

    def layer(self, layer_idx: int, mask) -> _OutputObserver:
        return _OutputObserver(self.output_quantiles[layer_idx], self.percentile, self.widths)

    def observe_input(self, layer_idx: int, x: torch.Tensor) -> None:
        absmax = torch.stack([segment.detach().abs().amax().float() for segment in x.split(self.widths, dim=-1)])
        previous = self.input_absmax[layer_idx]
        self.input_absmax[layer_idx] = absmax if previous is None else torch.maximum(previous, absmax)


def calibrate(
    model, tokenizer, texts: Iterable[str], seqlen: int, percentile: float, progress: bool = True,
    conv_scales: str = "conv",
) -> list:
    """One LayerScales per block of `model` (a MambaLM), computed on its unquantized forward; with
    conv_scales=xbc one SegmentedScales per block.

    Each text is tokenized as the tokenizer does by default (as Quamba does), truncated to
    `seqlen` tokens, never padded, and run alone; texts without tokens are skipped. The model's
    mode, recorder and train/eval state are restored afterwards.
    """
    if isinstance(seqlen, bool) or not isinstance(seqlen, int) or seqlen < 1:
        raise ArgumentError("calib_seqlen", seqlen, "a positive integer")
    _check_percentile(percentile)
    check_conv_scales(conv_scales, model.config, "the model")
    segments = model.config.conv_segments() if conv_scales == "xbc" else {"conv": model.config.conv_dim}
    stats = _ActivationStats(model.config.n_layer, percentile, tuple(segments.values()))
    samples = _run_samples(model, tokenizer, texts, seqlen, stats, progress)
    if samples == 0:
        raise InputError("calib_data: no calibration sample has at least one token")
    return [_layer_scales(model, stats, i, segments if conv_scales == "xbc" else None) for i in range(model.config.n_layer)]


def _run_samples(model, tokenizer, texts, seqlen, stats: _ActivationStats, progress: bool) -> int:
    from tqdm import tqdm

    saved = (model.spec, model.scales, model.recorder, model.training)
    hooks = _install_hooks(model, stats)
    samples = 0
    try:
        model.quantize(QuantSpec("fp"), None)
        model.recorder = stats
        model.eval()
        with torch.no_grad():
            for text in tqdm(texts, desc="calibrating", unit="sample", disable=not progress):
                ids = tokenizer(text, truncation=True, max_length=seqlen)["input_ids"]
                if not ids:
                    continue
                try:
                    model(torch.tensor([ids], device=model.device))
                except _CalibrationDone:
                    pass
                samples += 1
    finally:
        for hook in hooks:
            hook.remove()
        spec, scales, model.recorder, training = saved
        model.quantize(spec, scales)
        model.train(training)
    return samples


def _install_hooks(model, stats: _ActivationStats) -> list:
    """The conv input is a slice of in_proj's output (`mixer.conv_input`); the mixer takes it from there."""
    hooks = []
    for layer in model.backbone.layers:
        mixer = layer.mixer

        def capture_input(module, inputs, output, layer_idx=mixer.layer_idx, mixer=mixer):
            stats.observe_input(layer_idx, mixer.conv_input(output))

        hooks.append(mixer.in_proj.register_forward_hook(capture_input))

    def stop(module, inputs, output):
        raise _CalibrationDone

    hooks.append(model.backbone.layers[-1].mixer.register_forward_hook(stop))
    return hooks


def _layer_scales(model, stats: _ActivationStats, layer_idx: int, segments: Optional[dict[str, int]]):
    """The block's LayerScales, or with `segments` (name -> width) its SegmentedScales."""
    conv = model.backbone.layers[layer_idx].mixer.conv1d
    input_absmax = stats.input_absmax[layer_idx].tolist()
    quantiles = torch.stack(stats.output_quantiles[layer_idx]).T.tolist()  # (segments, samples)
    output_levels = [ema(per_sample) for per_sample in quantiles]
    weight_absmax = conv.weight.detach().abs().amax().item()
    bias_absmax = conv.bias.detach().abs().amax().item() if conv.bias is not None else 0.0
    if not all(math.isfinite(v) for v in (*input_absmax, *output_levels, weight_absmax, bias_absmax)):
        raise InputError(f"calibration: block {layer_idx} has non-finite weights or activations; the model is unusable")
    inputs = tuple(scale_from_absmax(v) for v in input_absmax)
    outputs = tuple(scale_from_absmax(v) for v in output_levels)
    weight, bias = scale_from_absmax(weight_absmax), scale_from_absmax(bias_absmax)
    if segments is None:
        return LayerScales(input=inputs[0], output=outputs[0], weight=weight, bias=bias)
    return SegmentedScales(tuple(segments), tuple(segments.values()), inputs, outputs, weight, bias)


# --- the scales file --------------------------------------------------------------------------


def _fp32(value: float) -> float:
    return float(np.float32(value))


@dataclass
class Scales:
    """The scales of every block of one model + calibration, as saved in a scales file.

    `layers` holds each block's Conv1D+SiLU scales (the one quantization site today; the file
    stores them per site): LayerScales, or SegmentedScales when calibrated with conv_scales=xbc
    (the file then holds ``{"weight_scale", "bias_scale", "segments": [{"name", "channels",
    "input_scale", "output_scale"}, ...]}`` for the site). `settings` records everything the values depend on besides the model id
    (calibration settings, dtype, tokenizer, fingerprints of the weights and of a local calibration
    file). `format` is the file version written (a version-1 file loaded stays version 1). `path` is
    the file the scales were loaded from or last saved to (not part of the content).
    """

    model_id: str
    settings: dict
    layers: list  # LayerScales or SegmentedScales, one per block
    path: Optional[Path] = field(default=None, compare=False, repr=False)
    format: str = FORMAT

    def __post_init__(self):
        self.layers = [_scales_in_fp32(s) for s in self.layers]

    def content(self) -> dict:
        """The JSON content without its hash."""
        layers = [_layer_entry(i, s, self.format) for i, s in enumerate(self.layers)]
        return {"format": self.format, "model": self.model_id, "settings": self.settings, "layers": layers}

    @property
    def sha256(self) -> str:
        return _content_sha256(self.content())

    def save(self, path) -> Path:
        self.path = write_json_atomic(path, {**self.content(), "sha256": self.sha256})
        return self.path

    @classmethod
    def load(cls, path) -> "Scales":
        path = Path(path)
        data = _read_json(path)
        _check_layout(path, data)
        if _content_sha256({k: v for k, v in data.items() if k != "sha256"}) != data["sha256"]:
            raise InputError(f"scales file {path}: sha256 does not match the content (edited or corrupt)")
        layers = [_site_scales(_conv_entry(entry, data["format"])) for entry in data["layers"]]
        return cls(data["model"], data["settings"], layers, path=path, format=data["format"])


def _scales_in_fp32(scales):
    if isinstance(scales, SegmentedScales):
        return SegmentedScales(scales.names, scales.widths, tuple(map(_fp32, scales.inputs)),
                               tuple(map(_fp32, scales.outputs)), _fp32(scales.weight), _fp32(scales.bias))
    return LayerScales(*(_fp32(v) for v in (scales.input, scales.output, scales.weight, scales.bias)))


def _layer_entry(layer_idx: int, scales, version: str) -> dict:
    if isinstance(scales, SegmentedScales):
        values = {"weight_scale": scales.weight, "bias_scale": scales.bias, SEGMENTS: [
            {"name": name, "channels": width, "input_scale": s_x, "output_scale": s_y}
            for name, width, s_x, s_y in zip(scales.names, scales.widths, scales.inputs, scales.outputs)
        ]}
    else:
        values = dict(zip(SITES[CONV_SITE].scale_keys, (scales.input, scales.output, scales.weight, scales.bias)))
    return {"layer_idx": layer_idx, **(values if version == FORMAT_V1 else {CONV_SITE: values})}


def _site_scales(site: dict):
    """A checked site entry (`_check_layout`) as LayerScales or SegmentedScales."""
    if SEGMENTS not in site:
        return LayerScales(*(site[key] for key in SITES[CONV_SITE].scale_keys))
    segments = site[SEGMENTS]
    return SegmentedScales(
        tuple(segment["name"] for segment in segments), tuple(segment["channels"] for segment in segments),
        tuple(segment["input_scale"] for segment in segments), tuple(segment["output_scale"] for segment in segments),
        site["weight_scale"], site["bias_scale"],
    )


def _conv_entry(entry: dict, version: str):
    """The Conv1D+SiLU scales of one block's entry (None when the entry has no such object)."""
    return entry if version == FORMAT_V1 else entry.get(CONV_SITE)


def _content_sha256(content: dict) -> str:
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"), parse_constant=_not_a_number, parse_float=_finite_float)
    except FileNotFoundError:
        raise InputError(f"scales file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"scales file {path}: cannot be read ({error})") from None
    except json.JSONDecodeError as error:
        raise InputError(f"scales file {path}: not valid JSON ({error.msg}, line {error.lineno})") from None
    except ValueError as error:  # NaN, 1e999, an integer of thousands of digits
        raise InputError(f"scales file {path}: not valid JSON ({error})") from None
    except RecursionError:
        raise InputError(f"scales file {path}: not valid JSON (nested too deeply)") from None


def _not_a_number(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text} is beyond the range of a double")
    return value


def _check_layout(path: Path, data) -> None:
    def fail(problem: str):
        raise InputError(f"scales file {path}: {problem}")

    if not isinstance(data, dict) or data.get("format") not in (FORMAT, FORMAT_V1):
        fail(f"not a scales file (expected format {FORMAT!r} or {FORMAT_V1!r})")
    for key, kind in (("model", str), ("settings", dict), ("layers", list), ("sha256", str)):
        if not isinstance(data.get(key), kind):
            fail(f"{key!r} is missing or not a {kind.__name__}")
    if not data["layers"]:
        fail("'layers' is empty")
    for position, entry in enumerate(data["layers"]):
        index = entry.get("layer_idx") if isinstance(entry, dict) else None
        if index != position or isinstance(index, bool):
            fail(f"layers[{position}] is not an object with layer_idx {position}")
        site = _conv_entry(entry, data["format"])
        where = f"layers[{position}]" if data["format"] == FORMAT_V1 else f"layers[{position}].{CONV_SITE}"
        if not isinstance(site, dict):
            fail(f"{where} is missing or not an object")
        if SEGMENTS in site and data["format"] != FORMAT_V1:
            _check_segments_layout(fail, where, site)
        else:
            _check_scale_values(fail, where, site, SITES[CONV_SITE].scale_keys)


def _check_segments_layout(fail, where: str, site: dict) -> None:
    _check_scale_values(fail, where, site, ("weight_scale", "bias_scale"))
    segments = site[SEGMENTS]
    if not isinstance(segments, list) or len(segments) < 2:
        fail(f"{where}.{SEGMENTS} must be a list of at least two segments")
    names = []
    for k, segment in enumerate(segments):
        at = f"{where}.{SEGMENTS}[{k}]"
        if not isinstance(segment, dict) or not isinstance(segment.get("name"), str) or not segment["name"]:
            fail(f"{at} is not an object with a name")
        channels = segment.get("channels")
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            fail(f"{at}.channels must be a positive integer, got {channels!r:.40}")
        _check_scale_values(fail, at, segment, ("input_scale", "output_scale"))
        names.append(segment["name"])
    if len(set(names)) != len(names):
        fail(f"{where}.{SEGMENTS} names a segment twice: {names}")


def _check_scale_values(fail, where: str, entry: dict, keys) -> None:
    for key in keys:
        value = entry.get(key)
        if not _positive_finite(value):
            fail(f"{where}.{key} must be a positive finite number, got {value!r:.40}")
        if _fp32(value) != value:
            fail(f"{where}.{key}={value!r} is not an fp32 value")


def _positive_finite(value) -> bool:
    try:
        return _is_number(value) and math.isfinite(value) and value > 0
    except OverflowError:  # an integer beyond any float
        return False


# --- the cache --------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lm_eval_floatsim" / "scales"


def weights_sha256(model) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes).

    The model identity of the cache. A checkpoint's path, size and mtime would be cheaper, but the
    model object does not know them and they miss a checkpoint rewritten in place or loaded in
    another dtype; hashing is about 1 GB/s (0.5 s for mamba-130m), small beside calibration.
    """
    digest = hashlib.sha256()
    for name, tensor in itertools.chain(model.named_parameters(), model.named_buffers()):
        flat = tensor.detach().contiguous().reshape(-1)
        digest.update(f"{name}:{flat.dtype}:{tuple(tensor.shape)}\n".encode())
        digest.update(flat.view(torch.uint8).cpu().numpy())
    return digest.hexdigest()


def scales_settings(settings: CalibrationSettings, model, tokenizer) -> dict:
    """The `settings` of a scales file: the user's choices plus what else changes the values."""
    return {
        **settings.record(),
        "calib_data_sha256": data_fingerprint(settings.calib_data),
        "dtype": str(model.dtype).removeprefix("torch."),
        "tokenizer": getattr(tokenizer, "name_or_path", None) or None,
        "weights_sha256": weights_sha256(model),
        # The same weights under another mixer (a FalconMamba config) compute other activations.
        **({} if model.config.mixer == "Mamba1" else {"mixer": model.config.mixer}),
        **({"mixer_rms_eps": model.config.mixer_rms_eps} if model.config.mixer == "FalconMamba" else {}),
    }


def cache_path(model_id: str, settings: dict, cache_dir) -> Path:
    key = _content_sha256({"model": model_id, "settings": settings})
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model_id).strip("_")[-60:]
    return Path(cache_dir) / f"{readable}-{key[:24]}.json"


def cached_scales(
    model_id: str,
    model,
    tokenizer,
    settings: CalibrationSettings,
    cache_dir=None,
    progress: bool = True,
) -> Scales:
    """The scales of `model` for `settings`: from the cache when this model (same weights) was
    calibrated the same way before, else calibrated now and stored in the cache."""
    record = scales_settings(settings, model, tokenizer)
    path = cache_path(model_id, record, cache_dir or default_cache_dir())
    if path.is_file():
        try:
            cached = Scales.load(path)
        except InputError as error:
            logger.warning("ignoring a damaged cache entry: %s", error)
        else:
            if cached.model_id == model_id and cached.settings == record and len(cached.layers) == model.config.n_layer:
                logger.info("scales of %s from the cache: %s", model_id, path)
                return cached
    texts = load_calibration_texts(settings.calib_data, settings.calib_samples)
    layers = calibrate(model, tokenizer, texts, settings.calib_seqlen, settings.percentile, progress, settings.conv_scales)
    scales = Scales(model_id, record, layers)
    scales.save(path)
    logger.info("calibrated %s on %d samples of %s; scales cached in %s", model_id, len(texts), settings.calib_data, path)
    return scales
