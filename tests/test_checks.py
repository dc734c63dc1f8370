"""`lm-eval-floatsim check`: good dumps pass; each kind of tampering fails, naming the check and the
layer; unusable input exits 2 with one line."""

import json
import shutil

import pytest
import torch

from helpers_dumps import write_good_dumps, write_segmented_dumps
from lm_eval_floatsim.checks import run_checks
from lm_eval_floatsim.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SAME, INT8, BETTER, FP = "floatsim_samescale.json", "int8_baseline.json", "floatsim_betterscale_2025.json", "fp_reference.json"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("pristine")
    write_good_dumps(folder)
    return folder


@pytest.fixture
def dumps(tmp_path, pristine):
    """A fresh copy of the good dumps, to tamper with."""
    folder = tmp_path / "yzCheckFloatSim"
    shutil.copytree(pristine, folder)
    return folder


def edit(folder, name, change):
    path = folder / name
    dump = json.loads(path.read_text())
    change(dump)
    path.write_text(json.dumps(dump, indent=2))


def check(folder, capsys, *options):
    code = main(["check", str(folder), *options])
    return code, capsys.readouterr()


def failed_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("✗")]


def test_good_dumps_pass(dumps, capsys):
    code, out = check(dumps, capsys)
    assert code == 0, out.out
    lines = out.out.splitlines()
    assert lines[-1].startswith("All ") and lines[-1].endswith("checks passed.")
    assert not failed_lines(out.out)
    for expected in ("every layer, in order: layer_idx 0..23", "equal in 240/240 dumped codes",
                     "= output_scale / 2025 in every layer", "smaller quantization error (dumped values)",
                     "smaller quantization error (stats of the run)", "one output scale per layer"):
        assert expected in out.out
    assert any(line.startswith("ℹ") and "< 1e-5" in line for line in lines)


def test_json_output(dumps, capsys):
    code, out = check(dumps, capsys, "--json")
    report = json.loads(out.out)
    assert code == 0 and report["ok"] is True
    assert report["files"] == [INT8, SAME, BETTER, FP]
    assert all(entry["ok"] for entry in report["checks"])
    assert {"name", "ok", "detail", "layer", "informational"} <= set(report["checks"][0])


def remove_layer(dump, layer_idx=5):
    del dump["layers"][layer_idx]


def null_value(dump):
    dump["layers"][7]["before_quant"][3] = None


def double_effective_scale(dump):
    dump["layers"][4]["effective_scale"] *= 2


def divide_by_2024(dump):
    layer = dump["layers"][9]
    layer["effective_scale"] = layer["output_scale"] / 2024


def swap_layers(dump):
    layers = dump["layers"]
    layers[3], layers[4] = layers[4], layers[3]


def move_off_grid(dump):
    layer = dump["layers"][11]
    layer["after_quant"][2] += 0.3 * layer["effective_scale"]


def half_code(dump):
    layer = dump["layers"][2]
    layer["codes"][1] += 0.5


@pytest.mark.parametrize(
    "name, tamper, check_name, layer",
    [
        (SAME, remove_layer, f"{SAME}: every layer, in order", 5),
        (SAME, null_value, f"{SAME}: no nulls", 7),
        (SAME, double_effective_scale, f"{SAME}: effective scale", 4),
        (SAME, double_effective_scale, f"{SAME} vs {INT8}: effective scale", 4),
        (BETTER, divide_by_2024, f"{BETTER}: effective scale", 9),
        (INT8, swap_layers, f"{INT8}: every layer, in order", 3),
        (BETTER, move_off_grid, f"{BETTER}: values on the grid", 11),
        (INT8, half_code, f"{INT8}: values on the grid", 2),
        (FP, null_value, f"{FP}: no nulls", 7),
    ],
)
def test_each_tampering_fails_naming_the_check_and_the_layer(dumps, capsys, name, tamper, check_name, layer):
    edit(dumps, name, tamper)
    code, out = check(dumps, capsys)
    assert code == 1
    failures = failed_lines(out.out)
    matching = [line for line in failures if line.startswith(f"✗ {check_name}:")]
    assert matching, failures
    assert f"layer {layer}" in matching[0]
    result = next(r for r in run_checks(dumps) if r.name == check_name)
    assert result.ok is False and result.layer == layer


def test_a_wrong_divisor_in_the_file_name_fails(dumps, capsys):
    (dumps / BETTER).rename(dumps / "floatsim_betterscale_2024.json")
    code, out = check(dumps, capsys)
    assert code == 1
    assert any("floatsim_betterscale_2024.json: effective scale" in line for line in failed_lines(out.out))
    assert any("floatsim_betterscale_2024.json: config flags" in line for line in failed_lines(out.out))


def test_a_different_output_scale_fails(dumps, capsys):
    def rescale(dump):
        dump["layers"][6]["output_scale"] *= 1.01

    edit(dumps, FP, rescale)
    code, out = check(dumps, capsys)
    assert code == 1
    assert any(line.startswith("✗ all files: one output scale per layer:") and "layer 6" in line for line in failed_lines(out.out))


def test_a_better_scale_with_more_error_than_same_fails(dumps):
    same = json.loads((dumps / SAME).read_text())

    def coarsen(dump):
        layer, other = dump["layers"][8], same["layers"][8]
        layer["before_quant"] = other["before_quant"]
        layer["after_quant"] = [value + 0.6 * other["output_scale"] for value in other["after_quant"]]

    edit(dumps, BETTER, coarsen)
    result = next(r for r in run_checks(dumps) if r.name == f"{BETTER} vs {SAME}: smaller quantization error (dumped values)")
    assert result.ok is False and result.layer == 8


@pytest.fixture(scope="module")
def many_codes(tmp_path_factory, one_thread):
    """Dumps with 24 x 500 codes: the SPEC's 99.99% then allows one mismatch."""
    folder = tmp_path_factory.mktemp("many")
    write_good_dumps(folder, modes=("int8", "same"), dump_n=500)
    return folder


def shift_codes(folder, changes):
    """Move same's code at (layer, position) by `step`, keeping after_quant on the grid."""
    def change(dump):
        for layer_idx, position, step in changes:
            layer = dump["layers"][layer_idx]
            layer["codes"][position] += step
            layer["after_quant"][position] = float(torch.tensor(layer["codes"][position], dtype=torch.float32)
                                                   * torch.tensor(layer["effective_scale"], dtype=torch.float32))
    edit(folder, SAME, change)


def codes_result(folder):
    return next(r for r in run_checks(folder) if "codes (SPEC" in r.name)


def test_the_code_rule_is_applied_to_the_pooled_codes(tmp_path, many_codes):
    shutil.copytree(many_codes, tmp_path / "one")
    shift_codes(tmp_path / "one", [(2, 17, 1)])
    one = codes_result(tmp_path / "one")
    assert one.ok and "equal in 11999/12000" in one.detail and "1 mismatches allowed" in one.detail

    shutil.copytree(many_codes, tmp_path / "two")
    shift_codes(tmp_path / "two", [(2, 17, 1), (5, 3, -1)])
    two = codes_result(tmp_path / "two")
    assert not two.ok and two.layer == 2

    shutil.copytree(many_codes, tmp_path / "far")
    shift_codes(tmp_path / "far", [(6, 40, 2)])
    far = codes_result(tmp_path / "far")
    assert not far.ok and far.layer == 6 and "more than 1" in far.detail


def test_one_mismatch_in_the_default_dumps_fails(dumps):
    shift_codes(dumps, [(1, 0, 1)])
    result = codes_result(dumps)
    assert not result.ok and result.layer == 1 and "0 mismatches allowed" in result.detail


def test_files_in_the_users_original_format_are_checked(dumps, capsys):
    """Only the document's keys: codes are derived from after_quant, the rest is checked alike."""
    documented = ("layer_idx", "effective_scale", "output_scale", "before_quant", "after_quant")
    for name in (INT8, SAME, BETTER):
        def strip(dump):
            dump["config"] = {key: dump["config"][key] for key in ("float_sim_asic", "float_sim_better_scale")}
            dump["layers"] = [{key: layer[key] for key in documented} for layer in dump["layers"]]
        edit(dumps, name, strip)
    (dumps / FP).unlink()
    code, out = check(dumps, capsys)
    assert code == 0, out.out
    assert "codes derived from after_quant" in out.out


def test_informational_results_never_fail(dumps):
    # compare (builtin_plugin) turns each result into {"ok": bool(result.ok)}: informational ones must not fail it
    shift_codes(dumps, [(1, 0, 1)])  # after_quant now differs from the baseline's by a whole step
    informational = [result for result in run_checks(dumps) if result.informational]
    assert len(informational) == 1 and informational[0].ok is True
    assert "not below 1e-5" in informational[0].detail and informational[0].layer == 1


@pytest.mark.parametrize("json_output", [False, True])
def test_unusable_input_exits_2_in_one_line(tmp_path, dumps, capsys, json_output):
    options = ["--json"] if json_output else []
    code, out = check(tmp_path / "nowhere", capsys, *options)
    assert code == 2
    message = json.loads(out.out)["error"] if json_output else out.err
    assert "no such folder" in message and message.strip().count("\n") == 0

    (dumps / SAME).write_text('{"config": {"float_sim_asic": tr')
    code, out = check(dumps, capsys, *options)
    assert code == 2
    message = json.loads(out.out)["error"] if json_output else out.err
    assert SAME in message and "invalid JSON" in message and "Traceback" not in out.err

    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "scales.json").write_text("{}")
    code, out = check(empty, capsys, *options)
    assert code == 2


def test_files_whose_weights_were_rounded_differently_fail(dumps, capsys):
    edit(dumps, SAME, lambda dump: dump["config"].update(operand_rounding="half_even"))
    code, out = check(dumps, capsys)
    assert code == 1
    assert failed_lines(out.out) == [
        "✗ all files: same operands (operand_rounding): W and the bias were rounded differently: "
        f"{INT8} half_away, {SAME} half_even, {BETTER} half_away"
    ]


def test_a_fast_math_baseline_is_named_in_the_reproduction_checks(dumps, capsys):
    edit(dumps, INT8, lambda dump: dump["config"].update(kernel_math="fast"))
    code, out = check(dumps, capsys)
    assert code == 0, out.out
    assert f"{SAME} vs {INT8} (kernel_math=fast): codes" in out.out


def test_a_dump_of_a_run_that_computed_nothing_says_why(dumps, capsys):
    """A run whose every request came from lm_eval's --use_cache ran no forward: its dump has no
    values and zero counts, and check says so instead of listing nulls."""
    def nothing_computed(dump):
        for layer in dump["layers"]:
            nulls = [None] * len(layer["before_quant"])  # as such a run writes them
            layer.update(before_quant=nulls, after_quant=nulls, codes=nulls, stats={**layer["stats"], "count": 0})

    edit(dumps, INT8, nothing_computed)
    code, out = check(dumps, capsys)
    assert code == 1
    line = next(line for line in failed_lines(out.out) if line.startswith(f"✗ {INT8}: no nulls"))
    assert "the run computed no forward" in line and "--use_cache" in line


def test_dumps_of_a_conv_quantized_in_segments_are_checked_segment_by_segment(tmp_path, capsys):
    paths = write_segmented_dumps(tmp_path)
    int8 = json.loads(paths["int8"].read_text())
    layer = int8["layers"][0]
    assert [(segment["name"], segment["channels"]) for segment in layer["segments"]] == [("x", 32), ("B", 8), ("C", 8)]
    # The dumped values are x's (40 values of 16 positions: its first 3 channels), on x's grid.
    assert layer["output_scale"] == layer["segments"][0]["output_scale"] != layer["segments"][1]["output_scale"]
    code, out = check(tmp_path, capsys)
    assert code == 0, out.out

    def wrong_b(dump):
        dump["layers"][1]["segments"][1]["effective_scale"] *= 2

    edit(tmp_path, "floatsim_betterscale_2025.json", wrong_b)
    edit(tmp_path, "floatsim_samescale.json", lambda dump: dump["layers"][2]["segments"][2].__setitem__("output_scale", 1.0))
    code, out = check(tmp_path, capsys)
    failures = failed_lines(out.out)
    assert code == 1
    assert any(line.startswith("✗ floatsim_betterscale_2025.json: effective scale:") and "layer 1: segment B: " in line
               for line in failures), failures
    assert any(line.startswith("✗ all files: one output scale per layer:") and "layer 2" in line and "segment C: 1.0" in line
               for line in failures), failures
