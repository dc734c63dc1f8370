"""`lm-eval-floatsim check DIR`: the user's checks over the dump files in a folder.

The files are recognised by name (`dumps.dump_filename`); other files in the folder are ignored.
Every file is checked on its own (every layer in order, dump_n values, no nulls, the config flags,
its effective scale, its values on the quantization grid, no NaN or infinity counted in the run's
statistics), then the files against each other (one output scale per layer, `same` against `int8`,
each `better` against `same`).

How scales compare: within one fp32 ulp. The kernel applies every scale in fp32, so two scales
that round to the same or to neighbouring fp32 values quantize alike; a file written in fp32
precision passes, while a wrong divisor (2024 for 2025 is 5e-4 off) or a doubled scale does not.
Values on the grid compare exactly in fp32: after_quant = fp32(code) * fp32(effective_scale) is
what the kernel computes, and JSON round-trips the values exactly.

`same` against `int8`, SPEC section 2: |code difference| <= 1 everywhere and equal codes in at
least 99.99% of the positions. The dumps hold a few codes per layer, so the rule is applied to all
dumped codes pooled over the layers; with fewer than 10,000 of them, 99.99% allows no mismatch and
the output says so. The user's document's own criterion (after_quant differences < 1e-5) is
reported for information only: it fails for any tie the SPEC allows (one code is a whole scale
step), and passes or fails with the size of the scale rather than the quality of the simulation.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from .dumps import parse_filename, read_dump
from .errors import InputError
from .modes import ASIC_DTYPES, INT8_KERNEL, KERNEL_ROUNDING, Mode, format_divisor, get_mode, registry

CODE_AGREEMENT = 0.9999
QUANTIZED_FIELDS = ("effective_scale", "output_scale", "before_quant", "after_quant", "codes")
UNQUANTIZED_FIELDS = ("before_quant", "after_quant")
AFTER_QUANT_TOLERANCE = 1e-5  # the user's document's "差异 < 1e-5"


@dataclass(frozen=True)
class CheckResult:
    """One check: `name` says what and where ("floatsim_samescale.json: no nulls"), `layer` the first
    layer where it fails. An informational result reports a number and never fails (ok is True)."""

    name: str
    ok: bool
    detail: str
    layer: Optional[int] = None
    informational: bool = False

    @property
    def mark(self) -> str:
        if self.informational:
            return "ℹ"
        return "✓" if self.ok else "✗"

    def line(self) -> str:
        return f"{self.mark} {self.name}: {self.detail}"


@dataclass(frozen=True)
class DumpFile:
    name: str
    mode: str
    divisor: Optional[float]
    dump: dict

    @property
    def config(self) -> dict:
        return self.dump["config"]

    @property
    def layers(self) -> list:
        return self.dump["layers"]

    @property
    def kind(self) -> Mode:
        return get_mode(self.mode)

    @property
    def quantized(self) -> bool:
        return self.kind.quantized

    @property
    def asic_dtype(self) -> str:
        """The format of the run's float arithmetic (config.asic_dtype; float32 when not recorded)."""
        recorded = self.config.get("asic_dtype")
        return recorded if recorded in ASIC_DTYPES else "float32"

    @property
    def kernel_math(self) -> str:
        """The INT8 kernel's epilogue (config.kernel_math; exact when not recorded)."""
        return self.config.get("kernel_math") or "exact"

    @property
    def operand_rounding(self) -> str:
        """How W and the bias were rounded to codes (config.operand_rounding; half_away when not recorded)."""
        return self.config.get("operand_rounding") or KERNEL_ROUNDING

    @functools.cached_property
    def selected_layers(self) -> Optional[frozenset]:
        """The blocks a run of some blocks (model argument layers) quantized; None for every block."""
        layers = self.config.get("layers")
        return frozenset(layers) if isinstance(layers, list) else None

    def quantizes(self, layer: dict) -> bool:
        """Whether the run quantized this layer (the others are recorded as fp)."""
        return self.quantized and (self.selected_layers is None or layer["layer_idx"] in self.selected_layers)

    @functools.cached_property
    def unquantized_layers(self) -> list:
        return [layer for layer in self.layers if not self.quantizes(layer)]

    def layer(self, layer_idx: int) -> Optional[dict]:
        return self._by_index.get(layer_idx)

    @functools.cached_property
    def _by_index(self) -> dict:
        """layer_idx -> the first entry with it (a lookup per layer must not scan the file)."""
        found = {}
        for layer in self.layers:
            found.setdefault(layer["layer_idx"], layer)
        return found

    def layer_indices(self, n_layer: int) -> set:
        """The layers 0..n_layer-1 that the file has."""
        return {index for index in self._by_index if 0 <= index < n_layer}


def add_arguments(parser) -> None:
    parser.add_argument("dir", metavar="DIR", help="folder holding the dump files, e.g. yzCheckFloatSim")
    parser.add_argument("--json", action="store_true", help="print the results as JSON (for machines)")


def run(args) -> int:
    """Print one line per check; 0 when all pass, 1 when one fails, 2 when the input is unusable."""
    try:
        files = load_dumps(args.dir)
    except InputError as error:
        if not args.json:
            raise
        print(json.dumps({"dir": str(args.dir), "ok": False, "error": str(error), "checks": []}, indent=2))
        return 2
    return report(args.dir, files, check_dumps(files), as_json=args.json)


def report(folder, files: list[DumpFile], results: list[CheckResult], as_json: bool = False) -> int:
    """Print the results (text or JSON) and return the exit code: 0 all passed, 1 one failed."""
    failed = [result for result in results if not result.ok]
    if as_json:
        content = {
            "dir": str(folder),
            "ok": not failed,
            "files": [file.name for file in files],
            "checks": [asdict(result) for result in results],
        }
        print(json.dumps(content, indent=2, ensure_ascii=False))
    else:
        print(f"Checking {folder}: {', '.join(file.name for file in files)}")
        for result in results:
            print(result.line())
        counted = [result for result in results if not result.informational]
        print(f"{len(failed)} of {len(counted)} checks failed." if failed else f"All {len(counted)} checks passed.")
    return 1 if failed else 0


def run_checks(folder, names: Optional[Iterable[str]] = None) -> list[CheckResult]:
    """The checks over the dump files in `folder` (only `names`, when given). InputError when unusable."""
    return check_dumps(load_dumps(folder, names))


def load_dumps(folder, names: Optional[Iterable[str]] = None) -> list[DumpFile]:
    """The dump files of `folder`, read and schema-checked, quantized modes first (int8, same,
    better, then plugins' in the registry's order), fp last."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    wanted = None if names is None else set(names)
    found = []
    for path in sorted(folder.iterdir()):
        parsed = parse_filename(path.name)
        if parsed is not None and path.is_file() and (wanted is None or path.name in wanted):
            found.append(DumpFile(path.name, *parsed, read_dump(path)))
    missing = sorted((wanted or set()) - {file.name for file in found})
    if missing:
        raise InputError(f"{folder}: missing dump files: {', '.join(missing)}")
    if not found:
        raise InputError(
            f"{folder}: no dump files (int8_baseline.json, floatsim_samescale.json, "
            "floatsim_betterscale_<divisor>.json, fp_reference.json)"
        )
    order = list(registry())
    return sorted(found, key=lambda file: (not file.quantized, order.index(file.mode), file.divisor or 0.0))


def check_dumps(files: list[DumpFile]) -> list[CheckResult]:
    n_layer = expected_layers(files)
    results = []
    for file in files:
        results += [
            check_layer_order(file, n_layer),
            check_dump_n(file),
            check_no_nulls(file),
            check_config_flags(file),
            check_effective_scale(file),
            check_grid(file),
        ]
        if any(isinstance(layer.get("stats"), dict) for layer in file.layers):
            results.append(check_finite_activations(file))
    results += check_shared_scales(files, n_layer)
    results += check_same_operands(files)
    # A folder holds one file of each mode without a divisor: the ones the others are checked against.
    by_mode = {file.mode: file for file in files if not file.kind.takes_divisor}
    for file in files:
        if file.kind.reproduces in by_mode:
            results += check_reproduces(file, by_mode[file.kind.reproduces], n_layer)
        if file.kind.beats in by_mode:
            results += check_beats(file, by_mode[file.kind.beats], n_layer)
    return results


def expected_layers(files: list[DumpFile]) -> int:
    """n_layer as the files record it, else the most layers any file has."""
    recorded = [file.config["n_layer"] for file in files if isinstance(file.config.get("n_layer"), int)]
    if recorded:
        return max(recorded)
    return max(max([len(file.layers)] + [layer["layer_idx"] + 1 for layer in file.layers]) for file in files)


# --- one file ---------------------------------------------------------------------------------


def check_layer_order(file: DumpFile, n_layer: int) -> CheckResult:
    name = f"{file.name}: every layer, in order"
    indices = [layer["layer_idx"] for layer in file.layers]
    if not indices:
        return CheckResult(name, False, "the file has no layers")
    present = file.layer_indices(n_layer)
    if len(present) < n_layer:
        # n_layer comes from the files and may be absurd: find the gap without listing 0..n_layer-1
        first = next(index for index in range(len(present) + 1) if index not in present)
        missing = n_layer - len(present)
        more = f" (and {missing - 1} more)" if missing > 1 else ""
        return CheckResult(name, False, f"layer {first} missing{more} of 0..{n_layer - 1}", first)
    for position, layer_idx in enumerate(indices):
        if layer_idx != position:
            detail = f"layer {position} out of place: position {position} holds layer_idx {layer_idx} (order or repeats)"
            return CheckResult(name, False, detail, position)
    return CheckResult(name, True, f"layer_idx 0..{n_layer - 1}")


def check_dump_n(file: DumpFile) -> CheckResult:
    name = f"{file.name}: dump_n values per layer"
    recorded = file.config.get("dump_n")
    expected = recorded if isinstance(recorded, int) else len(file.layers[0]["before_quant"]) if file.layers else 0
    for layer in file.layers:
        for field in ("before_quant", "after_quant", "codes"):
            values = layer.get(field)
            if isinstance(values, list) and len(values) != expected:
                detail = f"layer {layer['layer_idx']}: {field} has {len(values)} values, expected {expected}"
                return CheckResult(name, False, detail, layer["layer_idx"])
    return CheckResult(name, True, f"{expected} in every layer")


def check_no_nulls(file: DumpFile) -> CheckResult:
    name = f"{file.name}: no nulls"
    problems = []
    for layer in file.layers:
        fields = QUANTIZED_FIELDS if file.quantizes(layer) else UNQUANTIZED_FIELDS
        for field in fields:
            value = layer.get(field)
            if isinstance(value, list):
                problems += [(layer["layer_idx"], f"{field}[{j}]") for j, item in enumerate(value) if not _is_number(item)]
            elif field != "codes" and not _is_number(value):
                problems.append((layer["layer_idx"], field))
    if problems and _computed_nothing(file):
        return CheckResult(name, False, "no values in any layer: the run computed no forward (stats.count is 0 in every "
                           "layer); an lm_eval --use_cache run whose every request came from the cache dumps nothing, "
                           "so rerun without --use_cache to dump values")
    if problems:
        layer_idx, where = problems[0]
        in_layers = len({layer for layer, _ in problems})
        detail = f"layer {layer_idx}: {where} is null or not finite ({len(problems)} in {in_layers} layers)"
        return CheckResult(name, False, detail, layer_idx)
    if file.quantized and file.unquantized_layers:
        return CheckResult(name, True, "scales, values and codes present in every quantized layer, values in the others")
    checked = "scales, values and codes" if file.quantized else "values"
    return CheckResult(name, True, f"{checked} present in every layer")


def _computed_nothing(file: DumpFile) -> bool:
    stats = [layer.get("stats") for layer in file.layers]
    return bool(stats) and all(isinstance(s, dict) and s.get("count") == 0 for s in stats)


def check_config_flags(file: DumpFile) -> CheckResult:
    name = f"{file.name}: config flags"
    config = file.config
    expected = file.kind.config_flags()
    if "mode" in config:
        expected["mode"] = file.mode
    if file.kind.takes_divisor and config.get("divisor") is not None:
        expected["divisor"] = file.divisor
    wrong = [key for key, value in expected.items() if config[key] != value]
    if wrong:
        key = wrong[0]
        return CheckResult(name, False, f"{key} is {config[key]!r}, expected {expected[key]!r} for {file.name}")
    shown = ", ".join(f"{key}={json.dumps(value)}" for key, value in expected.items())
    return CheckResult(name, True, shown)


def check_effective_scale(file: DumpFile) -> CheckResult:
    name = f"{file.name}: effective scale"
    for layer in file.unquantized_layers:
        if layer["effective_scale"] is not None:
            return CheckResult(name, False, f"layer {layer['layer_idx']}: fp has an effective scale", layer["layer_idx"])
    if not file.quantized:
        return CheckResult(name, True, "null in every layer (unquantized)")
    rule = f"output_scale / {format_divisor(file.divisor)}" if file.kind.takes_divisor else "output_scale"
    failures = []
    for layer in filter(file.quantizes, file.layers):
        for part, scales in _scaled_parts(layer):
            effective, output = scales["effective_scale"], scales["output_scale"]
            expected = file.kind.effective_scale(output, file.divisor) if _is_number(output) else None
            if _is_number(effective) and expected is not None and not scales_match(effective, expected, file.asic_dtype):
                ratio = f" (ratio {effective / expected:.6g})" if expected else ""
                failures.append((layer["layer_idx"], f"{part}effective_scale {effective!r} != {rule} = {expected!r}{ratio}"))
    if failures:
        return _first_failure(name, failures)
    where = "in every quantized layer, null in the others" if file.unquantized_layers else "in every layer"
    ulp = "fp32" if file.asic_dtype == "float32" else file.asic_dtype
    return CheckResult(name, True, f"= {rule} {where} (to 1 {ulp} ulp)")


def check_grid(file: DumpFile) -> CheckResult:
    name = f"{file.name}: values on the grid"
    for layer in file.unquantized_layers:
        for j, (before, after) in enumerate(zip(layer["before_quant"], layer["after_quant"])):
            if _is_number(before) and _is_number(after) and before != after:
                detail = f"layer {layer['layer_idx']}: after_quant[{j}] {after!r} != before_quant[{j}] {before!r}"
                return CheckResult(name, False, detail, layer["layer_idx"])
    if not file.quantized:
        return CheckResult(name, True, "after_quant = before_quant (unquantized)")
    code_range = _code_range(file)
    quantized = filter(file.quantizes, file.layers)
    failures = [(layer["layer_idx"], problem) for layer in quantized if (problem := _off_grid(file, layer, code_range))]
    if failures:
        return _first_failure(name, failures)
    rule = "after_quant = code * effective_scale"
    if file.kind.arithmetic == INT8_KERNEL:
        rule += ", before_quant = code * output_scale"
    bounds = "unclamped" if code_range is None else f"in [{format_divisor(code_range[0])}, {format_divisor(code_range[1])}]"
    source = "" if any(isinstance(layer.get("codes"), list) for layer in file.layers) else "; codes derived from after_quant"
    others = "; after_quant = before_quant in the unquantized layers" if file.unquantized_layers else ""
    return CheckResult(name, True, f"{rule} (fp32), integer codes {bounds}{source}{others}")


def _first_failure(name: str, failures: list[tuple[int, str]]) -> CheckResult:
    """The first failing layer in detail, and how many layers fail in all."""
    layer_idx, problem = failures[0]
    more = f" ({len(failures)} layers fail)" if len(failures) > 1 else ""
    return CheckResult(name, False, f"layer {layer_idx}: {problem}{more}", layer_idx)


def _off_grid(file: DumpFile, layer: dict, code_range) -> Optional[str]:
    effective, output = layer["effective_scale"], layer["output_scale"]
    if not (_is_number(effective) and _is_number(output)):
        return None
    for j, (code, before, after) in enumerate(zip(_codes(layer), layer["before_quant"], layer["after_quant"])):
        if not (_is_number(code) and _is_number(after)):
            continue
        if float(code) != int(code) or (code_range is not None and not code_range[0] <= code <= code_range[1]):
            return f"codes[{j}] = {code!r} is not an integer code of the range"
        grid = _fp32_product(code, effective)
        if np.float32(after) != grid:
            return f"after_quant[{j}] = {after!r} is not code {int(code)} * effective_scale = {float(grid)!r}"
        if file.kind.arithmetic == INT8_KERNEL and _is_number(before) and np.float32(before) != _fp32_product(code, output):
            return f"before_quant[{j}] = {before!r} is not code {int(code)} * output_scale = {float(_fp32_product(code, output))!r}"
    return None


def _codes(layer: dict) -> list:
    """The layer's codes; without them (the user's own files), the grid point nearest each after_quant.

    On the grid, after_quant / effective_scale is an integer up to float error, so how a tie would
    round does not matter here: this finds a grid point, it does not quantize.
    """
    if isinstance(layer.get("codes"), list):
        return layer["codes"]
    scale = layer["effective_scale"]
    return [_nearest_code(after, scale) for after in layer["after_quant"]]


def _nearest_code(after, scale) -> Optional[int]:
    quotient = after / scale if _is_number(after) and _is_number(scale) else math.nan
    return round(quotient) if math.isfinite(quotient) else None


def _code_range(file: DumpFile) -> Optional[tuple[float, float]]:
    if "code_range" in file.config:
        recorded = file.config["code_range"]
        return None if recorded is None else (recorded[0], recorded[1])
    return file.kind.code_range(file.divisor or 1.0, "range")


def check_finite_activations(file: DumpFile) -> CheckResult:
    """The run's statistics count the non-finite (NaN, ±inf) Conv1D+SiLU values over every position;
    the dumped values show only the first few of them."""
    name = f"{file.name}: finite activations (stats of the run)"
    counts = [(layer["layer_idx"], layer["stats"].get("nonfinite")) for layer in file.layers if isinstance(layer.get("stats"), dict)]
    failures = [(layer_idx, count) for layer_idx, count in counts if _is_number(count) and count > 0]
    if failures:
        layer_idx, count = failures[0]
        total = sum(count for _, count in failures)
        detail = (f"layer {layer_idx}: {count} non-finite values (NaN or ±inf); "
                  f"{total} in {len(failures)} of {len(counts)} layers")
        return CheckResult(name, False, detail, layer_idx)
    return CheckResult(name, True, f"no NaN or ±inf in {len(counts)} layers")


# --- files against each other -----------------------------------------------------------------


def check_shared_scales(files: list[DumpFile], n_layer: int) -> list[CheckResult]:
    results = []
    with_scales = [file for file in files if any(_is_number(layer["output_scale"]) for layer in file.layers)]
    if len(with_scales) > 1:
        results.append(_check_one_output_scale(with_scales, n_layer))
    hashed = [file for file in files if file.config.get("scales_sha256")]
    if len(hashed) > 1:
        name = "all files: same scales file"
        hashes = {file.config["scales_sha256"] for file in hashed}
        if len(hashes) > 1:
            listing = ", ".join(f"{file.name} {file.config['scales_sha256'][:12]}" for file in hashed)
            results.append(CheckResult(name, False, f"scales_sha256 differ: {listing}"))
        else:
            results.append(CheckResult(name, True, f"scales_sha256 {hashes.pop()[:12]}… in {len(hashed)} files"))
    return results


def check_same_operands(files: list[DumpFile]) -> list[CheckResult]:
    """Every quantized file rounded W and the bias the same way (operand_rounding)."""
    quantized = [file for file in files if file.quantized]
    if len(quantized) < 2:
        return []
    name = "all files: same operands (operand_rounding)"
    roundings = {file.operand_rounding for file in quantized}
    if len(roundings) > 1:
        listing = ", ".join(f"{file.name} {file.operand_rounding}" for file in quantized)
        return [CheckResult(name, False, f"W and the bias were rounded differently: {listing}")]
    return [CheckResult(name, True, f"{roundings.pop()} in {len(quantized)} files")]


def _check_one_output_scale(files: list[DumpFile], n_layer: int) -> CheckResult:
    name = "all files: one output scale per layer"
    for layer_idx in sorted(set().union(*(file.layer_indices(n_layer) for file in files))):
        seen = [(file.name, _output_scales(layer)) for file in files
                if (layer := file.layer(layer_idx)) is not None and _is_number(layer["output_scale"])]
        for other_name, other in seen[1:]:
            if other.keys() != seen[0][1].keys() or not all(scales_match(other[part], seen[0][1][part]) for part in other):
                detail = f"layer {layer_idx}: {seen[0][0]} has {_listed(seen[0][1])}, {other_name} has {_listed(other)}"
                return CheckResult(name, False, detail, layer_idx)
    return CheckResult(name, True, f"{len(files)} files agree in every layer")


def _scaled_parts(layer: dict) -> list[tuple[str, dict]]:
    """(label, entry with effective_scale and output_scale): the layer, then each of its channel
    segments (conv_scales=xbc)."""
    segments = layer.get("segments") or []
    return [("", layer)] + [(f"segment {segment['name']}: ", segment) for segment in segments]


def _output_scales(layer: dict) -> dict:
    return {part: scales["output_scale"] for part, scales in _scaled_parts(layer)}


def _listed(output_scales: dict) -> str:
    return ", ".join(f"{part}{scale!r}" for part, scale in output_scales.items())


def check_reproduces(same: DumpFile, int8: DumpFile, n_layer: int) -> list[CheckResult]:
    """`same` (a mode that `reproduces` another) against `int8` (that other mode's file)."""
    pairs = list(_layer_pairs(same, int8, n_layer))
    prefix = f"{same.name} vs {int8.name}" + (f" (kernel_math={int8.kernel_math})" if int8.kernel_math != "exact" else "")
    return [
        _check_same_effective_scale(prefix, pairs, same.asic_dtype),
        _check_same_codes(prefix, pairs),
        _after_quant_difference(prefix, pairs),
    ]


def _check_same_effective_scale(prefix: str, pairs, fmt: str = "float32") -> CheckResult:
    name = f"{prefix}: effective scale"
    for layer_idx, same, int8 in pairs:
        for (part, ours), (_, baseline) in zip(_scaled_parts(same), _scaled_parts(int8)):
            a, b = ours["effective_scale"], baseline["effective_scale"]
            if _is_number(a) and _is_number(b) and not scales_match(a, b, fmt):
                return CheckResult(name, False, f"layer {layer_idx}: {part}{a!r} vs the baseline's {b!r}", layer_idx)
    return CheckResult(name, True, "the baseline's in every layer")


def _check_same_codes(prefix: str, pairs) -> CheckResult:
    name = f"{prefix}: codes (SPEC: |diff| <= 1, equal in >= 99.99%)"
    total = equal = 0
    first_mismatch = first_far = None
    for layer_idx, same, int8 in pairs:
        for j, (a, b) in enumerate(zip(_codes(same), _codes(int8))):
            if not (_is_number(a) and _is_number(b)):
                continue
            total += 1
            equal += a == b
            if a != b and first_mismatch is None:
                first_mismatch = (layer_idx, j, a, b)
            if abs(a - b) > 1 and first_far is None:
                first_far = (layer_idx, j, a, b)
    allowed = math.floor(total * (1 - CODE_AGREEMENT) + 1e-9)
    pooled = f"equal in {equal}/{total} dumped codes, pooled over the layers ({allowed} mismatches allowed)"
    if first_far is not None:
        layer_idx, j, a, b = first_far
        return CheckResult(name, False, f"layer {layer_idx}: codes[{j}] {a} vs {b} differ by more than 1; {pooled}", layer_idx)
    if total - equal > allowed:
        layer_idx, j, a, b = first_mismatch
        return CheckResult(name, False, f"layer {layer_idx}: codes[{j}] {a} vs {b}; {pooled}", layer_idx)
    if total == 0:
        return CheckResult(name, False, "no codes to compare")
    return CheckResult(name, True, pooled)


def _after_quant_difference(prefix: str, pairs) -> CheckResult:
    name = f"{prefix}: after_quant difference (the document's < 1e-5)"
    worst, worst_layer = 0.0, None
    for layer_idx, same, int8 in pairs:
        for a, b in zip(same["after_quant"], int8["after_quant"]):
            if _is_number(a) and _is_number(b) and abs(a - b) > worst:
                worst, worst_layer = abs(a - b), layer_idx
    where = "" if worst_layer is None else f" (layer {worst_layer})"
    verdict = "below" if worst < AFTER_QUANT_TOLERANCE else "not below"
    detail = f"max |diff| {worst:.3g}{where}, {verdict} 1e-5; informational, the codes check decides"
    return CheckResult(name, True, detail, worst_layer, informational=True)


def check_beats(better: DumpFile, same: DumpFile, n_layer: int) -> list[CheckResult]:
    """`better` (a mode that `beats` another) against `same` (that other mode's file)."""
    pairs = list(_layer_pairs(better, same, n_layer))
    prefix = f"{better.name} vs {same.name}"
    results = [_check_smaller_error(f"{prefix}: smaller quantization error (dumped values)", pairs, _dumped_error)]
    if any("stats" in b and "stats" in s for _, b, s in pairs):
        results.append(_check_smaller_error(f"{prefix}: smaller quantization error (stats of the run)", pairs, _stats_error))
    return results


def _check_smaller_error(name: str, pairs, error_of) -> CheckResult:
    """Per layer: better's mean |after - before| below same's (or both exactly zero)."""
    compared, worst = 0, None
    for layer_idx, better, same in pairs:
        ours, theirs = error_of(better), error_of(same)
        if ours is None or theirs is None:
            continue
        compared += 1
        if not (ours < theirs or ours == theirs == 0):
            return CheckResult(name, False, f"layer {layer_idx}: mean |after - before| {ours:.3g} vs same's {theirs:.3g}", layer_idx)
        ratio = ours / theirs if theirs else 0.0
        if worst is None or ratio > worst[0]:
            worst = (ratio, layer_idx)
    if not compared:
        return CheckResult(name, False, "no layer has errors to compare")
    return CheckResult(name, True, f"in {compared} layers; largest ratio better/same {worst[0]:.3g} (layer {worst[1]})")


def _dumped_error(layer: dict) -> Optional[float]:
    errors = [abs(a - b) for a, b in zip(layer["after_quant"], layer["before_quant"]) if _is_number(a) and _is_number(b)]
    return sum(errors) / len(errors) if errors else None


def _stats_error(layer: dict) -> Optional[float]:
    value = (layer.get("stats") or {}).get("mean_abs_err")
    return value if _is_number(value) else None


def _layer_pairs(first: DumpFile, second: DumpFile, n_layer: int):
    """(layer_idx, first's entry, second's entry) for every layer both files have and both quantized."""
    for layer_idx in sorted(first.layer_indices(n_layer) & second.layer_indices(n_layer)):
        ours, theirs = first.layer(layer_idx), second.layer(layer_idx)
        if first.quantizes(ours) and second.quantizes(theirs):
            yield layer_idx, ours, theirs


# --- numbers ----------------------------------------------------------------------------------


def scales_match(a: float, b: float, fmt: str = "float32") -> bool:
    """Within one ulp of b in `fmt` (the arithmetic's format): the same scale as the kernel or the
    ASIC applies it (see the module doc)."""
    if fmt == "float32":
        return abs(a - b) <= float(np.spacing(np.float32(abs(b))))
    bits, smallest = ASIC_DTYPES[fmt]
    ulp = max(math.ldexp(1.0, math.frexp(abs(b))[1] - bits), math.ldexp(1.0, smallest))
    return abs(a - b) <= ulp


def _fp32_product(code, scale) -> np.float32:
    return np.float32(code) * np.float32(scale)


def _is_number(value) -> bool:
    """A finite number a float can hold (an integer beyond 1.8e308 is not: it cannot be compared as one)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False
