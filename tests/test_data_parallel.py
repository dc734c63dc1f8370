"""Data parallel on CPU: `torchrun --nproc_per_node 2 -m lm_eval` (gloo) splits the requests, gives the
metrics and statistics of a single process, and leaves one set of files, written by rank 0."""

from __future__ import annotations

import json
import math
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from fixtures.floatsim_runs import TASK_NAMES, TASKS_DIR, console_script, make_model, model_args, subprocess_env

# Odd, so that the ranks get 5 and 4 documents: lm-eval pads rank 1 with a copy of a request.
LIMIT = 9
BATCH_SIZE = 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same evaluation by two torchrun processes and by one process (in this one)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    from lm_eval_floatsim.lm_model import FloatSimLM

    work = tmp_path_factory.mktemp("data_parallel")
    hf_folder, _, scales, _ = make_model(work / "model")
    arguments = dict(pretrained=hf_folder, mode="int8", scales=scales)
    command = [
        console_script("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "lm_eval",
        "--model", "mamba_floatsim", "--model_args", model_args(**arguments, dump_dir=work / "dumps"),
        "--include_path", str(TASKS_DIR), "--tasks", ",".join(TASK_NAMES), "--limit", str(LIMIT),
        "--batch_size", str(BATCH_SIZE), "--device", "cpu", "--output_path", str(work / "out"), "--log_samples",
    ]
    done = subprocess.run(command, env=subprocess_env(work), cwd=work, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]

    single = FloatSimLM(**{key: str(value) for key, value in arguments.items()}, dump_dir=str(work / "single"),
                        batch_size=BATCH_SIZE, device="cpu")
    reference = lm_eval.simple_evaluate(
        model=single, tasks=list(TASK_NAMES), task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
        limit=LIMIT, log_samples=True,
    )
    return work, done.stdout + done.stderr, reference


def saved_results(work):
    [results_file] = (work / "out").rglob("results_*.json")
    return results_file, json.loads(results_file.read_text())


def test_requests_are_split_across_both_ranks(runs):
    _, output, _ = runs
    for rank in (0, 1):
        assert f"Building contexts for floatsim_lambada on rank {rank}" in output


def test_metrics_equal_a_single_process_run(runs):
    work, _, reference = runs
    _, results = saved_results(work)
    for task in TASK_NAMES:
        for metric, value in reference["results"][task].items():
            if "stderr" in metric or not isinstance(value, (int, float)):
                continue
            # The same documents, batched differently across ranks: fp32 sums in another order
            # move a loglikelihood by ~1e-7 relative, which perplexities carry over.
            assert results["results"][task][metric] == pytest.approx(float(value), rel=1e-5), (task, metric)


def test_per_sample_results_equal_a_single_process_run(runs):
    """The copies lm-eval pads rank 1 with are answered as the request they copy, not run."""
    work, _, reference = runs
    results_file, _ = saved_results(work)
    date_id = results_file.stem.removeprefix("results_")
    for task in TASK_NAMES:
        lines = (results_file.parent / f"samples_{task}_{date_id}.jsonl").read_text().splitlines()
        parallel = {sample["doc_id"]: sample["resps"] for sample in map(json.loads, lines)}
        single = {sample["doc_id"]: sample["resps"] for sample in reference["samples"][task]}
        assert sorted(parallel) == sorted(single) == list(range(LIMIT))
        for doc_id, resps in single.items():
            assert len(parallel[doc_id]) == len(resps)
            found, expected = parallel[doc_id][0][0], resps[0][0]
            if isinstance(expected, str):
                assert found == expected
            else:
                found = found[0] if isinstance(found, list) else found
                expected = expected[0] if isinstance(expected, tuple) else expected
                assert math.isclose(float(found), float(expected), rel_tol=1e-5), (task, doc_id)


def test_statistics_are_combined_across_ranks(runs):
    work, _, reference = runs
    _, results = saved_results(work)
    parallel, single = results["config"]["floatsim"]["layers"], reference["config"]["floatsim"]["layers"]
    assert [layer["count"] for layer in parallel] == [layer["count"] for layer in single]
    assert all(layer["count"] > 0 for layer in parallel)
    for p, s in zip(parallel, single):
        assert p["nonfinite"] == s["nonfinite"]
        # Per-position errors agree to ~1e-7 relative between the two batchings (see above).
        assert p["max_abs_err"] == pytest.approx(s["max_abs_err"], rel=1e-5)
        assert p["mean_abs_err"] == pytest.approx(s["mean_abs_err"], rel=1e-5)
        assert p["clamped_fraction"] == pytest.approx(s["clamped_fraction"], abs=1e-6)


def test_one_set_of_files_written_by_rank_0(runs):
    work, output, _ = runs
    assert sorted(path.name for path in (work / "dumps").iterdir()) == ["int8_baseline.json"]
    results_file, results = saved_results(work)
    folders = sorted(path.name for path in results_file.parent.iterdir() if path.is_dir())
    assert folders == [f"floatsim_{results_file.stem.removeprefix('results_')}"]
    assert output.count("mamba_floatsim: wrote") == 1
    assert results["config"]["floatsim"]["dump_file"] == str(work / "dumps" / "int8_baseline.json")
