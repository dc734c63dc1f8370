"""`--use_cache` never hands one run's responses to another: lm-eval keys cached responses by the
request alone, so the database is bound to the settings of the run that filled it.

The reference for "the right answer" is always an uncached run of the same settings.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from fixtures.floatsim_runs import TASKS_DIR, console_script, evaluate, floatsim, model_args, subprocess_env

from lm_eval_floatsim import response_cache
from lm_eval_floatsim.calibration import Scales
from lm_eval_floatsim.errors import InputError

TASKS = ("floatsim_lambada",)


def responses(results) -> list:
    samples = sorted(results["samples"]["floatsim_lambada"], key=lambda sample: sample["doc_id"])
    return [sample["resps"] for sample in samples]


def run(lm, task_manager, cache=None):
    return evaluate(lm, task_manager, tasks=TASKS, use_cache=None if cache is None else str(cache))


def test_a_run_of_other_settings_is_refused_and_the_cache_keeps_the_first_runs_answers(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    cache = tmp_path / "responses"
    lm = floatsim(hf_folder, tmp_path / "dumps", mode="fp", scales=scales)
    first = run(lm, task_manager, cache)
    lm.switch_mode("int8")
    with pytest.raises(InputError) as refused:
        run(lm, task_manager, cache)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(f"use_cache: {cache}_rank0.db holds responses of other settings")
    assert "mode: cached 'fp', this run 'int8'" in message and "scales_sha256: cached None" in message
    lm.switch_mode("fp")  # the database still answers fp as fp
    assert responses(run(lm, task_manager, cache)) == responses(first)


def test_the_same_settings_reuse_the_cache_and_report_it(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    cache = tmp_path / "responses"
    lm = floatsim(hf_folder, tmp_path / "dumps", mode="better", divisor=16, scales=scales)
    uncached = run(lm, task_manager)
    filled = run(lm, task_manager, cache)
    reused = run(lm, task_manager, cache)
    assert responses(filled) == responses(reused) == responses(uncached)
    assert reused["results"] == uncached["results"]
    assert filled["config"]["floatsim"]["use_cache"]["responses_before_run"] == 0
    assert reused["config"]["floatsim"]["use_cache"] == {"database": f"{cache}_rank0.db", "responses_before_run": 8}
    assert uncached["config"]["floatsim"]["use_cache"] is None
    # Nothing was recomputed: the statistics say so rather than pretending to cover the run.
    assert all(layer["count"] == 0 for layer in reused["config"]["floatsim"]["layers"])


def settings_of(model_files, tmp_path, **args) -> dict:
    hf_folder, _, scales, _ = model_files
    return floatsim(hf_folder, tmp_path / "dumps", **{"scales": scales, **args}).response_settings()


@pytest.mark.parametrize(
    "first, second, differs",
    [
        (dict(mode="fp"), dict(mode="same"), True),
        (dict(mode="int8"), dict(mode="same"), True),
        (dict(mode="better", divisor=16), dict(mode="better", divisor=2025), True),
        (dict(mode="same"), dict(mode="same", rounding="half_even"), True),
        (dict(mode="better", clamp="range"), dict(mode="better", clamp="none"), True),
        (dict(mode="int8"), dict(mode="int8", dtype="bfloat16"), True),
        (dict(mode="fp"), dict(mode="fp", max_length=64), True),
        # Settings a mode does not use do not change its responses.
        (dict(mode="int8"), dict(mode="int8", rounding="half_even", divisor=16), False),
        (dict(mode="same"), dict(mode="same", clamp="none"), False),
        (dict(mode="fp"), dict(mode="fp", divisor=16, rounding="half_even"), False),
    ],
)
def test_settings_that_change_a_response_and_only_those_tell_runs_apart(model_files, tmp_path, first, second, differs):
    assert (settings_of(model_files, tmp_path, **first) != settings_of(model_files, tmp_path, **second)) is differs


def test_other_scales_and_another_model_are_other_settings(model_files, tmp_path):
    hf_folder, ssm_folder, scales, _ = model_files
    loaded = Scales.load(scales)
    first = loaded.layers[0]
    edited = replace(loaded, layers=[replace(first, output=2 * first.output), *loaded.layers[1:]]).save(tmp_path / "other.json")
    base = settings_of(model_files, tmp_path, mode="int8")
    assert settings_of(model_files, tmp_path, mode="int8", scales=edited)["scales_sha256"] != base["scales_sha256"]
    other_model = floatsim(ssm_folder, tmp_path / "dumps", mode="int8", scales=scales).response_settings()
    assert other_model["model"] != base["model"]


class FakeDatabase(dict):
    """The part of sqlitedict's SqliteDict that `claim` uses."""

    filename = "cache_rank0.db"

    def commit(self):
        pass


def test_a_database_filled_without_settings_is_refused():
    database = FakeDatabase({"4f2a": ([-1.0, True],)})
    with pytest.raises(InputError, match=r"^use_cache: cache_rank0.db holds 1 responses of a run whose settings were not recorded"):
        response_cache.claim(database, {"mode": "fp"})


def test_an_empty_database_is_bound_to_the_run():
    database = FakeDatabase()
    assert response_cache.claim(database, {"mode": "fp"}) == 0
    assert json.loads(database[response_cache.IDENTITY_KEY]) == {"mode": "fp"}


def test_the_stock_lm_eval_command_stops_with_one_line(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    cache = tmp_path / "responses"
    run(floatsim(hf_folder, tmp_path / "dumps", mode="same", scales=scales), task_manager, cache)
    arguments = model_args(pretrained=hf_folder, mode="better", scales=scales, dump_dir=tmp_path / "dumps")
    command = [console_script("lm_eval"), "--model", "mamba_floatsim", "--model_args", arguments,
               "--include_path", str(TASKS_DIR), "--tasks", "floatsim_lambada", "--limit", "8", "--device", "cpu",
               "--use_cache", str(cache)]
    done = subprocess.run(command, env=subprocess_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"mamba_floatsim: error: use_cache: {cache}_rank0.db holds responses of other settings")
    assert "mode: cached 'same', this run 'better'" in last and "divisor: cached None, this run 2025.0" in last
