"""Finding and reading runs: lm-eval results files with a `config.floatsim` section, their dumps and scales.

A run is the dict the hooks receive: ``results`` (lm-eval's results dict), ``dump`` (the dump
file's content), ``dump_path``, ``scales`` (the scales file's content, or None when it is gone)
and ``source`` (the results file). A *summary* is the flat view of a run that the report and
`compare` tabulate: its label, identity, task metrics and per-layer statistics.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from .dumps import read_dump
from .errors import InputError
from .modes import KERNEL_ROUNDING, is_quantized, registry, run_label

RESULTS_GLOB = "results_*.json"
RESULTS_NAME = re.compile(r"^results_(?P<date_id>.+)\.json$")
STAT_KEYS = ("count", "max_abs_err", "mean_abs_err", "sqnr_db", "clamped_fraction", "nonfinite")
# Keys of an lm-eval task entry that are not metrics.
_NOT_METRICS = {"alias", "name", "sample_len", "sample_count", "samples"}
# What this module reads of a results file, and the types it relies on (lm-eval writes more).
_PATH = {"type": ["string", "null"], "pattern": "^[^\\x00]+$"}
_OPTIONAL_TEXT = {"type": ["string", "null"]}
RESULTS_SHAPE = {
    "type": "object",
    "properties": {
        "results": {"type": "object", "additionalProperties": {"type": "object"}},
        "group_subtasks": {"type": "object", "additionalProperties": {"type": ["array", "null"], "items": {"type": "string"}}},
        "groups": {"type": ["object", "null"]},
        "higher_is_better": {"type": "object", "additionalProperties": {"type": ["object", "null"]}},
        "config": {
            "type": "object",
            "properties": {
                "floatsim": {
                    "type": "object",
                    "properties": {
                        "mode": {"type": "string"},
                        "divisor": {"type": ["number", "null"]},
                        "rounding": _OPTIONAL_TEXT,
                        "clamp": _OPTIONAL_TEXT,
                        "model": _OPTIONAL_TEXT,
                        "scales_sha256": _OPTIONAL_TEXT,
                        "dump_file": _PATH,
                        "scales_file": _PATH,
                        "layers": {"type": "array", "items": {"type": "object"}},
                    },
                },
            },
        },
    },
}


def read_json(path, what: str):
    """Parse a JSON file; a missing or corrupt file is an InputError naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:  # ValueError: bad JSON, a 5000-digit integer
        raise InputError(f"{what} {path} is not readable JSON: {error}") from None
    except RecursionError:
        raise InputError(f"{what} {path} is not readable JSON: nested too deeply") from None


def _check_shape(path: Path, results: dict) -> None:
    """A floatsim results file damaged where this module reads it is unusable input, named in one line."""
    import jsonschema

    error = jsonschema.exceptions.best_match(jsonschema.Draft202012Validator(RESULTS_SHAPE).iter_errors(results))
    if error is not None:
        where = ".".join(str(part) for part in error.absolute_path) or "top level"
        raise InputError(f"results file {path}: {where}: {error.message:.200}")


def find_results_files(paths, recursive: bool = True) -> list[Path]:
    """Every `results_*.json` at or under `paths`, sorted; a path that does not exist is an InputError."""
    found = set()
    for path in map(Path, paths):
        if path.is_file():
            found.add(path)
        elif path.is_dir():
            found.update(path.rglob(RESULTS_GLOB) if recursive else path.glob(RESULTS_GLOB))
        else:
            raise InputError(f"{path} does not exist")
    return sorted(found)


def floatsim_config(results: dict) -> dict | None:
    config = results.get("config") if isinstance(results, dict) else None
    section = config.get("floatsim") if isinstance(config, dict) else None
    return section if isinstance(section, dict) else None


def date_id(results_path) -> str | None:
    match = RESULTS_NAME.match(Path(results_path).name)
    return match.group("date_id") if match else None


def _candidates(results_path: Path, recorded) -> list[Path]:
    """Where a file the run recorded may be: in the folder beside the results that shares their
    date id first (it moves with them and belongs to this run alone), then the recorded path (as
    is, then relative to the results), then beside the results."""
    if not recorded:
        return []
    recorded = Path(recorded)
    here = results_path.parent
    candidates = []
    if date_id(results_path):
        candidates.append(here / f"floatsim_{date_id(results_path)}" / recorded.name)
    candidates += [recorded, here / recorded, here / recorded.name]
    return list(dict.fromkeys(candidates))


def locate(results_path, recorded) -> Path | None:
    return next((path for path in _candidates(Path(results_path), recorded) if path.is_file()), None)


def load_run(results_path) -> dict | None:
    """The run recorded by one results file; None when the file is not a floatsim run.

    A floatsim run whose dump cannot be found is an InputError: comparing it would silently skip
    its checks.
    """
    results_path = Path(results_path)
    results = read_json(results_path, "results file")
    section = floatsim_config(results)
    if section is None:
        return None
    _check_shape(results_path, results)
    dump_path = locate(results_path, section.get("dump_file"))
    if dump_path is None:
        looked = ", ".join(str(p) for p in _candidates(results_path, section.get("dump_file"))) or "nowhere"
        raise InputError(f"results file {results_path}: its dump {section.get('dump_file')!r} is missing (looked at {looked})")
    scales_path = locate(results_path, section.get("scales_file"))
    return {
        "results": results,
        "dump": read_dump(dump_path),
        "dump_path": str(dump_path),
        "scales": read_json(scales_path, "scales file") if scales_path else None,
        "source": str(results_path),
    }


def find_runs(paths, recursive: bool = True) -> list[dict]:
    """Every floatsim run at or under `paths`; InputError when there is none or a file is unusable."""
    files = find_results_files(paths, recursive)
    runs = [run for run in map(load_run, files) if run is not None]
    if not runs:
        where = ", ".join(map(str, paths))
        raise InputError(f"no runs found under {where}: expected lm-eval results_*.json files with a config.floatsim section")
    return runs


def find_runs_quietly(paths, recursive: bool = False) -> list[dict]:
    """The runs that can be read at or under `paths`, skipping whatever cannot (for reports)."""
    runs = []
    for path in paths:
        try:
            files = find_results_files([path], recursive)
        except InputError:
            continue
        for file in files:
            try:
                run = load_run(file)
            except InputError:
                continue
            if run is not None:
                runs.append(run)
    return runs


# --- identity ------------------------------------------------------------------------------------


def mode_order(summary: dict) -> tuple:
    """The registry's order (fp, int8, same, better, then plugins'), divisors ascending: the order
    of every table and plot."""
    known = registry()
    mode = summary["mode"]
    rank = list(known).index(mode) if mode in known else len(known)
    divisor = summary.get("divisor") if mode in known and known[mode].takes_divisor else None
    return rank, float(divisor) if divisor is not None else 0.0, summary["label"]


def comparable_key(summary: dict) -> tuple:
    """Quantized runs compare only with the same model, the same scales and the same operands (W
    and the bias rounded the same way; runs recorded before that choice existed rounded half away)."""
    return summary.get("model"), summary.get("scales_sha256"), summary.get("operand_rounding") or KERNEL_ROUNDING


def comparable(a: dict, b: dict) -> bool:
    """Same model, and the same scales unless one is an fp run (which uses no scales)."""
    both_quantized = is_quantized(a["mode"]) and is_quantized(b["mode"])
    return a.get("model") == b.get("model") and (not both_quantized or comparable_key(a) == comparable_key(b))


# --- metrics -------------------------------------------------------------------------------------


def _number(value) -> float | None:
    """A finite float, or None (not a number, NaN, infinite, or an integer beyond any float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        return float(value) if math.isfinite(value) else None
    except OverflowError:
        return None


def _parent_groups(results: dict) -> dict[str, str]:
    parents = {}
    for group, subtasks in (results.get("group_subtasks") or {}).items():
        for subtask in subtasks or ():
            parents.setdefault(subtask, group)
    return parents


def _task_path(task: str, parents: dict[str, str]) -> str:
    """`lambada / lambada_openai`: a subtask shown under its group(s)."""
    path = [task]
    while path[0] in parents and parents[path[0]] not in path:
        path.insert(0, parents[path[0]])
    return " / ".join(path)


def metric_rows(results: dict) -> list[dict]:
    """One row per task and metric: value, stderr and direction. Groups' own aggregates are rows
    too (``aggregate`` True); their subtasks are shown under them."""
    groups = set(results.get("group_subtasks") or ()) | set(results.get("groups") or ())
    parents = _parent_groups(results)
    directions = results.get("higher_is_better") or {}
    rows = []
    for task, entry in (results.get("results") or {}).items():
        for key, value in (entry or {}).items():
            metric, _, filter_name = key.partition(",")
            if key in _NOT_METRICS or metric.endswith("_stderr") or _number(value) is None:
                continue
            rows.append({
                "task": task,
                "display": _task_path(task, parents) + (" (group)" if task in groups else ""),
                "metric": metric,
                "filter": filter_name or "none",
                "value": float(value),
                "stderr": _number(entry.get(f"{metric}_stderr,{filter_name}")),
                "higher_is_better": bool((directions.get(task) or {}).get(metric, True)),
                "aggregate": task in groups,
            })
    return sorted(rows, key=lambda row: (row["display"], row["metric"], row["filter"]))


def metric_id(row: dict) -> tuple:
    return row["task"], row["metric"], row["filter"]


def metric_name(row: dict) -> str:
    """`acc` or `exact_match (flexible-extract)`: the filter is shown when it is not lm-eval's default."""
    return row["metric"] if row["filter"] == "none" else f"{row['metric']} ({row['filter']})"


# --- layers --------------------------------------------------------------------------------------


def layer_stats(run: dict) -> list[dict]:
    """Per-layer statistics: the dump's, else the results section's summary."""
    layers = [layer for layer in run.get("dump", {}).get("layers", []) if isinstance(layer.get("stats"), dict)]
    if layers:
        rows = [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in layers]
    else:
        rows = (floatsim_config(run["results"]) or {}).get("layers") or []
    return [{"layer_idx": row.get("layer_idx"), **{key: _stat(row.get(key)) for key in STAT_KEYS}} for row in rows]


def _stat(value):
    """A statistic as recorded (an int stays an int), or None where it is no finite number a float can hold."""
    return value if _number(value) is not None else None


def sqnr_summary(layers: list[dict]) -> dict:
    """Mean and worst SQNR over the layers that have one (a layer without error has none)."""
    finite = [(layer["sqnr_db"], layer["layer_idx"]) for layer in layers if _number(layer.get("sqnr_db")) is not None]
    max_errors = [layer["max_abs_err"] for layer in layers if _number(layer.get("max_abs_err")) is not None]
    worst = min(finite) if finite else (None, None)
    return {
        "mean_sqnr_db": sum(value for value, _ in finite) / len(finite) if finite else None,
        "min_sqnr_db": worst[0],
        "worst_layer": worst[1],
        "max_abs_err": max(max_errors) if max_errors else None,
    }


# --- summaries -----------------------------------------------------------------------------------


def summarize(run: dict) -> dict:
    """The flat view of a run that reports and `compare` tabulate (JSON-serializable)."""
    results = run["results"]
    section = floatsim_config(results) or {}
    mode = section.get("mode", "?")
    layers = layer_stats(run)
    return {
        "label": run_label(mode, section.get("divisor"), section.get("rounding"), section.get("clamp"), section.get("quantized_layers"),
                           section.get("asic_dtype"), section.get("kernel_math"), section.get("operand_rounding")),
        "mode": mode,
        "divisor": section.get("divisor"),
        "rounding": section.get("rounding"),
        "clamp": section.get("clamp"),
        "model": section.get("model"),
        "scales_sha256": section.get("scales_sha256"),
        "kernel_math": section.get("kernel_math"),
        "operand_rounding": section.get("operand_rounding"),
        "date": _number(results.get("date")),
        "source": run.get("source"),
        "dump_path": run.get("dump_path"),
        "metrics": metric_rows(results),
        "layers": layers,
        **sqnr_summary(layers),
    }


def latest_per_label(summaries: list[dict]) -> tuple[list[dict], list[dict]]:
    """Keep the latest run of each mode configuration; return (kept, superseded)."""
    latest: dict[str, dict] = {}
    for summary in sorted(summaries, key=lambda s: (s.get("date") or 0.0, s.get("source") or "")):
        latest[summary["label"]] = summary
    kept = sorted(latest.values(), key=mode_order)
    kept_ids = {id(summary) for summary in kept}
    return kept, [summary for summary in summaries if id(summary) not in kept_ids]


def group_scales(group: list[dict]) -> str | None:
    """The scales hash of a comparable group: its quantized runs' (an fp run's own may differ)."""
    return next((s.get("scales_sha256") for s in group if is_quantized(s["mode"])), group[0].get("scales_sha256") if group else None)


def group_operands(group: list[dict]) -> str:
    """How the quantized runs of a comparable group rounded W and the bias."""
    return next((comparable_key(s)[2] for s in group if is_quantized(s["mode"])), KERNEL_ROUNDING)


def comparable_groups(summaries: list[dict]) -> list[list[dict]]:
    """Runs split by (model, scales, operands): runs calibrated or quantized differently are never
    mixed in one table.

    An fp run uses no scales: it joins every group of its model (or forms one of its own).
    """
    groups: dict[tuple, list[dict]] = {}
    for summary in summaries:
        if is_quantized(summary["mode"]):
            groups.setdefault(comparable_key(summary), []).append(summary)
    for summary in summaries:
        if not is_quantized(summary["mode"]):
            homes = [key for key in groups if key[0] == summary.get("model")] or [(summary.get("model"), None, None)]
            for key in homes:
                groups.setdefault(key, []).append(summary)
    return [sorted(group, key=mode_order) for group in groups.values()]
