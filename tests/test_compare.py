"""`lm-eval-floatsim compare`: tables, the --max-drop gate, unusable input, scales, groups, --out.

The runs are fixtures written here the way lm-eval 0.4.13 and the floatsim model lay them out:
`<output_path>/<model>/results_<date_id>.json` (keys as lm-eval's EvaluationTracker writes them)
and the dump in `floatsim_<date_id>/` beside it, recorded under a path that no longer exists. The
dump values are quantized here with numpy float32 (the user's rule, written out independently), so
the real checks pass on them. Expected table values are computed from the fixture numbers.

The builders are shared with test_report.py, test_sweep.py and test_example_plugin.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lm_eval_floatsim import cli
from lm_eval_floatsim.plugins import plugin_manager

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny/mamba-demo"
MODEL_FOLDER = "tiny__mamba-demo"  # lm-eval's sanitize_model_name
N_LAYER = 4
DUMP_N = 10
DUMP_NAMES = {"fp": "fp_reference.json", "int8": "int8_baseline.json", "same": "floatsim_samescale.json"}
HIGHER_IS_BETTER = {"acc": True, "perplexity": False}
TASKS = ("lambada_openai", "lambada_standard")  # lm-eval's `lambada` tag: two tasks, no group entry

# Task metrics per run: {task: {metric: (value, stderr)}}.
METRICS = {
    "fp": {"lambada_openai": {"acc": (0.62, 0.0068), "perplexity": (5.10, 0.12)},
           "lambada_standard": {"acc": (0.55, 0.0069), "perplexity": (7.90, 0.21)}},
    "int8": {"lambada_openai": {"acc": (0.60, 0.0068), "perplexity": (5.40, 0.13)},
             "lambada_standard": {"acc": (0.53, 0.0070), "perplexity": (8.30, 0.22)}},
    "same": {"lambada_openai": {"acc": (0.59, 0.0069), "perplexity": (5.45, 0.13)},
             "lambada_standard": {"acc": (0.53, 0.0070), "perplexity": (8.35, 0.22)}},
    "better/2025": {"lambada_openai": {"acc": (0.615, 0.0068), "perplexity": (5.15, 0.12)},
                    "lambada_standard": {"acc": (0.545, 0.0069), "perplexity": (7.95, 0.21)}},
}


# --- fixture builders ----------------------------------------------------------------------------


def f32(value) -> float:
    return float(np.float32(value))


def make_scales(seed: int = 0, n_layer: int = N_LAYER, model: str = MODEL) -> dict:
    rng = np.random.default_rng(seed)
    layers = [{"layer_idx": i, "input_scale": f32(0.02 + 0.01 * rng.random()), "output_scale": f32(0.01 + 0.004 * i + 0.001 * rng.random()),
               "weight_scale": f32(0.003), "bias_scale": f32(0.001)} for i in range(n_layer)]
    content = {"format": "lm_eval_floatsim.scales/1", "model": model,
               "settings": {"calib_data": "calib.txt", "calib_samples": 8, "calib_seqlen": 64, "percentile": 0.9995}, "layers": layers}
    content["sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return content


def round_half_away(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def layer_stats(mode: str, divisor, layer_idx: int, scale: float, sqnr_offset: float = 0.0) -> dict:
    """Made-up statistics with the right ordering: finer scale, smaller error; fp has none."""
    if mode == "fp":
        return {"count": 4000, "max_abs_err": 0.0, "mean_abs_err": 0.0, "sqnr_db": None, "clamped_fraction": 0.0, "nonfinite": 0}
    step = scale / (divisor if mode == "better" else 1.0)
    sqnr = 28.0 + 1.5 * layer_idx + (0.3 if mode == "same" else 0.0) + sqnr_offset
    if mode == "better":  # the finer grid gains 20 log10(divisor) dB, some layers less than others
        sqnr += 20 * math.log10(divisor) - (4.0, 0.0, 7.0, 2.0)[layer_idx % 4]
    return {"count": 4000, "max_abs_err": step / 2, "mean_abs_err": step / 4, "sqnr_db": sqnr,
            "clamped_fraction": 0.0 if mode == "better" else 0.0005 * (layer_idx + 1), "nonfinite": 0}


def make_dump(mode: str, divisor, scales: dict, seed: int = 1, sqnr_offset: float = 0.0) -> dict:
    """A dump in the user's format: the same pre-quantization values y in every mode, quantized here."""
    rng = np.random.default_rng(seed)
    clamp = "range" if mode in ("int8", "same") else ("range" if mode == "better" else None)
    code_range = {"fp": None, "int8": [-128.0, 127.0], "same": [-128.0, 127.0]}.get(mode)
    if mode == "better":
        code_range = [-128.0 * divisor, 127.0 * divisor]
    config = {"float_sim_asic": mode in ("same", "better"), "float_sim_better_scale": mode == "better",
              "format": "lm_eval_floatsim.dump/1", "mode": mode, "divisor": float(divisor) if mode == "better" else None,
              "rounding": None if mode == "fp" else "half_away", "clamp": clamp, "code_range": code_range,
              "model": scales["model"], "scales_sha256": scales["sha256"], "calibration": scales["settings"],
              "n_layer": len(scales["layers"]), "dump_n": DUMP_N, "package_version": "0.1.0"}
    layers = []
    for entry in scales["layers"]:
        s = entry["output_scale"]
        y = rng.uniform(-90 * s, 90 * s, DUMP_N).astype(np.float32)  # inside the int8 range: no clamping
        effective = None if mode == "fp" else (s / divisor if mode == "better" else s)
        if mode == "fp":
            before, after, codes = [float(v) for v in y], [float(v) for v in y], None
        else:
            code_values = round_half_away((y / np.float32(effective)).astype(np.float64))
            after = [float(np.float32(c) * np.float32(effective)) for c in code_values]
            before = [float(np.float32(c) * np.float32(s)) for c in code_values] if mode == "int8" else [float(v) for v in y]
            codes = [int(c) for c in code_values]
        layers.append({"layer_idx": entry["layer_idx"], "effective_scale": effective, "output_scale": s,
                       "before_quant": before, "after_quant": after, "codes": codes,
                       "input_scale": entry["input_scale"], "weight_scale": entry["weight_scale"], "bias_scale": entry["bias_scale"],
                       "stats": layer_stats(mode, divisor, entry["layer_idx"], s, sqnr_offset)})
    return {"config": config, "layers": layers}


def dump_name(mode: str, divisor) -> str:
    if mode == "better":
        return f"floatsim_betterscale_{int(divisor) if float(divisor).is_integer() else divisor}.json"
    return DUMP_NAMES[mode]


def make_results(mode: str, divisor, metrics: dict, scales: dict, dump: dict, dump_file: str, date: float,
                 groups: dict | None = None) -> dict:
    """A results dict shaped like lm-eval 0.4.13's results_<date>.json, with config.floatsim."""
    tasks = {}
    for task, values in metrics.items():
        entry = {"name": task, "alias": task, "sample_len": 500}
        for metric, (value, stderr) in values.items():
            entry[f"{metric},none"] = value
            entry[f"{metric}_stderr,none"] = stderr
        tasks[task] = entry
    group_entries = {}
    for group, subtasks in (groups or {}).items():
        accs = [metrics[t]["acc"][0] for t in subtasks]
        group_entries[group] = {"alias": group, "name": group, "sample_len": 1000, "acc,none": sum(accs) / len(accs),
                                "acc_stderr,none": 0.005, "sample_count": {"acc,none": 1000}}
    all_tasks = list(group_entries) + list(tasks)
    results = {
        "results": {**group_entries, **tasks},
        "group_subtasks": {group: list(subtasks) for group, subtasks in (groups or {}).items()},
        "configs": {task: {"task": task, "output_type": "loglikelihood"} for task in tasks},
        "versions": {task: "N/A" if task in group_entries else 1.0 for task in all_tasks},
        "n-shot": {task: 0 for task in all_tasks},
        "higher_is_better": {task: dict(HIGHER_IS_BETTER) for task in all_tasks},
        "n-samples": {task: {"original": 500, "effective": 500} for task in tasks},
        "config": {
            "model": "mamba_floatsim",
            "model_args": {"pretrained": MODEL, "mode": mode, **({"divisor": divisor} if divisor else {})},
            "batch_size": 1, "batch_sizes": [], "device": "cpu", "use_cache": None, "limit": None,
            "bootstrap_iters": 100000, "gen_kwargs": {}, "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234,
            "fewshot_seed": 1234,
            "floatsim": {"mode": mode, "divisor": float(divisor) if divisor else 2025.0, "rounding": "half_away",
                         "clamp": "range", "model": scales["model"], "scales_file": "/gone/scales.json",
                         "scales_sha256": scales["sha256"], "dump_file": dump_file,
                         "layers": [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]]},
        },
        "git_hash": None, "date": date, "task_hashes": {}, "model_source": "mamba_floatsim",
        "model_name": scales["model"], "model_name_sanitized": MODEL_FOLDER, "system_instruction": None,
        "system_instruction_sha": None, "fewshot_as_multiturn": False, "chat_template": None, "chat_template_sha": None,
        "total_evaluation_time_seconds": "12.5",
    }
    if groups:
        results["groups"] = group_entries
    return results


def write_run(root: Path, label: str, metrics: dict | None = None, scales: dict | None = None, date: float = 1.8e9,
              groups: dict | None = None, sqnr_offset: float = 0.0, model_folder: str = MODEL_FOLDER) -> Path:
    """Write one run as `lm_eval --output_path root` plus the floatsim model would; return the results file."""
    mode, _, divisor_text = label.partition("/")
    divisor = float(divisor_text) if divisor_text else None
    scales = scales or make_scales()
    folder = Path(root) / model_folder
    date_id = f"2027-01-15T10-{int(date) % 60:02d}-{int(date * 1000) % 60:02d}.{int(date * 1e6) % 1000000:06d}"
    run_folder = folder / f"floatsim_{date_id}"
    run_folder.mkdir(parents=True, exist_ok=True)
    dump = make_dump(mode, divisor, scales, sqnr_offset=sqnr_offset)
    (run_folder / dump_name(mode, divisor)).write_text(json.dumps(dump, indent=1))
    (run_folder / "scales.json").write_text(json.dumps(scales))
    metrics = metrics or METRICS[label if label in METRICS else "better/2025"]  # other divisors: the same metrics
    results = make_results(mode, divisor, metrics, scales, dump,
                           f"/gone/yzCheckFloatSim/{dump_name(mode, divisor)}", date, groups)
    path = folder / f"results_{date_id}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def write_standard_runs(root: Path, labels=("fp", "int8", "same", "better/2025"), **kwargs) -> list[Path]:
    return [write_run(root, label, date=1.8e9 + 7 * i, **kwargs) for i, label in enumerate(labels)]


def compare_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(["compare", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- tables --------------------------------------------------------------------------------------


def test_tables_hold_each_mode_value_stderr_and_change(tmp_path, capsys):
    write_standard_runs(tmp_path / "runs")
    code, out, err = compare_cli(capsys, tmp_path / "runs", "--out", tmp_path / "cmp")
    assert code == 0, out + err
    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (group,) = comparison["groups"]
    assert [run["label"] for run in group["runs"]] == ["fp", "int8", "same", "better/2025"]
    assert group["baseline"] == "int8"
    tables = {(t["task"], t["metric"]): t for t in group["metrics"]}
    assert set(tables) == {(task, metric) for task in TASKS for metric in HIGHER_IS_BETTER}
    for (task, metric), table in tables.items():
        base_value = METRICS["int8"][task][metric][0]
        for label, values in METRICS.items():
            value, stderr = values[task][metric]
            got = table["values"][label]
            assert got["value"] == pytest.approx(value, abs=1e-12)
            assert got["stderr"] == pytest.approx(stderr, abs=1e-12)
            assert got["change"] == pytest.approx(value - base_value, abs=1e-12)
            # Markdown: "| same | 0.5900 | 0.0069 | -0.0100 |"; the baseline row says so.
            change = "baseline" if label == "int8" else f"{value - base_value:+.4f}"
            assert f"| {label} | {value:.4f} | {stderr:.4f} | {change} |" in out
        assert f"### {task} — {metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)" in out

    layers = {row["layer_idx"]: row["values"] for row in group["layers"]}
    assert sorted(layers) == list(range(N_LAYER))
    scales = make_scales()
    for label in ("int8", "same", "better/2025"):
        mode, _, divisor = label.partition("/")
        for idx in range(N_LAYER):
            expected = layer_stats(mode, float(divisor) if divisor else None, idx, scales["layers"][idx]["output_scale"])
            assert layers[idx][label]["sqnr_db"] == pytest.approx(expected["sqnr_db"], abs=1e-12)
            assert layers[idx][label]["max_abs_err"] == pytest.approx(expected["max_abs_err"], rel=1e-12)
    assert "| layer | int8 SQNR | int8 max err | same SQNR | same max err | better/2025 SQNR | better/2025 max err |" in out
    assert (tmp_path / "cmp" / "compare.md").read_text() == out


def test_checks_run_across_the_runs_and_a_failed_check_exits_1(tmp_path, capsys):
    paths = write_standard_runs(tmp_path / "runs", labels=("int8", "same", "better/2025"))
    code, out, _ = compare_cli(capsys, tmp_path / "runs")
    assert code == 0
    assert "## Checks: int8, same, better/2025" in out
    assert "✓ floatsim_samescale.json vs int8_baseline.json: codes" in out

    same_dump = next(paths[1].parent.glob("floatsim_*/floatsim_samescale.json"))
    dump = json.loads(same_dump.read_text())
    dump["layers"][2]["effective_scale"] *= 2
    same_dump.write_text(json.dumps(dump))
    code, out, _ = compare_cli(capsys, tmp_path / "runs")
    assert code == 1
    assert "✗ floatsim_samescale.json: effective scale — layer 2" in out
    assert "**FAIL**" in out


def test_baseline_fp_and_a_run_label(tmp_path, capsys):
    write_standard_runs(tmp_path / "runs")
    code, out, _ = compare_cli(capsys, tmp_path / "runs", "--baseline", "fp")
    assert code == 0
    value, base = METRICS["better/2025"]["lambada_openai"]["acc"][0], METRICS["fp"]["lambada_openai"]["acc"][0]
    assert f"| better/2025 | {value:.4f} | 0.0068 | {value - base:+.4f} |" in out
    code, out, _ = compare_cli(capsys, tmp_path / "runs", "--baseline", "better/2025")
    assert code == 0 and "| better/2025 | 0.6150 | 0.0068 | baseline |" in out


# --- the gate ------------------------------------------------------------------------------------


def _gate_runs(root: Path, acc_change: float, perplexity_change: float) -> None:
    """int8 and better/2025 on one task, better differing from int8 by the given amounts."""
    base = {"lambada_openai": {"acc": (0.60, 0.007), "perplexity": (5.40, 0.13)}}
    moved = {"lambada_openai": {"acc": (0.60 + acc_change, 0.007), "perplexity": (5.40 + perplexity_change, 0.13)}}
    write_run(root, "int8", base, date=1.8e9)
    write_run(root, "better/2025", moved, date=1.8e9 + 5)


@pytest.mark.parametrize(
    "acc_change, perplexity_change, max_drop, failing",
    [
        (-0.03, -1.0, 0.02, "acc"),          # higher is better: 0.03 lower is a drop of 0.03
        (-0.03, -1.0, 0.04, None),
        (+0.01, +0.5, 0.4, "perplexity"),    # lower is better: 0.5 higher is a drop of 0.5
        (+0.01, +0.5, 0.6, None),
        (+0.05, -2.0, 0.01, None),           # large changes in the good direction never trip
    ],
)
def test_max_drop_respects_each_metrics_direction(tmp_path, capsys, acc_change, perplexity_change, max_drop, failing):
    _gate_runs(tmp_path / "runs", acc_change, perplexity_change)
    code, out, _ = compare_cli(capsys, tmp_path / "runs", "--max-drop", max_drop, "--out", tmp_path / "cmp")
    failures = json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"][0]["failures"]
    if failing is None:
        assert code == 0 and failures == [] and "**PASS**" in out
    else:
        assert code == 1 and [f["metric"] for f in failures] == [failing]
        expected_drop = -acc_change if failing == "acc" else perplexity_change
        assert failures[0]["drop"] == pytest.approx(expected_drop, abs=1e-9)
        assert f"✗ lambada_openai {failing}: better/2025" in out


def test_max_drop_without_the_baseline_run_is_unusable_input(tmp_path, capsys):
    write_run(tmp_path / "runs", "same")
    code, _, err = compare_cli(capsys, tmp_path / "runs", "--max-drop", "0.01")
    assert code == 2 and "no `int8` run among these (runs: same)" in err and len(err.strip().splitlines()) == 1
    code, out, _ = compare_cli(capsys, tmp_path / "runs")
    assert code == 0 and "Changes are not shown: no `int8` run among these" in out


def test_an_ambiguous_baseline_asks_for_a_label(tmp_path, capsys):
    write_standard_runs(tmp_path / "runs", labels=("better/16", "better/2025"))
    code, _, err = compare_cli(capsys, tmp_path / "runs", "--baseline", "better", "--max-drop", "0.01")
    assert code == 2 and "`better` matches several runs (better/16, better/2025)" in err
    code, out, _ = compare_cli(capsys, tmp_path / "runs", "--baseline", "better/16", "--max-drop", "0.01")
    assert code == 0 and "| better/16 | 0.6150 | 0.0068 | baseline |" in out


# --- unusable input ------------------------------------------------------------------------------


def test_empty_folder_exits_2_with_one_line(tmp_path, capsys):
    code, out, err = compare_cli(capsys, tmp_path)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "no runs found" in err


def test_corrupt_results_or_dump_exits_2(tmp_path, capsys):
    paths = write_standard_runs(tmp_path / "runs", labels=("int8", "same"))
    dump = next(paths[1].parent.glob("floatsim_*/floatsim_samescale.json"))
    dump.write_text(dump.read_text()[:200])
    code, _, err = compare_cli(capsys, tmp_path / "runs")
    assert code == 2 and "floatsim_samescale.json" in err and err.count("\n") == 1
    paths[0].write_text("{ not json")
    code, _, err = compare_cli(capsys, tmp_path / "runs")
    assert code == 2 and paths[0].name in err and err.count("\n") == 1


def test_missing_dump_exits_2_naming_where_it_looked(tmp_path, capsys):
    (path,) = write_standard_runs(tmp_path / "runs", labels=("int8",))
    next(path.parent.glob("floatsim_*/int8_baseline.json")).unlink()
    code, _, err = compare_cli(capsys, tmp_path / "runs")
    assert code == 2 and "dump" in err and "int8_baseline.json" in err and err.count("\n") == 1


def test_command_line_never_shows_a_traceback(tmp_path):
    (tmp_path / "results_x.json").write_text("[1, 2")
    done = subprocess.run([sys.executable, "-m", "lm_eval_floatsim.cli", "compare", str(tmp_path)],
                          capture_output=True, text=True, cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1


def test_bad_options_are_argument_errors(tmp_path, capsys):
    write_run(tmp_path / "runs", "int8")
    for baseline in ("int4", ""):
        code, _, err = compare_cli(capsys, tmp_path / "runs", "--baseline", baseline)
        assert code == 2 and f"--baseline={baseline!r} is not allowed" in err
    code, _, err = compare_cli(capsys, tmp_path / "runs", "--max-drop", "-1")
    assert code == 2 and "--max-drop=-1.0 is not allowed" in err


# --- which runs ----------------------------------------------------------------------------------


def test_runs_with_different_scales_are_not_mixed(tmp_path, capsys):
    other = make_scales(seed=7)
    write_standard_runs(tmp_path / "a", labels=("int8", "same"))
    write_run(tmp_path / "b", "int8", METRICS["fp"], scales=other, date=1.9e9)
    write_run(tmp_path / "b", "better/2025", scales=other, date=1.9e9 + 3)
    code, out, _ = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp")
    assert code == 0
    groups = json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"]
    by_scales = {group["scales_sha256"]: group for group in groups}
    assert set(by_scales) == {make_scales()["sha256"], other["sha256"]}
    assert [r["label"] for r in by_scales[make_scales()["sha256"]]["runs"]] == ["int8", "same"]
    assert [r["label"] for r in by_scales[other["sha256"]]["runs"]] == ["int8", "better/2025"]
    # Each group's changes are against its own int8: the other calibration's int8 never leaks in.
    acc = next(t for t in by_scales[other["sha256"]]["metrics"] if (t["task"], t["metric"]) == ("lambada_openai", "acc"))
    expected = METRICS["better/2025"]["lambada_openai"]["acc"][0] - METRICS["fp"]["lambada_openai"]["acc"][0]
    assert acc["values"]["better/2025"]["change"] == pytest.approx(expected, abs=1e-12)
    assert "not comparable" in out
    assert (tmp_path / "cmp" / "accuracy_1.png").is_file() and (tmp_path / "cmp" / "accuracy_2.png").is_file()


def test_an_fp_run_uses_no_scales_and_joins_every_group_of_its_model(tmp_path, capsys):
    other = make_scales(seed=7)
    write_standard_runs(tmp_path / "a", labels=("int8", "same"))
    write_run(tmp_path / "b", "int8", METRICS["same"], scales=other, date=1.9e9)
    fp = write_run(tmp_path / "c", "fp", date=1.7e9)
    results = json.loads(fp.read_text())  # a plain `mode=fp` run is not calibrated: no scales at all
    results["config"]["floatsim"].update(scales_sha256=None, scales_file=None)
    fp.write_text(json.dumps(results))
    fp_dump = next(fp.parent.glob("floatsim_*/fp_reference.json"))
    dump = json.loads(fp_dump.read_text())
    dump["config"]["scales_sha256"] = None
    for layer in dump["layers"]:
        layer.update(output_scale=None, input_scale=None, weight_scale=None, bias_scale=None)
    fp_dump.write_text(json.dumps(dump))
    code, out, _ = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp")
    assert code == 0, out
    groups = json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"]
    assert sorted([r["label"] for r in g["runs"]] for g in groups) == [["fp", "int8"], ["fp", "int8", "same"]]
    for group in groups:
        int8_acc = METRICS["same" if len(group["runs"]) == 2 else "int8"]["lambada_openai"]["acc"][0]
        acc = next(t for t in group["metrics"] if (t["task"], t["metric"]) == ("lambada_openai", "acc"))
        assert acc["values"]["fp"]["change"] == pytest.approx(METRICS["fp"]["lambada_openai"]["acc"][0] - int8_acc)


def test_an_fp_run_of_a_sweep_is_compared_with_other_scales_but_not_checked_with_them(tmp_path, capsys):
    write_standard_runs(tmp_path / "a", labels=("fp", "int8"))
    write_run(tmp_path / "b", "same", scales=make_scales(seed=7), date=1.9e9)
    code, out, _ = compare_cli(capsys, tmp_path, "--out", tmp_path / "cmp")
    assert code == 0, out
    groups = json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"]
    assert sorted([r["label"] for r in g["runs"]] for g in groups) == [["fp", "int8"], ["fp", "same"]]
    assert "## Checks: fp, int8" in out and "## Checks: same\n" in out


def test_the_latest_run_of_a_mode_wins(tmp_path, capsys):
    old = {"lambada_openai": {"acc": (0.40, 0.01), "perplexity": (9.0, 0.2)}}
    new = {"lambada_openai": {"acc": (0.61, 0.01), "perplexity": (5.0, 0.2)}}
    old_path = write_run(tmp_path / "runs", "int8", old, date=1.8e9)
    write_run(tmp_path / "runs", "int8", new, date=1.8e9 + 30)
    code, out, _ = compare_cli(capsys, tmp_path / "runs")
    assert code == 0
    assert "| int8 | 0.6100 | 0.0100 | baseline |" in out and "0.4000" not in out
    assert str(old_path) in out  # named as superseded


def test_group_subtasks_are_shown_under_their_group(tmp_path, capsys):
    metrics = {"demo_a": {"acc": (0.5, 0.02)}, "demo_b": {"acc": (0.7, 0.02)}}
    for i, label in enumerate(("int8", "same")):
        write_run(tmp_path / "runs", label, metrics, date=1.8e9 + i, groups={"demo_group": ["demo_a", "demo_b"]})
    code, out, _ = compare_cli(capsys, tmp_path / "runs")
    assert code == 0
    assert "### demo_group / demo_a — acc (higher is better)" in out
    assert "### demo_group / demo_b — acc (higher is better)" in out
    assert "### demo_group (group) — acc (higher is better)" in out
    assert "| same | 0.6000 | 0.0050 | +0.0000 |" in out  # the group's own aggregate, (0.5 + 0.7) / 2


# --- plugins -------------------------------------------------------------------------------------


class FailingPlugin:
    from lm_eval_floatsim import hookimpl

    @hookimpl
    def floatsim_compare_sections(self, runs):
        return [{"title": "Test plugin", "markdown": f"saw {len(runs)} runs",
                 "checks": [{"name": "always fails", "ok": False, "detail": "on purpose"}]}]


def test_plugin_sections_are_appended_and_their_failed_checks_exit_1(tmp_path, capsys):
    write_standard_runs(tmp_path / "runs", labels=("int8", "same"))
    manager = plugin_manager()
    manager.register(FailingPlugin(), name="test-failing")
    try:
        code, out, _ = compare_cli(capsys, tmp_path / "runs")
    finally:
        manager.unregister(name="test-failing")
    assert code == 1
    assert out.index("## Checks: int8, same") < out.index("## Test plugin")
    assert "saw 2 runs" in out and "✗ always fails — on purpose" in out


# --- files ---------------------------------------------------------------------------------------


def test_out_writes_markdown_json_and_readable_plots(tmp_path, capsys):
    import matplotlib.image

    write_standard_runs(tmp_path / "runs")
    code, out, err = compare_cli(capsys, tmp_path / "runs", "--out", tmp_path / "cmp")
    assert code == 0
    assert (tmp_path / "cmp" / "compare.md").read_text() == out
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["format"] == "lm_eval_floatsim.compare/1"
    for name in ("accuracy.png", "sqnr_by_layer.png"):
        image = matplotlib.image.imread(tmp_path / "cmp" / name)
        assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 500
        assert image[..., :3].std() > 0.05  # not a blank canvas
