"""`lm-eval-floatsim compare`: tables, the --max-drop gate, unusable input, scales, groups, --out.

The runs are written by helpers_runs, the way lm-eval 0.4.13 and the floatsim model lay them out,
with dumps whose values the real checks pass on. Expected table values are computed from its numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_runs import HIGHER_IS_BETTER, METRICS, N_LAYER, TASKS, layer_stats, make_scales, write_run, write_standard_runs
from lm_eval_floatsim import cli
from lm_eval_floatsim.plugins import plugin_manager

ROOT = Path(__file__).resolve().parent.parent


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
