"""The run report (report.json / report.md beside a run's dump), and the Markdown tables `compare` shares.

The report relates one run's task metrics to its per-layer quantization errors and, when the
same output folder holds runs of other modes with the same model and scales, sets them side by
side: accuracy against mean SQNR per mode, and the layers whose errors differ most between them.
"""

from __future__ import annotations

import math
from pathlib import Path

from . import runs
from .errors import InputError
from .files import write_json_atomic, write_text_atomic
from .runs import comparable, comparable_key, latest_per_label, metric_id, metric_name, summarize

REPORT_FORMAT = "lm_eval_floatsim.report/1"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
# Cross-run tables get one column per metric; beyond this many they are listed in report.json only.
MAX_METRIC_COLUMNS = 6
TOP_DIFFERING_LAYERS = 5


# --- formatting ----------------------------------------------------------------------------------


def _fixed_point_fits(value: float) -> bool:
    """Fixed decimals read best for accuracies and dB; a random model's perplexity of 1e14 does not."""
    return value == 0 or 1e-3 <= abs(value) < 1e6


def fmt(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}" if _fixed_point_fits(value) else f"{value:.{digits}g}"


def fmt_err(value) -> str:
    """Quantization errors span many decades (int8 vs divisor 2025): scientific notation."""
    return "—" if value is None else f"{value:.3e}"


def fmt_signed(value, digits: int = 4) -> str:
    if value is None:
        return "—"
    return f"{value:+.{digits}f}" if _fixed_point_fits(value) else f"{value:+.{digits}g}"


def fmt_percent(value) -> str:
    return "—" if value is None else f"{100 * value:.4f}%"


def markdown_table(header: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """A GitHub Markdown table; `align` is one letter per column (l or r), default l then r."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = [header, rule, *rows]
    return "\n".join("| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines)


def direction(row: dict) -> str:
    return "higher is better" if row["higher_is_better"] else "lower is better"


# --- analysis across runs ------------------------------------------------------------------------


def pearson(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    syy = sum((y - mean_y) ** 2 for y in ys)
    if sxx == 0 or syy == 0:
        return None
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / math.sqrt(sxx * syy)


def metric_value(summary: dict, key: tuple) -> dict | None:
    return next((row for row in summary["metrics"] if metric_id(row) == key), None)


def correlations(summaries: list[dict]) -> list[dict]:
    """Pearson r between each metric and the mean SQNR over the quantized runs (3 or more needed)."""
    quantized = [s for s in summaries if s.get("mean_sqnr_db") is not None]
    keys = list(dict.fromkeys(metric_id(row) for s in quantized for row in s["metrics"] if not row["aggregate"]))
    found = []
    for key in keys:
        pairs = [(s["mean_sqnr_db"], metric_value(s, key)["value"]) for s in quantized if metric_value(s, key)]
        r = pearson([x for x, _ in pairs], [y for _, y in pairs])
        if r is not None:
            found.append({"task": key[0], "metric": key[1], "filter": key[2], "pearson_r": r, "runs": len(pairs)})
    return found


def layers_differing_most(summaries: list[dict], top: int = TOP_DIFFERING_LAYERS) -> list[dict]:
    """The layers whose SQNR spreads most across the runs (max - min over the runs that have one)."""
    by_layer: dict[int, dict[str, float]] = {}
    for summary in summaries:
        for layer in summary["layers"]:
            if layer.get("sqnr_db") is not None:
                by_layer.setdefault(layer["layer_idx"], {})[summary["label"]] = layer["sqnr_db"]
    spreads = [
        {"layer_idx": idx, "sqnr_spread_db": max(values.values()) - min(values.values()), "sqnr_db": values}
        for idx, values in by_layer.items()
        if len(values) >= 2
    ]
    return sorted(spreads, key=lambda row: (-row["sqnr_spread_db"], row["layer_idx"]))[:top]


def headline_metrics(summaries: list[dict]) -> list[tuple]:
    """The metric columns of a cross-run table: the tasks' own metrics, else the groups', capped."""
    rows = [row for s in summaries for row in s["metrics"]]
    plain = list(dict.fromkeys(metric_id(row) for row in rows if not row["aggregate"]))
    groups = list(dict.fromkeys(metric_id(row) for row in rows if row["aggregate"]))
    chosen = plain if len(plain) <= MAX_METRIC_COLUMNS or not groups else groups
    return chosen[:MAX_METRIC_COLUMNS]


def metric_heading(summaries: list[dict], key: tuple) -> str:
    row = next(row for s in summaries for row in s["metrics"] if metric_id(row) == key)
    arrow = "↑" if row["higher_is_better"] else "↓"
    return f"{row['display']} {metric_name(row)} {arrow}"


def accuracy_vs_error_table(summaries: list[dict], marked: str | None = None) -> str:
    keys = headline_metrics(summaries)
    header = ["run", "mean SQNR (dB)", "worst layer: SQNR (dB)", "max abs err"] + [metric_heading(summaries, k) for k in keys]
    rows = []
    for s in summaries:
        worst = "—" if s.get("worst_layer") is None else f"{s['worst_layer']}: {fmt(s['min_sqnr_db'], 2)}"
        cells = [f"**{s['label']}** (this run)" if s["label"] == marked else s["label"],
                 fmt(s.get("mean_sqnr_db"), 2), worst, fmt_err(s.get("max_abs_err"))]
        for key in keys:
            row = metric_value(s, key)
            cells.append("—" if row is None else _value_with_stderr(row))
        rows.append(cells)
    return markdown_table(header, rows)


def _value_with_stderr(row: dict) -> str:
    return fmt(row["value"]) + ("" if row.get("stderr") is None else f" ± {fmt(row['stderr'])}")


# --- one run -------------------------------------------------------------------------------------


def metrics_table(summary: dict) -> str:
    rows = [[row["display"], metric_name(row), "↑" if row["higher_is_better"] else "↓", fmt(row["value"]), fmt(row.get("stderr"))]
            for row in summary["metrics"]]
    return markdown_table(["task", "metric", "", "value", "± stderr"], rows, "lllrr")


def layer_stats_table(layers: list[dict]) -> str:
    rows = [[str(layer["layer_idx"]), fmt(layer.get("count")), fmt_err(layer.get("max_abs_err")), fmt_err(layer.get("mean_abs_err")),
             fmt(layer.get("sqnr_db"), 2), fmt_percent(layer.get("clamped_fraction")), fmt(layer.get("nonfinite"))]
            for layer in layers]
    header = ["layer", "count", "max abs err", "mean abs err", "SQNR (dB)", "clamped", "non-finite"]
    return markdown_table(header, rows)


def differing_layers_table(differing: list[dict], labels: list[str]) -> str:
    rows = [[str(row["layer_idx"]), fmt(row["sqnr_spread_db"], 2)] + [fmt(row["sqnr_db"].get(label), 2) for label in labels]
            for row in differing]
    return markdown_table(["layer", "SQNR spread (dB)"] + [f"{label} SQNR (dB)" for label in labels], rows)


def build_report(run: dict, others: list[dict], not_comparable: int = 0) -> dict:
    """The report of `run` (a hook run dict) beside `others` (summaries of comparable runs)."""
    this = summarize(run)
    together, _ = latest_per_label([s for s in others if s["label"] != this["label"]] + [this])
    return {
        "format": REPORT_FORMAT,
        "run": this,
        "runs": together,
        "not_comparable": not_comparable,
        "correlations": correlations(together),
        "layers_differing_most": layers_differing_most(together),
    }


def render_markdown(report: dict) -> str:
    this, together = report["run"], report["runs"]
    scales = (this.get("scales_sha256") or "?")[:12]
    parts = [
        f"# Float-simulation run report: {this['label']}",
        f"Model `{this.get('model')}`, scales `{scales}`, dump `{this.get('dump_path')}`.",
        "## Task metrics",
        metrics_table(this) if this["metrics"] else "No task metrics in the results.",
        "## Per-layer quantization error",
        layer_stats_table(this["layers"]),
        _sqnr_sentence(this),
        "## Accuracy against per-layer error across runs",
    ]
    if len(together) < 2:
        parts.append("No other run of this model with these scales was found beside this one: evaluate other "
                     "modes with the same `--output_path` (or `dump_dir`) to relate accuracy to the errors.")
    else:
        parts += ["Latest run of each mode with this model and these scales:", accuracy_vs_error_table(together, this["label"])]
        parts += _correlation_lines(report["correlations"])
        if report["layers_differing_most"]:
            quantized = [s["label"] for s in together if s.get("mean_sqnr_db") is not None]
            parts += ["## Layers whose errors differ most between the runs",
                      differing_layers_table(report["layers_differing_most"], quantized)]
    if report["not_comparable"]:
        parts.append(f"{report['not_comparable']} run(s) with another model or other scales were left out: "
                     "runs calibrated differently are not comparable.")
    return "\n\n".join(parts) + "\n"


def _sqnr_sentence(summary: dict) -> str:
    if summary.get("mean_sqnr_db") is None:
        return "No layer has a quantization error (unquantized run)."
    return (f"Mean SQNR {fmt(summary['mean_sqnr_db'], 2)} dB over the layers; worst layer {summary['worst_layer']} "
            f"({fmt(summary['min_sqnr_db'], 2)} dB); largest error {fmt_err(summary['max_abs_err'])}.")


def _correlation_lines(found: list[dict]) -> list[str]:
    if not found:
        return []
    lines = [f"- {row['task']} {row['metric']}: r = {row['pearson_r']:+.3f} over {row['runs']} quantized runs" for row in found]
    return ["Pearson correlation of each metric with the mean SQNR:\n\n" + "\n".join(lines)]


# --- writing -------------------------------------------------------------------------------------


def previous_report_runs(path: Path) -> list[dict]:
    """The runs a report already in the folder related (a dump folder shared by runs without results files)."""
    try:
        report = runs.read_json(path, "report")
    except InputError:
        return []
    if not isinstance(report, dict) or report.get("format") != REPORT_FORMAT:
        return []
    return [s for s in report.get("runs") or [] if isinstance(s, dict) and {"label", "mode", "metrics", "layers"} <= set(s)]


def related_runs(run: dict, output_dir) -> tuple[list[dict], int]:
    """Summaries of the other runs in the same output folder: (same model and scales, count of the rest).

    Looks at lm-eval results files in `output_dir` and its parent (where `--output_path` puts
    them) and at the runs a previous report in `output_dir` related.
    """
    output_dir = Path(output_dir)
    found = [summarize(other) for other in runs.find_runs_quietly([output_dir, output_dir.parent])]
    found += previous_report_runs(output_dir / REPORT_JSON)
    this = summarize(run)
    same = [s for s in found if comparable(s, this)]
    other_labels = {(comparable_key(s), s["label"]) for s in found if not comparable(s, this)}
    return same, len(other_labels)


def write_run_report(run: dict, output_dir) -> list[Path]:
    """Write report.json and report.md into `output_dir`; return their paths."""
    others, not_comparable = related_runs(run, output_dir)
    report = build_report(run, others, not_comparable)
    output_dir = Path(output_dir)
    return [write_json_atomic(output_dir / REPORT_JSON, report),
            write_text_atomic(output_dir / REPORT_MD, render_markdown(report))]
