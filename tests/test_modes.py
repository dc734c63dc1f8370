"""Modes as objects in a registry: the built-in ones, and a third-party mode added by a plugin that
runs through the lm-eval model, the dumps, `check` and `compare` without a change to the package.

The plugin mode's reference is computed here independently, in float64 from the dumped values.
"""

from __future__ import annotations

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import numpy as np
import pytest
import torch

from fixtures import coarse_mode_plugin
from fixtures.floatsim_runs import evaluate, floatsim

from lm_eval_floatsim import checks, cli, dumps, hookimpl, modes
from lm_eval_floatsim.errors import ArgumentError, InputError
from lm_eval_floatsim.modes import FLOAT_SIM, Mode, QuantSpec, get_mode, parse_mode_list, registry
from lm_eval_floatsim.plugins import plugin_manager


def test_the_built_in_modes_are_registered_in_order():
    assert list(registry()) == ["fp", "int8", "same", "better"]
    assert modes.MODES == ("fp", "int8", "same", "better")
    better = get_mode("better")
    assert better.dump_filename(2025.0) == "floatsim_betterscale_2025.json" and better.dump_filename(2.5) == "floatsim_betterscale_2.5.json"
    assert better.code_range(2.5, "range") == (-320, 317)  # whole codes inside [-128, 127] * 2.5
    assert better.code_range(16, "none") is None and get_mode("same").code_range(16, "none") == (-128, 127)
    assert [get_mode(name).config_flags() for name in ("fp", "int8", "same", "better")] == [
        {"float_sim_asic": False, "float_sim_better_scale": False},
        {"float_sim_asic": False, "float_sim_better_scale": False},
        {"float_sim_asic": True, "float_sim_better_scale": False},
        {"float_sim_asic": True, "float_sim_better_scale": True},
    ]
    assert QuantSpec("better", 16, "half_even", "none").label == "better/16 half_even clamp=none"
    assert QuantSpec("int8", 16, "half_even", "none").label == "int8"  # settings int8 does not use


def test_layers_spelling_reads_back():
    for text in ("0-5+12+20-23", "7", "0-1+3-4"):
        assert modes.format_layers(modes.parse_layers(text)) == text
    assert modes.parse_layers("3+1-2+2") == (1, 2, 3)
    assert QuantSpec("better", 16, layers=(0, 1, 2, 5)).label == "better/16 layers=0-2+5"


def test_one_rule_for_every_list_of_modes():
    assert parse_mode_list(" fp, better ", "--modes") == ["fp", "better"]
    for bad in ("", "int8,int8", "int8,int4"):
        with pytest.raises(ArgumentError, match=r"expected a comma-separated list of modes from fp, int8, same, better, each once"):
            parse_mode_list(bad, "--modes")


@pytest.mark.parametrize(
    "make, problem",
    [
        (lambda: Mode("Better", FLOAT_SIM, "x.json"), "lower-case"),
        (lambda: Mode("x", "int4_kernel", "x.json"), "arithmetic"),
        (lambda: Mode("x", FLOAT_SIM, "x_{divisor}.json"), "exactly when the mode takes a divisor"),
        (lambda: Mode("x", FLOAT_SIM, "x.json", takes_clamp=True), "only a mode with a finer scale"),
    ],
)
def test_a_malformed_mode_is_refused_where_it_is_made(make, problem):
    with pytest.raises(ValueError, match=problem):
        make()


@pytest.fixture
def coarse_plugin():
    """The plugin registered for one test, as an installed entry point would register it."""
    manager = plugin_manager()
    manager.register(coarse_mode_plugin, name="coarse-mode-test")
    registry.cache_clear()
    yield coarse_mode_plugin.COARSE
    manager.unregister(name="coarse-mode-test")
    registry.cache_clear()


class ClashingPlugin:
    @hookimpl
    def floatsim_register_modes(self, register):
        register(Mode("clash", FLOAT_SIM, "floatsim_samescale.json"))


def test_a_plugin_mode_with_a_taken_dump_file_is_refused():
    plugin_manager().register(ClashingPlugin(), name="clash")
    registry.cache_clear()
    try:
        with pytest.raises(ValueError, match="dump file floatsim_samescale.json is already the file of mode 'same'"):
            registry()
    finally:
        plugin_manager().unregister(name="clash")
        registry.cache_clear()


def test_a_plugin_mode_runs_through_lm_eval_dumps_check_and_compare(coarse_plugin, model_files, task_manager, tmp_path, capsys):
    from lm_eval.loggers import EvaluationTracker
    hf_folder, _, scales, _ = model_files
    dump_dir, out = tmp_path / "dumps", tmp_path / "results"
    for mode in ("int8", "coarse"):
        lm = floatsim(hf_folder, dump_dir, mode=mode, scales=scales, batch_size=4)
        tracker = EvaluationTracker(output_path=str(out))
        results = evaluate(lm, task_manager, tasks=("floatsim_lambada",), evaluation_tracker=tracker)
        results.pop("samples")
        tracker.save_results_aggregated(results=results)

    dump = dumps.read_dump(dump_dir / "floatsim_coarsescale.json")
    assert dump["config"]["mode"] == "coarse" and dump["config"]["float_sim_asic"] is True
    assert dump["config"]["code_range"] == [-64.0, 63.0]
    for layer in dump["layers"]:
        # Independent reference: float64 rounding half away from zero on the coarse grid.
        step = 2 * np.float64(np.float32(layer["output_scale"]))
        assert layer["effective_scale"] == pytest.approx(step, rel=1e-7)  # one fp32 rounding of 2 * s_y
        before = np.array(layer["before_quant"], dtype=np.float64)
        quotient = before / step
        codes = np.clip(np.sign(quotient) * np.floor(np.abs(quotient) + 0.5), -64, 63)
        assert layer["codes"] == codes.tolist()
        # after = code * s_eff in fp32: exact on the grid up to the fp32 rounding of the product
        np.testing.assert_allclose(layer["after_quant"], codes * np.float32(layer["effective_scale"]), rtol=1e-7)

    results = checks.check_dumps(checks.load_dumps(dump_dir))
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]
    assert any(result.name == "floatsim_coarsescale.json: effective scale" for result in results)

    assert cli.main(["compare", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| coarse |" in printed and "| int8 |" in printed


def test_a_dump_of_a_mode_this_installation_does_not_know_is_one_line(tmp_path):
    good = tmp_path / "int8_baseline.json"
    good.write_text(json.dumps({"config": {"float_sim_asic": False, "float_sim_better_scale": False, "mode": "coarse"},
                                "layers": []}))
    with pytest.raises(InputError, match=r"config.mode: 'coarse' is not one of \['fp', 'int8', 'same', 'better'\]"):
        dumps.read_dump(good)


def responses(results) -> list:
    samples = sorted(results["samples"]["floatsim_lambada"], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples]


def test_layers_through_lm_eval_dumps_check_and_compare(model_files, task_manager, tmp_path, capsys):
    from lm_eval.loggers import EvaluationTracker
    hf_folder, _, scales, _ = model_files  # 2 blocks

    def run(name, **args):
        lm = floatsim(hf_folder, tmp_path / name, mode="int8", scales=scales, batch_size=4, **args)
        tracker = EvaluationTracker(output_path=str(tmp_path / "results"))
        results = evaluate(lm, task_manager, tasks=("floatsim_lambada",), evaluation_tracker=tracker)
        kept = dict(results, samples=results.pop("samples"))
        tracker.save_results_aggregated(results=results)
        return kept, json.loads((tmp_path / name / "int8_baseline.json").read_text()), lm.response_settings()

    full, full_dump, full_settings = run("full")
    every, every_dump, every_settings = run("every", layers="0-1")
    second, second_dump, second_settings = run("second", layers=1)

    # Every block listed: the full mode's responses, metrics and per-layer values exactly.
    assert responses(every) == responses(full) and every["results"] == full["results"]
    assert every_dump["layers"] == full_dump["layers"] and every_dump["config"]["layers"] == [0, 1]
    assert "layers" not in full_dump["config"]  # a run of every block keeps the format it had

    # Block 1 only: block 0 recorded as fp, block 1 as int8; the cache tells the runs apart.
    assert second_dump["config"]["layers"] == [1]
    block0, block1 = second_dump["layers"]
    assert block0["effective_scale"] is None and block0["codes"] is None and block0["after_quant"] == block0["before_quant"]
    assert block0["stats"]["max_abs_err"] == 0.0
    assert block1["effective_scale"] == block1["output_scale"] and block1["codes"] is not None
    assert responses(second) != responses(full)
    assert second_settings["layers"] == [1] and len({json.dumps(s) for s in (full_settings, every_settings, second_settings)}) == 3

    results = checks.check_dumps(checks.load_dumps(tmp_path / "second"))
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]
    assert cli.main(["compare", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    assert "| int8 layers=1 |" in printed and "| int8 layers=0-1 |" in printed


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_asic_dtype_through_lm_eval_dumps_and_check(model_files, task_manager, tmp_path, fmt):
    hf_folder, _, scales, _ = model_files
    lm = floatsim(hf_folder, tmp_path / "dumps", mode="better", divisor=16, asic_dtype=fmt, scales=scales, batch_size=4)
    results = evaluate(lm, task_manager, tasks=("floatsim_lambada",))
    assert results["config"]["floatsim"]["asic_dtype"] == fmt and lm.spec.label == f"better/16 asic={fmt}"
    dump = dumps.read_dump(tmp_path / "dumps" / "floatsim_betterscale_16.json")
    assert dump["config"]["asic_dtype"] == fmt
    for layer in dump["layers"]:
        # The scale the ASIC holds: s_y / 16 in fp32, rounded to fmt (a power-of-two divisor keeps it exact).
        held = torch.tensor(np.float32(layer["output_scale"] / 16)).to(getattr(torch, fmt)).item()
        assert layer["effective_scale"] == held
    results = checks.check_dumps(checks.load_dumps(tmp_path / "dumps"))
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]
    assert f"(to 1 {fmt} ulp)" in next(result.detail for result in results if result.name.endswith("effective scale"))


def test_kernel_math_and_operand_rounding_through_lm_eval_dumps_check_and_compare(model_files, task_manager, tmp_path, capsys):
    """int8 with the fast-math epilogue and W and the bias rounded half to even: recorded in the
    dump, the results and the label; `check` names the baseline's arithmetic; `compare` keeps runs
    with other operands apart."""
    from lm_eval.loggers import EvaluationTracker
    hf_folder, _, scales, _ = model_files

    def run(folder, mode, **args):
        lm = floatsim(hf_folder, tmp_path / folder, mode=mode, scales=scales, batch_size=4, **args)
        tracker = EvaluationTracker(output_path=str(tmp_path / "results"))
        results = evaluate(lm, task_manager, tasks=("floatsim_lambada",), evaluation_tracker=tracker)
        results.pop("samples")
        tracker.save_results_aggregated(results=results)
        return results["config"]["floatsim"], lm.spec.label

    chosen = {"kernel_math": "fast", "operand_rounding": "half_even"}
    int8, int8_label = run("dumps", "int8", **chosen)
    same, same_label = run("dumps", "same", **chosen)
    assert (int8_label, same_label) == ("int8 fast-math operands=half_even", "same operands=half_even")
    assert (int8["kernel_math"], int8["operand_rounding"]) == ("fast", "half_even")
    assert (same["kernel_math"], same["operand_rounding"]) == (None, "half_even")  # the simulation has no epilogue choice
    int8_config = dumps.read_dump(tmp_path / "dumps" / "int8_baseline.json")["config"]
    same_config = dumps.read_dump(tmp_path / "dumps" / "floatsim_samescale.json")["config"]
    assert (int8_config["kernel_math"], int8_config["operand_rounding"]) == ("fast", "half_even")
    assert "kernel_math" not in same_config and same_config["operand_rounding"] == "half_even"
    results = checks.check_dumps(checks.load_dumps(tmp_path / "dumps"))
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]
    assert any("(kernel_math=fast): codes" in result.name for result in results)

    # A run with the default operands is not comparable with them: compare prints two groups.
    run("other-dumps", "int8")
    assert cli.main(["compare", str(tmp_path / "results")]) == 0
    printed = capsys.readouterr().out
    groups = printed.split("\n## Model ")[1:]
    assert len(groups) == 2 and "different models, calibrations (scales) or operands" in printed
    runs = {group.splitlines()[0]: next(line for line in group.splitlines() if line.startswith("Runs: ")) for group in groups}
    rounded = [runs[heading] for heading in runs if heading.endswith("operands rounded half_even")]
    plain = [runs[heading] for heading in runs if not heading.endswith("operands rounded half_even")]
    assert rounded[0].startswith("Runs: int8 fast-math operands=half_even (") and "; same operands=half_even (" in rounded[0]
    assert plain[0].startswith("Runs: int8 (") and ";" not in plain[0]
