"""Modes: what each one computes, and how its runs are named, dumped, labelled and checked.

A `Mode` owns everything that tells one mode from another: its arithmetic (the unquantized
model, the INT8 kernel, or the float simulation), its effective scale, its code range, the
rounding of its output codes, its dump file name and config flags, its label, and which pairwise
checks apply to it. A `QuantSpec` is one run's choice: a mode and the settings it takes (divisor,
rounding, clamp) and the blocks it applies to (`layers`; the others run unquantized). The
arithmetic itself lives in `quant` (the only place that rounds or clamps).

Modes are looked up by name in a registry filled through the plugin hook
`floatsim_register_modes(register)`: the built-in modes (`BUILTIN_MODES`) come from the built-in
plugin, and a third-party plugin adds its own the same way, after which `lm_eval`, the dumps,
`check` and `compare` know it.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import Optional

from .errors import ArgumentError

# What a mode computes (the GPU kernel and `quant.conv_silu` branch on it, never on a mode's name).
FP, INT8_KERNEL, FLOAT_SIM = "fp", "int8_kernel", "float_sim"
ARITHMETICS = (FP, INT8_KERNEL, FLOAT_SIM)
ROUNDINGS = ("half_away", "half_even")
# The formats the ASIC may compute the float simulation in (quant rounds every step of it to one):
# significand bits and the exponent of the smallest subnormal, which set the ulp `check` allows.
ASIC_DTYPES = {"float32": (24, -149), "float16": (11, -24), "bfloat16": (8, -133)}
CLAMPS = ("range", "none")
INT8_RANGE = (-128, 127)
# The INT8 kernel rounds with CUDA's roundf; operands are quantized the same way in every mode so
# that all modes see identical X, W and Bq. X comes from the kernel before (roundf); W and the bias
# are quantized offline, by default as X is, or half to even (`operand_rounding`, as torch.round).
KERNEL_ROUNDING = "half_away"
# The INT8 kernel's fp32 epilogue: `exact` is SPEC's (each product and sum rounded, IEEE expf,
# correctly rounded divisions); `fast` is what `nvcc -O3 --use_fast_math` makes of it (one FMA,
# ex2.approx, multiplication by rcp.approx, subnormals flushed); see quant.py.
KERNEL_MATHS = ("exact", "fast")
DIVISOR_FIELD = "{divisor}"
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_LAYERS = re.compile(r"[0-9]+(-[0-9]+)?(\+[0-9]+(-[0-9]+)?)*")
LAYERS_ALLOWED = "block indices and ranges joined by +, e.g. 0-5+12+20-23"


@dataclass(frozen=True)
class Mode:
    """One mode. `dump_file` is the dump's file name; a mode that takes a divisor has `{divisor}`
    in it. `reproduces`: the mode whose codes this one must give (to the code, except at rounding
    ties); `beats`: the mode whose quantization error this one must undercut in every layer."""

    name: str
    arithmetic: str
    dump_file: str
    takes_divisor: bool = False
    takes_clamp: bool = False
    reproduces: Optional[str] = None
    beats: Optional[str] = None

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"mode name {self.name!r}: lower-case letters, digits and _ , starting with a letter")
        if self.arithmetic not in ARITHMETICS:
            raise ValueError(f"mode {self.name}: arithmetic {self.arithmetic!r} is not one of {', '.join(ARITHMETICS)}")
        if (DIVISOR_FIELD in self.dump_file) != self.takes_divisor or not self.dump_file.endswith(".json"):
            raise ValueError(f"mode {self.name}: dump_file {self.dump_file!r} must end in .json and hold "
                             f"{DIVISOR_FIELD} exactly when the mode takes a divisor")
        if self.takes_clamp and not self.takes_divisor:
            raise ValueError(f"mode {self.name}: only a mode with a finer scale has codes beyond the int8 range to clamp")

    @property
    def quantized(self) -> bool:
        return self.arithmetic != FP

    @property
    def float_sim(self) -> bool:
        return self.arithmetic == FLOAT_SIM

    def effective_scale(self, output_scale: float, divisor: float) -> Optional[float]:
        """s_eff: the output scale, divided by the divisor for a mode that takes one; None unquantized."""
        if not self.quantized:
            return None
        return output_scale / divisor if self.takes_divisor else output_scale

    def code_range(self, divisor: float, clamp: str) -> Optional[tuple[float, float]]:
        """Inclusive (lo, hi) of the output codes, or None when they are not clamped."""
        if not self.quantized or (self.takes_clamp and clamp == "none"):
            return None
        if self.takes_divisor:
            # The int8 real range on the finer grid; codes are integers, so a fractional divisor
            # keeps the largest whole codes inside it.
            return (math.ceil(INT8_RANGE[0] * divisor), math.floor(INT8_RANGE[1] * divisor))
        return INT8_RANGE

    def clamp_setting(self, clamp: str) -> Optional[str]:
        """The clamp a run of this mode applies (dumps record it): modes without the choice clamp to the range."""
        if not self.quantized:
            return None
        return clamp if self.takes_clamp else "range"

    def output_rounding(self, rounding: str) -> str:
        """The INT8 kernel always rounds half away from zero; `rounding` is the simulation's choice."""
        return KERNEL_ROUNDING if self.arithmetic == INT8_KERNEL else rounding

    def dump_filename(self, divisor: Optional[float]) -> str:
        if not self.takes_divisor:
            return self.dump_file
        return self.dump_file.replace(DIVISOR_FIELD, format_divisor(divisor))

    def match_dump_filename(self, name: str) -> Optional[tuple[str, Optional[float]]]:
        """(mode name, divisor) when `name` is this mode's dump file name, else None."""
        if not self.takes_divisor:
            return (self.name, None) if name == self.dump_file else None
        before, after = self.dump_file.split(DIVISOR_FIELD)
        match = re.fullmatch(re.escape(before) + r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)" + re.escape(after), name)
        if match and float(match[1]) > 0:
            return self.name, float(match[1])
        return None

    def config_flags(self) -> dict:
        """The user's document's flags: a float simulation of the ASIC, with a finer scale."""
        return {"float_sim_asic": self.float_sim, "float_sim_better_scale": self.float_sim and self.takes_divisor}

    def label(self, divisor=None, rounding=None, clamp=None) -> str:
        """A short name for a run: ``int8``, ``same``, ``better/2025``, ``better/16 half_even clamp=none``
        (settings other than the defaults spelled out)."""
        label = f"{self.name}/{format_divisor(float(divisor))}" if self.takes_divisor and divisor is not None else self.name
        if self.float_sim and rounding not in (None, QuantSpec.rounding):
            label += f" {rounding}"
        if self.takes_clamp and clamp not in (None, QuantSpec.clamp):
            label += f" clamp={clamp}"
        return label


BUILTIN_MODES = (
    Mode("fp", FP, "fp_reference.json"),
    Mode("int8", INT8_KERNEL, "int8_baseline.json"),
    Mode("same", FLOAT_SIM, "floatsim_samescale.json", reproduces="int8"),
    Mode("better", FLOAT_SIM, "floatsim_betterscale_{divisor}.json", takes_divisor=True, takes_clamp=True, beats="same"),
)
MODES = tuple(mode.name for mode in BUILTIN_MODES)


@functools.lru_cache(maxsize=None)
def registry() -> dict[str, Mode]:
    """Every mode, by name, in the order registered: the built-in ones, then plugins'.

    Cached; after registering a plugin at run time, call `registry.cache_clear()`.
    """
    from .plugins import plugin_manager

    found: dict[str, Mode] = {}

    def register(mode: Mode) -> None:
        if not isinstance(mode, Mode):
            raise TypeError(f"floatsim_register_modes: register() takes a lm_eval_floatsim.modes.Mode, not {mode!r}")
        if mode.name in found and found[mode.name] != mode:
            raise ValueError(f"mode {mode.name!r} is registered twice, differently")
        files = {other.dump_file: other.name for other in found.values() if other.name != mode.name}
        if mode.dump_file in files:
            raise ValueError(f"mode {mode.name!r}: dump file {mode.dump_file} is already the file of mode {files[mode.dump_file]!r}")
        found[mode.name] = mode

    plugin_manager().hook.floatsim_register_modes(register=register)
    return found


def mode_names() -> tuple[str, ...]:
    return tuple(registry())


def is_quantized(name: str) -> bool:
    """Whether runs of the mode called `name` quantize; a mode this installation does not know
    (a plugin's, in a results file from elsewhere) is taken to, as every mode but fp does."""
    known = registry().get(name)
    return known.quantized if known is not None else True


def get_mode(name: str, argument: str = "mode") -> Mode:
    """The mode called `name`; an ArgumentError naming `argument` when there is none."""
    modes = registry()
    if not isinstance(name, str) or name not in modes:
        raise ArgumentError(argument, name, "one of " + ", ".join(modes))
    return modes[name]


def parse_mode_list(text: str, argument: str) -> list[str]:
    """'fp,int8,better' -> ['fp', 'int8', 'better']: known modes, each once, at least one."""
    names = [name.strip() for name in str(text).split(",") if name.strip()]
    known = registry()
    if not names or any(name not in known for name in names) or len(set(names)) != len(names):
        raise ArgumentError(argument, text, "a comma-separated list of modes from " + ", ".join(known) + ", each once")
    return names


def run_label(mode: str, divisor=None, rounding=None, clamp=None, layers=None, asic_dtype=None,
              kernel_math=None, operand_rounding=None) -> str:
    """A run's short name: the mode's label (`Mode.label`), with `asic=float16` for a float
    simulation in another format, `fast-math` for the INT8 kernel's fast epilogue,
    `operands=half_even` for W and bias rounded half to even, and `layers=...` for a run of some
    blocks; a mode this installation does not know (a plugin's, recorded elsewhere) by its name."""
    known = registry().get(mode)
    label = known.label(divisor, rounding, clamp) if known is not None else mode
    if known is not None and known.float_sim and asic_dtype not in (None, QuantSpec.asic_dtype):
        label += f" asic={asic_dtype}"
    if known is not None and known.arithmetic == INT8_KERNEL and kernel_math not in (None, QuantSpec.kernel_math):
        label += f" {kernel_math}-math"
    if operand_rounding not in (None, QuantSpec.operand_rounding):
        label += f" operands={operand_rounding}"
    return label if not layers else f"{label} layers={format_layers(tuple(layers))}"


def format_divisor(divisor: float) -> str:
    """2025.0 -> '2025', 2.5 -> '2.5' (shortest decimal form), as dump file names spell it."""
    return str(int(divisor)) if float(divisor).is_integer() else repr(float(divisor))


def _block_indices(values) -> bool:
    """A non-empty sequence of non-negative integers."""
    return isinstance(values, (list, tuple)) and bool(values) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in values
    )


def parse_layers(value) -> Optional[tuple[int, ...]]:
    """The model argument `layers`: '0-5+12+20-23' -> (0, ..., 5, 12, 20, ..., 23), 12 -> (12,),
    a sequence of indices -> them sorted, None -> None (every block). No commas: lm-eval splits
    --model_args on them."""
    if value is None:
        return None
    if _block_indices(value):
        return tuple(sorted(set(value)))
    text = str(value).strip() if isinstance(value, (str, int)) and not isinstance(value, bool) else ""
    if not _LAYERS.fullmatch(text):
        raise ArgumentError("layers", value, LAYERS_ALLOWED)
    chosen: set[int] = set()
    for part in text.split("+"):
        first, _, last = part.partition("-")
        low, high = int(first), int(last or first)
        if high < low:
            raise ArgumentError("layers", value, LAYERS_ALLOWED + " (a range runs upwards)")
        chosen.update(range(low, high + 1))
    return tuple(sorted(chosen))


def format_layers(layers: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> '0-2+5+7-8': the shortest spelling `parse_layers` reads back."""
    runs: list[list[int]] = []
    for index in layers:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    return "+".join(str(low) if low == high else f"{low}-{high}" for low, high in runs)


@dataclass(frozen=True)
class QuantSpec:
    """One run's choice: the mode, how it quantizes, and the blocks it applies to (`layers`,
    sorted block indices; None for every block). The other blocks run unquantized."""

    mode: str = "fp"
    divisor: float = 2025.0
    rounding: str = "half_away"
    clamp: str = "range"
    layers: Optional[tuple[int, ...]] = None
    asic_dtype: str = "float32"
    kernel_math: str = "exact"
    operand_rounding: str = KERNEL_ROUNDING

    def __post_init__(self):
        get_mode(self.mode)
        _require("asic_dtype", self.asic_dtype, self.asic_dtype in ASIC_DTYPES, "one of " + ", ".join(ASIC_DTYPES))
        _require("kernel_math", self.kernel_math, self.kernel_math in KERNEL_MATHS, "one of " + ", ".join(KERNEL_MATHS))
        _require("operand_rounding", self.operand_rounding, self.operand_rounding in ROUNDINGS, "one of " + ", ".join(ROUNDINGS))
        layers_ok = self.layers is None or (
            isinstance(self.layers, tuple) and _block_indices(self.layers) and list(self.layers) == sorted(set(self.layers))
        )
        _require("layers", self.layers, layers_ok, "sorted distinct block indices (see parse_layers), or None for every block")
        _require("rounding", self.rounding, self.rounding in ROUNDINGS, "one of " + ", ".join(ROUNDINGS))
        _require("clamp", self.clamp, self.clamp in CLAMPS, "one of " + ", ".join(CLAMPS))
        divisor_ok = isinstance(self.divisor, (int, float)) and math.isfinite(self.divisor) and self.divisor > 0
        _require("divisor", self.divisor, divisor_ok, "a positive finite number")

    @property
    def kind(self) -> Mode:
        return get_mode(self.mode)

    @property
    def quantized(self) -> bool:
        return self.kind.quantized

    @property
    def output_rounding(self) -> str:
        return self.kind.output_rounding(self.rounding)

    def effective_scale(self, output_scale: float) -> Optional[float]:
        return self.kind.effective_scale(output_scale, self.divisor)

    def code_range(self) -> Optional[tuple[float, float]]:
        return self.kind.code_range(self.divisor, self.clamp)

    @property
    def label(self) -> str:
        return run_label(self.mode, self.divisor, self.rounding, self.clamp, self.layers, self.asic_dtype,
                         self.kernel_math, self.operand_rounding if self.quantized else None)

    @property
    def asic_format(self) -> str:
        """The format of the float simulation's arithmetic: `asic_dtype` for a float simulation;
        float32 for the other modes, whose arithmetic has no such choice."""
        return self.asic_dtype if self.kind.float_sim else "float32"

    @property
    def epilogue_math(self) -> str:
        """The INT8 kernel's epilogue arithmetic: `kernel_math` for the INT8 kernel, exact
        otherwise (the other modes have no such choice)."""
        return self.kernel_math if self.kind.arithmetic == INT8_KERNEL else "exact"

    def settings(self) -> dict:
        """What the run's arithmetic is, in JSON types, as dumps and the response cache record it:
        the mode and what it applies (divisor, output rounding, clamp, code range); the blocks, the
        format, the epilogue and the operands' rounding only when they are not every block,
        float32, exact and half_away, so that other runs keep the record they always had."""
        mode, code_range = self.kind, self.code_range()
        return {
            "mode": self.mode,
            "divisor": float(self.divisor) if mode.takes_divisor else None,
            "rounding": self.output_rounding if mode.quantized else None,
            "clamp": mode.clamp_setting(self.clamp),
            "code_range": None if code_range is None else [float(bound) for bound in code_range],
            **({} if self.layers is None else {"layers": list(self.layers)}),
            **({} if self.asic_format == "float32" else {"asic_dtype": self.asic_format}),
            **({} if self.epilogue_math == "exact" else {"kernel_math": self.epilogue_math}),
            **({} if not mode.quantized or self.operand_rounding == KERNEL_ROUNDING else {"operand_rounding": self.operand_rounding}),
        }

    def for_layer(self, layer_idx: int) -> "QuantSpec":
        """What block `layer_idx` computes: this spec, or unquantized for a block outside `layers`."""
        return self if self.layers is None or layer_idx in self.layers else QuantSpec("fp")


def _require(argument: str, value, ok: bool, allowed: str) -> None:
    if not ok:
        raise ArgumentError(argument, value, allowed)
