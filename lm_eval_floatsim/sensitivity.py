"""`lm-eval-floatsim sensitivity --mode M [--divisor N] --out DIR -- <lm_eval args>`: which blocks matter.

In one process, as `sweep` does (the model loaded and calibrated once, lm-eval's task index built
once), it evaluates `fp`, the mode in every block, and the mode in each block alone
(`layers=<i>`; with `--leave-one-out` also in every block but one). Each run is saved under
`--output_path` exactly as `lm_eval` saves it, so a block's entry is the run that
`lm_eval --model_args ...,mode=M,layers=<i>` gives. Then it writes into `--out`:
- `sensitivity.json`: {"mode", "divisor", "baseline": {"fp": metrics, "full": metrics},
  "layers": [{"layer_idx", "metrics", "delta", "sqnr_db"}], "leave_one_out": [...]}, metrics as
  {task: {metric: value}} with lm-eval's keys ("acc,none"), delta = metric - fp's;
- `sensitivity.md`: the blocks ranked by the change of each task's first metric, with stderr;
- `sensitivity.png`: that change and the block's SQNR, per block.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import sweep
from .errors import ArgumentError, InputError
from .compare import save_figure
from .files import write_json_atomic, write_text_atomic
from .modes import QuantSpec, format_divisor, format_layers
from .report import fmt, fmt_signed, markdown_table
from .runs import metric_rows

SENSITIVITY_FORMAT = "lm_eval_floatsim.sensitivity/1"
# Model arguments sensitivity sets itself for each run.
SET_HERE = {name: "sensitivity sets it from --mode/--divisor and each block" for name in ("mode", "divisor", "layers")}


def add_arguments(parser) -> None:
    parser.add_argument("--mode", required=True, help="the quantized mode whose blocks are tried one at a time")
    parser.add_argument("--divisor", default=None, help="the divisor of a mode with a finer scale (default 2025)")
    parser.add_argument("--out", required=True, metavar="DIR", help="where sensitivity.json, .md and .png go")
    parser.add_argument("--leave-one-out", action="store_true", help="also evaluate the mode in every block but one")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                        help="after --: lm_eval's own arguments (--model_args, --tasks, --output_path, --limit, ...)")


def run(args) -> int:
    spec = chosen_spec(args.mode, args.divisor)
    out = Path(args.out)
    if out.is_file():
        raise ArgumentError("--out", args.out, "a folder (this is a file)")
    config = sweep.lm_eval_config(args.lm_eval_args, SET_HERE)
    divisor = spec.divisor if spec.kind.takes_divisor else None
    lm = sweep.build_lm(sweep.run_model_args(config.model_args, spec.mode, divisor), config)
    n_layer = lm.model.config.n_layer
    plan = sensitivity_plan(spec.mode, divisor, n_layer, args.leave_one_out)
    evaluated = list(sweep.evaluate_runs(lm, config, plan, progress=True))
    if not evaluated:  # a data-parallel rank other than 0: rank 0 writes
        return 0
    report = sensitivity_report(spec, plan, [results for results, _ in evaluated])
    text = render_markdown(report)
    out.mkdir(parents=True, exist_ok=True)
    written = [write_json_atomic(out / "sensitivity.json", report), write_text_atomic(out / "sensitivity.md", text),
               plot(report, out / "sensitivity.png")]
    print(text, end="")
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    return 0


def chosen_spec(mode: str, divisor) -> QuantSpec:
    spec = QuantSpec(mode, sweep.parse_divisor(divisor) if divisor is not None else QuantSpec.divisor)
    if not spec.quantized:
        raise ArgumentError("--mode", mode, "a quantized mode (its blocks are quantized one at a time)")
    if divisor is not None and not spec.kind.takes_divisor:
        raise ArgumentError("--divisor", divisor, f"no value: mode {mode} takes no divisor")
    return spec


def sensitivity_plan(mode: str, divisor, n_layer: int, leave_one_out: bool) -> list[sweep.PlannedRun]:
    """fp, the mode in every block, in each block alone, then (optionally) in all blocks but one."""
    plan = [sweep.PlannedRun("fp", None), sweep.PlannedRun(mode, divisor)]
    plan += [sweep.PlannedRun(mode, divisor, (i,)) for i in range(n_layer)]
    if leave_one_out and n_layer > 1:
        plan += [sweep.PlannedRun(mode, divisor, tuple(j for j in range(n_layer) if j != i)) for i in range(n_layer)]
    return plan


# --- the report ----------------------------------------------------------------------------------


def metrics_of(results: dict, field: str = "value") -> dict:
    """{task: {"acc,none": value, ...}} with lm-eval's metric keys (groups' aggregates left out);
    field="stderr" gives their standard errors."""
    found: dict = {}
    for row in metric_rows(results):
        if not row["aggregate"]:
            found.setdefault(row["task"], {})[f"{row['metric']},{row['filter']}"] = row[field]
    return found


def delta(metrics: dict, reference: dict) -> dict:
    return {task: {key: value - reference[task][key] for key, value in values.items() if key in reference.get(task, {})}
            for task, values in metrics.items()}


def block_sqnr(results: dict, layer_idx: int):
    layers = results["config"]["floatsim"]["layers"]
    return next((layer.get("sqnr_db") for layer in layers if layer["layer_idx"] == layer_idx), None)


def sensitivity_report(spec: QuantSpec, plan: list, evaluated: list[dict]) -> dict:
    by_run = dict(zip(plan, evaluated))
    fp = metrics_of(by_run[plan[0]])
    full_results = by_run[plan[1]]

    def entry(run, layer_idx):
        results = by_run[run]
        metrics = metrics_of(results)
        return {"layer_idx": layer_idx, "layers": format_layers(run.layers), "metrics": metrics,
                "stderr": metrics_of(results, "stderr"), "delta": delta(metrics, fp), "sqnr_db": block_sqnr(results, layer_idx)}

    singles = [run for run in plan[2:] if len(run.layers) == 1]
    all_but = [run for run in plan[2:] if len(run.layers) != 1]
    n_layer = len(singles)
    return {
        "format": SENSITIVITY_FORMAT,
        "mode": spec.mode,
        "divisor": spec.divisor if spec.kind.takes_divisor else None,
        "baseline": {"fp": fp, "full": metrics_of(full_results)},
        "full_delta": delta(metrics_of(full_results), fp),
        "layers": [entry(run, run.layers[0]) for run in singles],
        "leave_one_out": [entry(run, next(i for i in range(n_layer) if i not in run.layers)) for run in all_but],
    }


def ranked_metrics(report: dict) -> list[tuple[str, str]]:
    """(task, metric key) of each task's first metric: what the blocks are ranked by."""
    return [(task, next(iter(values))) for task, values in sorted(report["baseline"]["fp"].items()) if values]


def render_markdown(report: dict) -> str:
    label = report["mode"] if report["divisor"] is None else f"{report['mode']}/{format_divisor(report['divisor'])}"
    parts = [f"# Sensitivity of each block to {label}"]
    for task, key in ranked_metrics(report):
        fp, full = report["baseline"]["fp"][task][key], report["baseline"]["full"][task][key]
        parts.append(f"## {task} — {key.split(',')[0]}: fp {fmt(fp)}, every block {label} {fmt(full)} "
                     f"({fmt_signed(full - fp)})")
        entries = sorted(report["layers"], key=lambda e: abs(e["delta"][task][key]), reverse=True)
        rows = [[str(e["layer_idx"]), fmt(e["metrics"][task][key]), fmt(e["stderr"][task][key]),
                 fmt_signed(e["delta"][task][key]), fmt(e["sqnr_db"], 2)] for e in entries]
        parts.append("Blocks quantized alone, largest change first:\n\n"
                     + markdown_table(["block", key.split(",")[0], "stderr", "change vs fp", "SQNR (dB)"], rows))
        if report["leave_one_out"]:
            rows = [[str(e["layer_idx"]), fmt(e["metrics"][task][key]), fmt(e["stderr"][task][key]),
                     fmt_signed(e["metrics"][task][key] - full)]
                    for e in sorted(report["leave_one_out"], key=lambda e: e["metrics"][task][key] - full, reverse=True)]
            parts.append("Every block but one quantized, most recovered first:\n\n"
                         + markdown_table(["block left out", key.split(",")[0], "stderr", "change vs every block"], rows))
    return "\n\n".join(parts) + "\n"


def plot(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranked = ranked_metrics(report)
    if not ranked:
        raise InputError("sensitivity: the tasks reported no metric to plot")
    task, key = ranked[0]
    blocks = [e["layer_idx"] for e in report["layers"]]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.35 * len(blocks) + 2), 6), sharex=True)
    top.bar(blocks, [e["delta"][task][key] for e in report["layers"]], color="tab:red")
    top.axhline(0, color="0.4", linewidth=0.8)
    top.set_ylabel(f"{task} {key.split(',')[0]}\nchange vs fp")
    top.set_title(f"{report['mode']}: each block quantized alone")
    bottom.plot(blocks, [e["sqnr_db"] if e["sqnr_db"] is not None else float("nan") for e in report["layers"]], marker="o")
    bottom.set_ylabel("SQNR of the block (dB)")
    bottom.set_xlabel("block")
    return save_figure(figure, path)
