"""`lm-eval-floatsim compare PATH...`: accuracy per mode against a baseline, errors per layer, checks.

Finds every run (lm-eval results file with a `config.floatsim` section, plus its dump) under the
paths, splits them by model and scales (runs calibrated differently are not comparable) and keeps
the latest run of each mode configuration. Prints Markdown; `--out DIR` also writes compare.md,
compare.json and PNG plots. Exit 0 all good, 1 a metric dropped more than `--max-drop` below the
baseline or a check failed, 2 unusable input.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from .errors import ArgumentError, InputError
from .files import write_json_atomic, write_text_atomic
from .modes import KERNEL_ROUNDING, is_quantized, mode_names
from .report import direction, fmt, fmt_err, fmt_signed, markdown_table
from .runs import comparable_groups, find_runs, group_operands, group_scales, latest_per_label, metric_id, metric_name, summarize

COMPARE_FORMAT = "lm_eval_floatsim.compare/1"


def add_arguments(parser) -> None:
    parser.add_argument("paths", nargs="+", metavar="PATH", help="results files or folders searched for results_*.json")
    parser.add_argument("--baseline", default="int8",
                        help="the mode the others are measured against: a mode (fp, int8, same, better) or a run label "
                             "such as better/2025 (default: int8)")
    parser.add_argument("--max-drop", type=float, default=None, metavar="X",
                        help="exit 1 when a task metric is worse than the baseline's by more than X (in the metric's "
                             "own units; respects lower-is-better metrics such as perplexity)")
    parser.add_argument("--out", default=None, metavar="DIR", help="also write compare.md, compare.json and PNG plots into DIR")


def run(args) -> int:
    validate_options(args.baseline, args.max_drop)
    comparison = compare_runs(find_runs(args.paths), args.baseline, args.max_drop)
    text = render_markdown(comparison)
    print(text, end="")
    if args.out:
        for path in write_outputs(comparison, text, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return comparison["exit_code"]


def validate_options(baseline: str, max_drop) -> None:
    modes = mode_names()
    if baseline.split("/")[0].split()[:1] not in [[mode] for mode in modes]:
        raise ArgumentError("--baseline", baseline, "a mode (" + ", ".join(modes) + ") or a run label such as better/2025")
    if max_drop is not None and not (math.isfinite(max_drop) and max_drop >= 0):
        raise ArgumentError("--max-drop", max_drop, "a finite number >= 0")


# --- building the comparison ---------------------------------------------------------------------


def resolve_baseline(baseline: str, summaries: list[dict]) -> tuple[dict | None, str]:
    """The run a baseline names (its exact label, or the only run of that mode), or None and why not."""
    exact = [s for s in summaries if s["label"] == baseline]
    same_mode = [s for s in summaries if s["mode"] == baseline]
    if exact or len(same_mode) == 1:
        return (exact or same_mode)[0], ""
    if same_mode:
        return None, f"`{baseline}` matches several runs ({', '.join(s['label'] for s in same_mode)}): name one with --baseline"
    return None, f"no `{baseline}` run among these (runs: {', '.join(s['label'] for s in summaries)})"


def metrics_table_data(summaries: list[dict], base: dict | None) -> list[dict]:
    """Per task and metric, each run's value, stderr and change against the baseline.

    `drop` is how much worse than the baseline a value is (positive = worse), in the metric's
    direction: baseline - value when higher is better, value - baseline when lower is better.
    """
    rows = {}
    for summary in summaries:
        for row in summary["metrics"]:
            rows.setdefault(metric_id(row), {key: row[key] for key in ("task", "display", "metric", "filter", "higher_is_better", "aggregate")})
    tables = []
    for key, info in sorted(rows.items(), key=lambda item: (item[1]["display"], item[0][1:])):
        base_row = _metric(base, key) if base else None
        values = {}
        for summary in summaries:
            row = _metric(summary, key)
            if row is None:
                continue
            change = None if base_row is None else row["value"] - base_row["value"]
            drop = None if change is None else (-change if info["higher_is_better"] else change)
            values[summary["label"]] = {"value": row["value"], "stderr": row.get("stderr"), "change": change, "drop": drop}
        tables.append({**info, "values": values})
    return tables


def _metric(summary: dict, key: tuple) -> dict | None:
    return next((row for row in summary["metrics"] if metric_id(row) == key), None)


def layers_table_data(summaries: list[dict]) -> list[dict]:
    layers: dict[int, dict] = {}
    for summary in summaries:
        for layer in summary["layers"]:
            entry = layers.setdefault(layer["layer_idx"], {})
            entry[summary["label"]] = {k: layer.get(k) for k in ("sqnr_db", "max_abs_err", "mean_abs_err", "clamped_fraction")}
    return [{"layer_idx": idx, "values": values} for idx, values in sorted(layers.items())]


def gate_failures(tables: list[dict], base_label: str, max_drop: float) -> list[dict]:
    """Metrics (of tasks, not of group aggregates, which their subtasks already cover) that fell too far."""
    failures = []
    for table in tables:
        if table["aggregate"]:
            continue
        for label, value in table["values"].items():
            if label != base_label and value["drop"] is not None and value["drop"] > max_drop:
                failures.append({"task": table["task"], "metric": table["metric"], "filter": table["filter"], "run": label,
                                 "value": value["value"], "baseline": base_label,
                                 "baseline_value": value["value"] - value["change"], "drop": value["drop"]})
    return failures


def compare_group(summaries: list[dict], superseded: list[dict], baseline: str, max_drop) -> dict:
    base, why_not = resolve_baseline(baseline, summaries)
    if base is None and max_drop is not None:
        scales = (group_scales(summaries) or "?")[:12]
        raise InputError(f"--max-drop needs a baseline run: model {summaries[0].get('model')}, scales {scales}: {why_not}")
    tables = metrics_table_data(summaries, base)
    return {
        "model": summaries[0].get("model"),
        "scales_sha256": group_scales(summaries),
        "operand_rounding": group_operands(summaries),
        "baseline": base["label"] if base else None,
        "baseline_missing": why_not or None,
        "runs": [{k: s.get(k) for k in ("label", "mode", "divisor", "rounding", "clamp", "kernel_math", "operand_rounding", "date", "source", "dump_path",
                                         "mean_sqnr_db", "min_sqnr_db", "worst_layer", "max_abs_err")} for s in summaries],
        "superseded": [s.get("source") for s in superseded],
        "metrics": tables,
        "layers": layers_table_data(summaries),
        "failures": gate_failures(tables, base["label"], max_drop) if base and max_drop is not None else [],
    }


def plugin_sections(kept_runs: list[dict]) -> list[dict]:
    """Sections from `floatsim_compare_sections`: the built-in checks first, then third-party plugins'."""
    from .plugins import plugin_manager

    sections = []
    for returned in plugin_manager().hook.floatsim_compare_sections(runs=kept_runs):
        sections.extend(returned or [])
    return [{"title": s["title"], "markdown": s.get("markdown", ""), "checks": list(s.get("checks") or [])} for s in sections]


def compare_runs(found_runs: list[dict], baseline: str = "int8", max_drop=None) -> dict:
    """The whole comparison as a JSON-serializable dict (what compare.json holds)."""
    summaries = [summarize(run) for run in found_runs]
    run_of = {id(summary): run for summary, run in zip(summaries, found_runs)}
    groups, kept_runs = [], []
    for group in comparable_groups(summaries):
        kept, superseded = latest_per_label(group)
        kept_runs += [run_of[id(summary)] for summary in kept]
        groups.append(compare_group(kept, superseded, baseline, max_drop))
    sections = plugin_sections(list({id(run): run for run in kept_runs}.values()))  # an fp run joins every group
    failed_checks = [check for section in sections for check in section["checks"] if not check.get("ok")]
    failures = [failure for group in groups for failure in group["failures"]]
    return {
        "format": COMPARE_FORMAT,
        "baseline": baseline,
        "max_drop": max_drop,
        "groups": groups,
        "sections": sections,
        "exit_code": 1 if failures or failed_checks else 0,
    }


# --- Markdown ------------------------------------------------------------------------------------


def render_markdown(comparison: dict) -> str:
    groups = comparison["groups"]
    parts = [f"# Comparison of {len({run['source'] for g in groups for run in g['runs']})} runs",
             f"Baseline: `{comparison['baseline']}`" + ("" if comparison["max_drop"] is None else f"; maximum drop allowed: {comparison['max_drop']}") + "."]
    if len(groups) > 1:
        parts.append(f"The runs use {len(groups)} different models, calibrations (scales) or operands: they are not comparable "
                     "with each other, so each set is reported on its own.")
    for group in groups:
        parts += _group_markdown(group)
    for section in comparison["sections"]:
        parts += [f"## {section['title']}", _section_body(section)]
    parts += _verdict(comparison)
    return "\n\n".join(part for part in parts if part) + "\n"


def _group_markdown(group: dict) -> list[str]:
    labels = [run["label"] for run in group["runs"]]
    operands = "" if group["operand_rounding"] == KERNEL_ROUNDING else f", operands rounded {group['operand_rounding']}"
    parts = [f"## Model `{group['model']}`, scales `{(group['scales_sha256'] or '?')[:12]}`{operands}",
             "Runs: " + "; ".join(f"{run['label']} (`{run['source']}`)" for run in group["runs"])]
    if group["superseded"]:
        parts.append("Older runs of the same modes, not shown: " + ", ".join(f"`{s}`" for s in group["superseded"]))
    if group["baseline"] is None:
        parts.append(f"Changes are not shown: {group['baseline_missing']}.")
    for table in group["metrics"]:
        parts += [f"### {table['display']} — {metric_name(table)} ({direction(table)})", _metric_markdown(table, labels, group["baseline"])]
    quantized = [run["label"] for run in group["runs"] if is_quantized(run["mode"])]
    if group["layers"] and quantized:
        parts += ["### Per-layer SQNR (dB) and max abs error", _layers_markdown(group["layers"], quantized)]
    return parts


def _metric_markdown(table: dict, labels: list[str], base_label: str | None) -> str:
    rows = []
    for label in labels:
        value = table["values"].get(label)
        if value is None:
            rows.append([label, "—", "—", "—"])
            continue
        change = "baseline" if label == base_label else fmt_signed(value["change"])
        rows.append([label, fmt(value["value"]), fmt(value["stderr"]), change])
    return markdown_table(["mode", "value", "± stderr", f"change vs {base_label or '—'}"], rows)


def _layers_markdown(layers: list[dict], labels: list[str]) -> str:
    header = ["layer"] + [f"{label} {what}" for label in labels for what in ("SQNR", "max err")]
    rows = []
    for layer in layers:
        cells = [str(layer["layer_idx"])]
        for label in labels:
            value = layer["values"].get(label) or {}
            cells += [fmt(value.get("sqnr_db"), 2), fmt_err(value.get("max_abs_err"))]
        rows.append(cells)
    return markdown_table(header, rows)


def _section_body(section: dict) -> str:
    lines = [f"{_mark(check)} {check['name']}" + (f" — {check['detail']}" if check.get("detail") else "")
             for check in section["checks"]]
    return "\n".join(filter(None, [section["markdown"].strip(), "\n".join(f"- {line}" for line in lines)]))


def _mark(check: dict) -> str:
    if check.get("informational"):
        return "ℹ"
    return "✓" if check.get("ok") else "✗"


def _verdict(comparison: dict) -> list[str]:
    lines = []
    for group in comparison["groups"]:
        for f in group["failures"]:
            lines.append(f"- ✗ {f['task']} {f['metric']}: {f['run']} {f['value']:.4f} is {f['drop']:.4f} worse than "
                         f"{f['baseline']} {f['baseline_value']:.4f} (allowed {comparison['max_drop']})")
    failed = [f"- ✗ check failed: {check['name']} ({section['title']})"
              for section in comparison["sections"] for check in section["checks"] if not check.get("ok")]
    result = "FAIL" if comparison["exit_code"] else "PASS"
    return ["## Result", "\n".join(lines + failed + [f"**{result}**"])]


# --- files and plots -----------------------------------------------------------------------------


def write_outputs(comparison: dict, markdown: str, out_dir) -> list[Path]:
    out_dir = Path(out_dir)
    written = [write_text_atomic(out_dir / "compare.md", markdown), write_json_atomic(out_dir / "compare.json", comparison)]
    import matplotlib  # a dependency; imported here because a comparison without --out needs none of it

    matplotlib.use("Agg")
    for index, group in enumerate(comparison["groups"]):
        suffix = "" if len(comparison["groups"]) == 1 else f"_{index + 1}"
        written += plot_group(group, out_dir, suffix)
    return written


def plot_group(group: dict, out_dir: Path, suffix: str) -> list[Path]:
    written = []
    if group["metrics"]:
        written.append(plot_accuracy(group, out_dir / f"accuracy{suffix}.png"))
    if any(layer["values"] for layer in group["layers"]) and any(is_quantized(run["mode"]) for run in group["runs"]):
        written.append(plot_sqnr(group, out_dir / f"sqnr_by_layer{suffix}.png"))
    return written


def _title(group: dict) -> str:
    return f"{group['model']} · scales {(group['scales_sha256'] or '?')[:12]}"


# One look per run in every plot; int8 and same nearly coincide by design, so they differ in
# marker and line style as well as colour.
_MARKERS = ("s", "o", "x", "^", "v", "D", "P", "*")
_LINES = ("-", "-", "--", "-.", ":", "-", "--", "-.")


def run_styles(group: dict) -> dict[str, dict]:
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10").colors
    styles = {}
    for index, run in enumerate(group["runs"]):
        color = colors[index % len(colors)] if is_quantized(run["mode"]) else "0.35"
        styles[run["label"]] = {"color": color, "marker": _MARKERS[index % len(_MARKERS)], "linestyle": _LINES[index % len(_LINES)]}
    return styles


def save_figure(figure, path: Path) -> Path:
    import matplotlib.pyplot as plt

    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def plot_accuracy(group: dict, path: Path) -> Path:
    """One panel per metric: each task's value per mode as a point with ±1 stderr error bars.

    Points rather than bars: the modes differ by far less than the metrics' size, and bars would
    have to start at zero.
    """
    import matplotlib.pyplot as plt

    styles = run_styles(group)
    panels: dict[str, list[dict]] = {}
    for table in group["metrics"]:
        panels.setdefault(f"{metric_name(table)} ({'↑' if table['higher_is_better'] else '↓'})", []).append(table)
    widest = max(len(tables) for tables in panels.values())
    size = (max(6.5, 1.5 + widest * (0.45 + 0.18 * len(styles))), 3.4 * len(panels))
    figure, axes = plt.subplots(len(panels), 1, figsize=size, squeeze=False)
    offset = 0.7 / len(styles)
    for axis, (metric, tables) in zip(axes[:, 0], panels.items()):
        for index, (label, style) in enumerate(styles.items()):
            xs = [t + (index - (len(styles) - 1) / 2) * offset for t in range(len(tables))]
            values = [(table["values"].get(label) or {}) for table in tables]
            axis.errorbar(xs, [v.get("value", math.nan) for v in values], yerr=[v.get("stderr") or 0.0 for v in values],
                          fmt=style["marker"], color=style["color"], capsize=3, markersize=6, label=label)
        crowded = len(tables) > 3
        axis.set_xticks(range(len(tables)), [table["display"] for table in tables],
                        rotation=25 if crowded else 0, ha="right" if crowded else "center")
        axis.set_xlim(-0.6, len(tables) - 0.4)
        axis.set_ylabel(metric)
        axis.grid(axis="y", alpha=0.3)
    axes[0, 0].set_title(f"Task metrics by mode (error bars: ±1 stderr)\n{_title(group)}")
    axes[0, 0].legend(title="mode", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return save_figure(figure, path)


def plot_sqnr(group: dict, path: Path) -> Path:
    """SQNR in dB per layer, one line per quantized mode."""
    import matplotlib.pyplot as plt

    styles = {label: style for label, style in run_styles(group).items()
              if is_quantized(next(run for run in group["runs"] if run["label"] == label)["mode"])}
    indices = [layer["layer_idx"] for layer in group["layers"]]
    figure, axis = plt.subplots(figsize=(max(7.0, 0.3 * len(indices) + 2.5), 4.2))
    for label, style in styles.items():
        values = [(layer["values"].get(label) or {}).get("sqnr_db") for layer in group["layers"]]
        axis.plot(indices, [math.nan if v is None else v for v in values], markersize=5, label=label, **style)
    axis.set_xticks(indices)
    axis.set_xlim(min(indices) - 0.5, max(indices) + 0.5)
    axis.set_xlabel("layer")
    axis.set_ylabel("SQNR of the Conv1D+SiLU output (dB)")
    axis.set_title(f"Quantization SQNR by layer (higher is better)\n{_title(group)}")
    axis.grid(alpha=0.3)
    axis.legend(title="mode", fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    figure.tight_layout()
    return save_figure(figure, path)
