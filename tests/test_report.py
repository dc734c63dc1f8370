"""The run report the built-in `floatsim_run_finished` writes: report.json and report.md.

Runs are the synthetic ones of helpers_runs (lm-eval 0.4.13's results shape, dumps in the user's
format); expected numbers are recomputed here from the fixture values with numpy.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers_runs import METRICS, MODEL_FOLDER, N_LAYER, TASKS, layer_stats, make_dump, make_results, make_scales, write_run
from lm_eval_floatsim.plugins import plugin_manager


def hook_run(label: str, metrics: dict | None = None, scales: dict | None = None, date: float = 1.9e9, dump_dir="/tmp/dumps") -> dict:
    """The run dict the lm-eval model passes to `floatsim_run_finished`."""
    mode, _, divisor_text = label.partition("/")
    divisor = float(divisor_text) if divisor_text else None
    scales = scales or make_scales()
    dump = make_dump(mode, divisor, scales)
    dump_path = f"{dump_dir}/{mode}.json"
    results = make_results(mode, divisor, metrics or METRICS[label], scales, dump, dump_path, date)
    return {"results": results, "dump": dump, "dump_path": dump_path, "scales": scales}


def finish(run: dict, output_dir) -> dict:
    (written,) = plugin_manager().hook.floatsim_run_finished(run=run, output_dir=str(output_dir))
    assert sorted(p.rsplit("/", 1)[-1] for p in written) == ["report.json", "report.md"]
    return json.loads((output_dir / "report.json").read_text())


def expected_sqnrs(label: str) -> list[float]:
    mode, _, divisor = label.partition("/")
    scales = make_scales()
    return [layer_stats(mode, float(divisor) if divisor else None, i, scales["layers"][i]["output_scale"])["sqnr_db"]
            for i in range(N_LAYER)]


def test_report_of_one_run_holds_its_metrics_and_layer_errors(tmp_path):
    report = finish(hook_run("better/2025"), tmp_path)
    run = report["run"]
    assert run["label"] == "better/2025" and run["mode"] == "better"
    got = {(m["task"], m["metric"]): (m["value"], m["stderr"], m["higher_is_better"]) for m in run["metrics"]}
    for task in TASKS:
        for metric, (value, stderr) in METRICS["better/2025"][task].items():
            assert got[(task, metric)] == (pytest.approx(value), pytest.approx(stderr), metric == "acc")
    scales = make_scales()
    for layer in run["layers"]:
        expected = layer_stats("better", 2025.0, layer["layer_idx"], scales["layers"][layer["layer_idx"]]["output_scale"])
        assert {key: layer[key] for key in expected} == pytest.approx(expected)
    sqnrs = expected_sqnrs("better/2025")
    assert run["mean_sqnr_db"] == pytest.approx(np.mean(sqnrs))
    assert run["worst_layer"] == int(np.argmin(sqnrs)) and run["min_sqnr_db"] == pytest.approx(min(sqnrs))
    assert [s["label"] for s in report["runs"]] == ["better/2025"]

    markdown = (tmp_path / "report.md").read_text()
    assert markdown.startswith("# Float-simulation run report: better/2025")
    value, stderr = METRICS["better/2025"]["lambada_standard"]["perplexity"]
    assert f"| lambada_standard | perplexity | ↓ | {value:.4f} | {stderr:.4f} |" in markdown
    assert "| 3 | 4000 | " in markdown and f"{sqnrs[3]:.2f}" in markdown
    assert "No other run of this model with these scales" in markdown


def test_report_relates_the_runs_in_the_same_output_folder(tmp_path):
    # What `lm_eval --output_path tmp_path` leaves for earlier runs of other modes (and a run with
    # other scales, which must stay out), then this run's folder beside them.
    for i, label in enumerate(("fp", "int8", "same")):
        write_run(tmp_path, label, date=1.8e9 + i)
    write_run(tmp_path, "int8", METRICS["fp"], scales=make_scales(seed=9), date=1.8e9 + 9)
    output_dir = tmp_path / MODEL_FOLDER / "floatsim_2027-01-16T00-00-00.000000"
    report = finish(hook_run("better/2025"), output_dir)

    assert [s["label"] for s in report["runs"]] == ["fp", "int8", "same", "better/2025"]
    assert report["not_comparable"] == 1
    means = {label: np.mean(expected_sqnrs(label)) for label in ("int8", "same", "better/2025")}
    for summary in report["runs"]:
        if summary["label"] == "fp":
            assert summary["mean_sqnr_db"] is None
        else:
            assert summary["mean_sqnr_db"] == pytest.approx(means[summary["label"]])

    # Accuracy against mean SQNR over the quantized runs: Pearson r as numpy computes it.
    correlations = {(c["task"], c["metric"]): c for c in report["correlations"]}
    for task in TASKS:
        for metric in ("acc", "perplexity"):
            labels = list(means)
            r = np.corrcoef([means[l] for l in labels], [METRICS[l][task][metric][0] for l in labels])[0, 1]
            assert correlations[(task, metric)]["pearson_r"] == pytest.approx(r, abs=1e-9)
            assert correlations[(task, metric)]["runs"] == 3

    # The layers whose SQNR differs most between the runs, largest spread first.
    per_layer = np.array([expected_sqnrs(label) for label in means])
    spread = per_layer.max(axis=0) - per_layer.min(axis=0)
    top = report["layers_differing_most"]
    assert [row["layer_idx"] for row in top] == sorted(range(N_LAYER), key=lambda i: (-spread[i], i))
    assert top[0]["sqnr_spread_db"] == pytest.approx(spread.max())

    markdown = (output_dir / "report.md").read_text()
    acc, stderr = METRICS["same"]["lambada_openai"]["acc"]
    assert f"| same | {means['same']:.2f} | 0: {expected_sqnrs('same')[0]:.2f} |" in markdown
    assert f"{acc:.4f} ± {stderr:.4f}" in markdown
    assert "| **better/2025** (this run) |" in markdown
    assert "## Layers whose errors differ most between the runs" in markdown
    assert "1 run(s) with another model or other scales were left out" in markdown


def test_a_shared_dump_folder_accumulates_the_runs(tmp_path):
    """Without --output_path every run writes into dump_dir: each report keeps the earlier ones."""
    finish(hook_run("int8", date=1.9e9), tmp_path)
    finish(hook_run("same", date=1.9e9 + 1), tmp_path)
    report = finish(hook_run("better/2025", date=1.9e9 + 2), tmp_path)
    assert [s["label"] for s in report["runs"]] == ["int8", "same", "better/2025"]
    int8 = report["runs"][0]
    acc = next(m for m in int8["metrics"] if (m["task"], m["metric"]) == ("lambada_openai", "acc"))
    assert acc["value"] == pytest.approx(METRICS["int8"]["lambada_openai"]["acc"][0])


def test_a_rerun_of_a_mode_replaces_the_earlier_one(tmp_path):
    finish(hook_run("int8", date=1.9e9), tmp_path)
    finish(hook_run("same", date=1.9e9 + 1), tmp_path)
    rerun = {task: {"acc": (0.25, 0.01), "perplexity": (20.0, 1.0)} for task in TASKS}
    report = finish(hook_run("int8", rerun, date=1.9e9 + 2), tmp_path)
    assert [s["label"] for s in report["runs"]] == ["int8", "same"]
    assert report["runs"][0]["metrics"][0]["value"] == pytest.approx(0.25)
