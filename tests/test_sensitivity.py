"""`lm-eval-floatsim sensitivity`: the mode in each block alone, in one process, against separate runs.

The reference for each entry is a separate evaluation of the same model with `layers=<i>`, built
as `lm_eval` builds it; the ranking and the deltas are recomputed here from the JSON's own numbers.
"""

from __future__ import annotations

import json

import matplotlib.image
import pytest

from helpers_lm_eval import counting, differences, lm_eval_command, saved_runs
from lm_eval_floatsim import cli, sensitivity, sweep


def sensitivity_cli(tmp_path, model_args, task_dir, *options) -> int:
    return cli.main(["sensitivity", "--mode", "better", "--divisor", "16", "--out", str(tmp_path / "sens"), *options,
                     "--", "--model_args", model_args, "--tasks", "sweep_lambada_ppl", "--include_path", str(task_dir),
                     "--output_path", str(tmp_path / "results")])


def test_each_block_alone_equals_a_separate_run_of_it(tmp_path, ppl_task, tiny_model, monkeypatch):
    builds = []
    monkeypatch.setattr(sweep, "build_lm", counting(sweep.build_lm, builds))
    assert sensitivity_cli(tmp_path, tiny_model, ppl_task, "--leave-one-out") == 0
    assert len(builds) == 1  # one model, loaded and calibrated once, for 2 + 3 + 3 evaluations
    report = json.loads((tmp_path / "sens" / "sensitivity.json").read_text())
    assert (report["mode"], report["divisor"]) == ("better", 16.0)
    assert [entry["layer_idx"] for entry in report["layers"]] == [0, 1, 2]
    assert [entry["layers"] for entry in report["leave_one_out"]] == ["1-2", "0+2", "0-1"]
    key = "perplexity,none"
    fp = report["baseline"]["fp"]["sweep_lambada_ppl"][key]
    for entry in report["layers"]:
        assert entry["delta"]["sweep_lambada_ppl"][key] == entry["metrics"]["sweep_lambada_ppl"][key] - fp
        assert entry["sqnr_db"] is not None and entry["sqnr_db"] > 0
    # Quantizing blocks changes the perplexity (the runs are not fp in disguise).
    assert all(entry["metrics"]["sweep_lambada_ppl"][key] != fp for entry in report["layers"])

    # A block's run, and fp's, are exactly the runs `lm_eval` makes of them (results files but
    # for the clock: metrics, bootstrapped standard errors, configurations, dump statistics).
    for args in ("mode=better,divisor=16,layers=1", "mode=fp"):
        lm_eval_command("--model", "mamba_floatsim", "--model_args", f"{tiny_model},{args}", "--tasks", "sweep_lambada_ppl",
                        "--include_path", ppl_task, "--output_path", tmp_path / "separate")
    within = saved_runs(tmp_path / "results")
    separate = saved_runs(tmp_path / "separate")
    assert len(separate) == 2
    for model_args, run in separate.items():
        found = differences(within[model_args], run)
        assert not found, "\n".join([model_args, *found])
    layer_1 = next(results for results, _ in separate.values() if results["config"]["model_args"].get("layers") == 1)
    assert report["layers"][1]["metrics"]["sweep_lambada_ppl"][key] == layer_1["results"]["sweep_lambada_ppl"][key]

    markdown = (tmp_path / "sens" / "sensitivity.md").read_text()
    assert markdown.startswith("# Sensitivity of each block to better/16")
    image = matplotlib.image.imread(tmp_path / "sens" / "sensitivity.png")
    assert image.ndim == 3 and image[..., :3].std() > 0.05  # not a blank canvas
    # Every run is saved as lm_eval saves it: compare finds all eight.
    from lm_eval_floatsim.runs import find_runs, summarize

    labels = sorted(summarize(run)["label"] for run in find_runs([tmp_path / "results"]))
    assert labels == sorted(["fp", "better/16", "better/16 layers=0", "better/16 layers=1", "better/16 layers=2",
                             "better/16 layers=1-2", "better/16 layers=0+2", "better/16 layers=0-1"])


def test_blocks_are_ranked_by_the_size_of_their_change():
    def entry(layer_idx, value):
        return {"layer_idx": layer_idx, "layers": str(layer_idx), "metrics": {"t": {"acc,none": value}},
                "stderr": {"t": {"acc,none": 0.01}}, "delta": {"t": {"acc,none": value - 0.5}}, "sqnr_db": 30.0}

    report = {"mode": "int8", "divisor": None, "baseline": {"fp": {"t": {"acc,none": 0.5}}, "full": {"t": {"acc,none": 0.3}}},
              "layers": [entry(0, 0.49), entry(1, 0.2), entry(2, 0.55)], "leave_one_out": []}
    table = sensitivity.render_markdown(report).split("Blocks quantized alone, largest change first:")[1]
    rows = [line.split("|")[1].strip() for line in table.strip().splitlines()[2:]]
    assert rows == ["1", "2", "0"]  # |-0.30| > |+0.05| > |-0.01|


@pytest.mark.parametrize(
    "options, lm_eval_args, message",
    [
        (["--mode", "fp"], [], "--mode='fp' is not allowed: expected a quantized mode"),
        (["--mode", "int8", "--divisor", "16"], [], "--divisor='16' is not allowed: expected no value"),
        (["--mode", "int8"], ["--model_args", "pretrained=x,layers=1"], "--model_args layers=1 is not allowed"),
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded(tmp_path, options, lm_eval_args, message, capsys, monkeypatch):
    monkeypatch.setattr(sweep, "build_lm", lambda *args: pytest.fail("loaded a model"))
    code = cli.main(["sensitivity", *options, "--out", str(tmp_path / "out"), "--", "--tasks", "x",
                     "--output_path", str(tmp_path / "results"), *lm_eval_args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
