"""`lm-eval-floatsim sweep`: one model, loaded once, evaluated in every mode; results compare finds.

The logic runs against lm-eval's real parser, TaskManager, simple_evaluate and EvaluationTracker,
with a fake model in place of FloatSimLM (whose `switch_mode` and `get_model_info` it mimics): it
scores a tiny local task with accuracies fixed per mode, and writes its dump like the real model.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import lm_eval
import lm_eval.evaluator
import lm_eval.tasks
import pytest
from lm_eval.api.model import LM

from conftest import N_DOCS
from helpers_lm_eval import counting, differences, lm_eval_command, saved_runs
from helpers_runs import dump_name, make_dump, make_scales
from lm_eval_floatsim import cli, sweep
from lm_eval_floatsim.runs import find_runs, summarize

# The fake model gets the first ACCURACY * 10 of every 10 documents right.
ACCURACY = {"fp": 0.9, "int8": 0.6, "same": 0.6, "better": 0.8}


class FakeFloatSimLM(LM):
    """What sweep needs of FloatSimLM: switch_mode, and get_model_info writing the dump."""

    def __init__(self, model_args: dict, dump_dir: Path):
        super().__init__()
        self.model_args, self.dump_dir = model_args, dump_dir
        self.mode, self.divisor = model_args["mode"], model_args.get("divisor", 2025.0)
        self.switches = []
        self.scales = make_scales()
        self.scales_path = dump_dir / "scales.json"
        self.scales_path.write_text(json.dumps(self.scales))

    def switch_mode(self, mode, divisor=None, rounding=None, clamp=None, **layers):
        self.switches.append((mode, divisor))
        self.mode, self.divisor = mode, self.divisor if divisor is None else divisor

    def loglikelihood(self, requests):
        doc_ids = [request.doc_id for request in requests]
        correct = [doc_id % 10 < round(ACCURACY[self.mode] * 10) for doc_id in doc_ids]
        return [(-0.5 if right else -3.0, right) for right in correct]

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError

    def generate_until(self, requests):
        raise NotImplementedError

    def get_model_info(self):
        divisor = self.divisor if self.mode == "better" else None
        dump = make_dump(self.mode, divisor, self.scales)
        path = self.dump_dir / dump_name(self.mode, divisor)
        path.write_text(json.dumps(dump))
        return {"floatsim": {"mode": self.mode, "divisor": float(self.divisor), "rounding": "half_away", "clamp": "range",
                             "model": self.scales["model"], "scales_file": str(self.scales_path),
                             "scales_sha256": self.scales["sha256"], "dump_file": str(path),
                             "layers": [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]]}}


@pytest.fixture
def fakes(tmp_path, monkeypatch):
    """Replace FloatSimLM by the fake and spy on simple_evaluate (the real one still runs)."""
    built, calls = [], []
    dump_dir = tmp_path / "dumps"
    dump_dir.mkdir()

    def build_lm(model_args, config):
        built.append(FakeFloatSimLM(model_args, dump_dir))
        return built[-1]

    real = lm_eval.simple_evaluate

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(sweep, "build_lm", build_lm)
    monkeypatch.setattr(lm_eval, "simple_evaluate", simple_evaluate)
    # Speed only (each costs seconds and is lm-eval's own business): index just the test's task
    # folder, not lm-eval's thousands of bundled tasks, and skip collecting the environment report.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    return built, calls


def sweep_cli(*argv) -> int:
    return cli.main(["sweep", *map(str, argv)])


def test_sweep_loads_once_switches_in_order_and_saves_runs_compare_finds(tmp_path, task_dir, fakes, capsys):
    built, calls = fakes
    out = tmp_path / "results"
    code = sweep_cli("--modes", "fp,int8,same,better", "--divisors", "16,2025", "--out", tmp_path / "cmp", "--",
                     "--model_args", "pretrained=tiny/mamba-demo,dtype=float32", "--tasks", "sweep_lambada",
                     "--include_path", task_dir, "--output_path", out)
    printed = capsys.readouterr().out
    assert code == 0, printed

    assert len(built) == 1
    lm = built[0]
    assert lm.model_args == {"pretrained": "tiny/mamba-demo", "dtype": "float32", "mode": "int8"}  # first quantized mode
    plan = [("fp", None), ("int8", None), ("same", None), ("better", 16.0), ("better", 2025.0)]
    assert lm.switches == plan
    assert len(calls) == len(plan)
    assert all(call["model"] is lm for call in calls)
    assert len({id(call["task_manager"].task_index) for call in calls}) == 1  # the task index is built once
    # ... and each run's tasks get that run's model arguments as metadata, as lm_eval gives them.
    assert [call["task_manager"].metadata.get("mode") for call in calls] == [mode for mode, _ in plan]
    assert [call["model_args"].get("mode") for call in calls] == [mode for mode, _ in plan]

    results_files = sorted((out / "tiny__mamba-demo").glob("results_*.json"))
    assert len(results_files) == len(plan)
    runs = find_runs([out])
    labels = sorted(summarize(run)["label"] for run in runs)
    assert labels == sorted(["fp", "int8", "same", "better/16", "better/2025"])
    for run in runs:
        summary = summarize(run)
        assert run["results"]["config"]["model"] == "mamba_floatsim"
        assert run["results"]["config"]["model_args"]["mode"] == summary["mode"]
        acc = next(m for m in summary["metrics"] if m["metric"] == "acc")
        assert acc["value"] == pytest.approx(ACCURACY[summary["mode"]])

    comparison = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    (group,) = comparison["groups"]
    acc_table = next(t for t in group["metrics"] if t["metric"] == "acc")
    assert acc_table["values"]["better/16"]["change"] == pytest.approx(ACCURACY["better"] - ACCURACY["int8"])
    assert "# Comparison of 5 runs" in printed


def test_sweep_gate_fails_like_compare(tmp_path, task_dir, fakes, capsys):
    code = sweep_cli("--modes", "int8,same,better", "--baseline", "better", "--max-drop", "0.1", "--",
                     "--model_args", "pretrained=tiny/mamba-demo", "--tasks", "sweep_lambada",
                     "--include_path", task_dir, "--output_path", tmp_path / "results")
    assert code == 1  # int8 and same are 0.2 below better
    assert "✗ sweep_lambada acc: int8 0.6000 is 0.2000 worse than better/2025 0.8000" in capsys.readouterr().out


@pytest.mark.parametrize(
    "options, lm_eval_args, message",
    [
        (["--modes", "int8,int4"], [], "--modes='int8,int4' is not allowed"),
        (["--modes", "int8,int8"], [], "--modes='int8,int8' is not allowed"),
        (["--divisors", "0"], [], "--divisors='0' is not allowed"),
        (["--modes", "int8,same", "--divisors", "16"], [], "--divisors='16' is not allowed"),
        (["--modes", "int8,same", "--baseline", "fp", "--max-drop", "0.1"], [], "--baseline='fp' is not allowed"),
        ([], ["--model", "hf"], "--model='hf' is not allowed"),
        ([], ["--model_args", "pretrained=x,mode=int8"], "mode='int8' is not allowed"),
        ([], ["--output_path", "DROP"], "--output_path=None is not allowed"),
        ([], ["--output_path", "out.json"], "--output_path='out.json' is not allowed"),
    ],
)
def test_bad_arguments_fail_before_anything_is_loaded(tmp_path, fakes, capsys, options, lm_eval_args, message):
    built, calls = fakes
    args = ["--model_args", "pretrained=x", "--tasks", "sweep_lambada", "--output_path", str(tmp_path / "o")]
    for name, value in zip(lm_eval_args[::2], lm_eval_args[1::2]):
        where = args.index(name) if name in args else None
        if where is not None:
            del args[where:where + 2]
        if value != "DROP":
            args += [name, value]
    code = sweep_cli(*options, "--", *args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert built == [] and calls == []


def test_real_sweep_calibrates_once_and_every_mode_passes_the_checks(tmp_path, task_dir, tiny_model, monkeypatch, capsys):
    """End to end with the real FloatSimLM on a tiny random checkpoint (the demo's path, smaller)."""
    from lm_eval_floatsim import calibration

    calibrations, builds = [], []
    monkeypatch.setattr(calibration, "calibrate", counting(calibration.calibrate, calibrations))
    monkeypatch.setattr(sweep, "build_lm", counting(sweep.build_lm, builds))

    out = tmp_path / "results"
    code = sweep_cli("--modes", "int8,same,better", "--divisors", "16,2025", "--", "--model_args", tiny_model,
                     "--tasks", "sweep_lambada", "--include_path", task_dir, "--output_path", out)
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert len(builds) == 1 and len(calibrations) == 1
    runs = find_runs([out])
    assert sorted(summarize(run)["label"] for run in runs) == ["better/16", "better/2025", "int8", "same"]
    assert len({run["results"]["config"]["floatsim"]["scales_sha256"] for run in runs}) == 1
    assert "✓ floatsim_samescale.json vs int8_baseline.json: codes" in printed
    assert "✓ floatsim_betterscale_16.json vs floatsim_samescale.json: smaller quantization error (stats of the run)" in printed
    # Each run's folder beside its results holds the report, which relates it to the runs before it.
    last = max(runs, key=lambda run: run["results"]["date"])
    report = json.loads((Path(last["dump_path"]).parent / "report.json").read_text())
    assert [s["label"] for s in report["runs"]] == ["int8", "same", "better/16", "better/2025"]


def logged_responses(run) -> list:
    """The responses of the samples file lm-eval saved beside the run's results (same date id)."""
    results_path = Path(run["source"])
    date_id = results_path.stem.removeprefix("results_")
    [samples] = results_path.parent.glob(f"samples_sweep_lambada_{date_id}.jsonl")
    records = sorted((json.loads(line) for line in samples.read_text().splitlines()), key=lambda record: record["doc_id"])
    return [record["resps"] for record in records]


def test_sweep_with_use_cache_gives_every_mode_the_metrics_of_an_uncached_run(tmp_path, task_dir, tiny_model, capsys):
    def sweep_metrics(out, *cache) -> tuple[int, dict]:
        """The exit code, and per run its metrics and per-document loglikelihoods."""
        code = sweep_cli("--modes", "fp,int8,better", "--", "--model_args", tiny_model, "--tasks", "sweep_lambada",
                         "--include_path", task_dir, "--output_path", out, "--log_samples", *cache)
        return code, {summarize(run)["label"]: (run["results"]["results"]["sweep_lambada"], logged_responses(run))
                      for run in find_runs([out])}

    cache = tmp_path / "responses"
    uncached_code, uncached = sweep_metrics(tmp_path / "uncached")
    filled_code, filled = sweep_metrics(tmp_path / "filled", "--use_cache", cache)
    capsys.readouterr()
    cached_code, answered_from_cache = sweep_metrics(tmp_path / "cached", "--use_cache", cache)
    assert len(uncached) == 3 and len({json.dumps(run) for run in uncached.values()}) == 3  # the modes differ
    assert uncached_code == filled_code == 0 and filled == uncached
    assert answered_from_cache == uncached
    assert sorted(path.name for path in tmp_path.glob("responses*")) == [
        "responses_better_2025_rank0.db", "responses_fp_rank0.db", "responses_int8_rank0.db"
    ]
    # No forward ran, so the dumps hold no values of the run, and the checks say so.
    printed = capsys.readouterr().out
    assert cached_code == 1 and "✗ int8_baseline.json: no nulls" in printed


def test_sweep_saves_exactly_what_separate_lm_eval_runs_save(tmp_path, ppl_task, tiny_model, monkeypatch):
    """Whole results files (but for the clock) and logged samples, with lm-eval's environment report
    and a bootstrapped standard error (perplexity), against `lm_eval` run once per mode."""
    from lm_eval.api import metrics
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.loggers.utils import add_env_info

    calls = {name: [] for name in ("environment", "bootstrap", "prompts", "tokenized")}
    lm_evals_bootstrap = metrics.bootstrap_stderr
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", counting(add_env_info, calls["environment"]))
    monkeypatch.setattr(metrics, "bootstrap_stderr", counting(lm_evals_bootstrap, calls["bootstrap"]))
    monkeypatch.setattr(ConfigurableTask, "construct_requests", counting(ConfigurableTask.construct_requests, calls["prompts"]))
    monkeypatch.setattr(TemplateLM, "_encode_pair", counting(TemplateLM._encode_pair, calls["tokenized"]))
    task = ["--tasks", "sweep_lambada_ppl", "--include_path", ppl_task, "--log_samples", "--metadata", '{"note": "x"}']
    assert sweep_cli("--modes", "fp,int8,better", "--divisors", "16", "--", "--model_args", tiny_model, *task,
                     "--output_path", tmp_path / "sweep") == 0
    # Three evaluations: the environment asked, the prompts rendered and tokenized once.
    assert {name: len(made) for name, made in calls.items()} == {"environment": 1, "bootstrap": 0, "prompts": N_DOCS,
                                                                  "tokenized": N_DOCS}
    for mode in ("fp", "int8", "better,divisor=16"):
        lm_eval_command("--model", "mamba_floatsim", "--model_args", f"{tiny_model},mode={mode}", *task,
                        "--output_path", tmp_path / "separate")
    # Every run's perplexity standard error came from bootstrap.py, never from lm-eval's function ...
    assert len(calls["bootstrap"]) == 0

    swept, separate = saved_runs(tmp_path / "sweep"), saved_runs(tmp_path / "separate")
    assert len(separate) == 3 and swept.keys() == separate.keys()
    for model_args, (results, samples) in separate.items():
        assert "pretty_env_info" in results
        assert len(samples["sweep_lambada_ppl"]) == N_DOCS
        # ... and is lm-eval's own, bootstrapped here from the run's logged per-document values.
        values = [record["perplexity"] for record in sorted(samples["sweep_lambada_ppl"], key=lambda r: r["doc_id"])]
        stderr = results["results"]["sweep_lambada_ppl"]["perplexity_stderr,none"]
        assert stderr > 0 and stderr == lm_evals_bootstrap(metrics.perplexity, values, 100000)
        found = differences(swept[model_args], (results, samples))
        assert not found, "\n".join([model_args, *found])
