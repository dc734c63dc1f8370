"""Concurrent runs into one dump_dir and one --output_path: every file is whole and belongs to its run.

Runs of different modes write different dump files; two runs of the same mode write the same one,
and the last to finish wins, atomically, while lm-eval's results (one file per date id, with the
microseconds) and the floatsim_<date_id> folder beside each keep every run apart, even when the runs
start within the same millisecond. The concurrent runs are forked from helpers_forked_runs' zygote
(real processes, started together); the same-mode race is also replayed in one process, in the order
that exposes it: B writes its dump between A's dump and A's results.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from fixtures.floatsim_runs import TASKS_DIR
from helpers_forked_runs import dump_n_of, evaluation, files_under, whole
from lm_eval_floatsim.dumps import dump_filename, parse_filename, read_dump

# (mode, dump_n): dump_n tells the runs apart in every file they write.
RUNS = (("int8", 1), ("same", 2), ("better", 3), ("int8", 4))


def results_files(output_path: Path) -> list[Path]:
    return sorted(output_path.rglob("results_*.json"))


def run_folder(results_file: Path) -> Path:
    return results_file.parent / f"floatsim_{results_file.stem.removeprefix('results_')}"


def test_runs_of_every_mode_at_once_keep_their_files_apart(zygote, model_files, work):
    dump_dir, output_path = work / "concurrent-dumps", work / "concurrent-out"
    # One run in the zygote itself first: what a run imports on first use is then imported once, not in each fork.
    warm_up = zygote.run([evaluation(model_files, work / "warm-up-dumps", work / "warm-up-out", dump_n=1)], in_process=True)
    assert warm_up["outcomes"] == ["exit 0"]
    answer = zygote.run([evaluation(model_files, dump_dir, output_path, dump_n, mode) for mode, dump_n in RUNS])
    assert answer["outcomes"] == ["exit 0"] * len(RUNS)

    for path in files_under(dump_dir, output_path):
        assert not path.name.endswith(".tmp")
        whole(path)  # every file complete: dumps pass the schema, JSON parses, Markdown ends its last line
    # dump_dir: one file per mode, each its mode's; of the two int8 runs, one whole file.
    assert sorted(path.name for path in dump_dir.iterdir()) == sorted({dump_filename(mode) for mode, _ in RUNS})
    for path in dump_dir.iterdir():
        dump = read_dump(path)
        mode = parse_filename(path.name)[0]
        assert dump["config"]["mode"] == mode
        assert dump["config"]["dump_n"] in [dump_n for run_mode, dump_n in RUNS if run_mode == mode]

    # The output path: one results file and one folder per run, even though they started together.
    found = results_files(output_path)
    assert len(found) == len(RUNS) == len({run_folder(path) for path in found})
    seen = []
    for results_file in found:
        results = json.loads(results_file.read_text())
        dump_n = dump_n_of(results_file, results)
        mode = results["config"]["floatsim"]["mode"]
        assert (mode, dump_n) in RUNS
        seen.append((mode, dump_n))
        copy = read_dump(run_folder(results_file) / dump_filename(mode))
        assert (copy["config"]["mode"], copy["config"]["dump_n"]) == (mode, dump_n)  # its own run's dump
        assert [layer["stats"] for layer in copy["layers"]] == [
            {key: value for key, value in layer.items() if key != "layer_idx"} for layer in results["config"]["floatsim"]["layers"]]
        assert (run_folder(results_file) / "report.json").is_file()
    assert sorted(seen) == sorted(RUNS)
    # The last int8 run to write won dump_dir's file: it is byte-identical to that run's copy.
    int8 = (dump_dir / "int8_baseline.json").read_bytes()
    copies = [run_folder(path) / "int8_baseline.json" for path in found if (run_folder(path) / "int8_baseline.json").exists()]
    assert len(copies) == 2 and int8 in [copy.read_bytes() for copy in copies]


def test_a_run_publishes_its_own_dump_when_another_run_of_its_mode_wrote_since(model_files, tmp_path, monkeypatch):
    """A evaluates and writes its dump, B (same mode, same dump_dir) does the same, then A's results
    are saved: A's folder must hold A's dump, not the file B left in dump_dir."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from lm_eval_floatsim.lm_model import FloatSimLM

    hf_folder, _, scales, _ = model_files
    tasks = TaskManager(include_path=str(TASKS_DIR), include_defaults=False)
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # runs pip: seconds, unchecked here
    finished = {}
    for name, dump_n in (("A", 1), ("B", 2)):
        lm = FloatSimLM(pretrained=str(hf_folder), mode="int8", scales=str(scales), dump_dir=str(tmp_path / "dumps"),
                        dump_n=dump_n, device="cpu")
        tracker = EvaluationTracker(output_path=str(tmp_path / "out" / name))
        results = lm_eval.simple_evaluate(model=lm, tasks=["floatsim_lambada"], task_manager=tasks, limit=2,
                                          bootstrap_iters=0, evaluation_tracker=tracker)
        finished[name] = (tracker, results)
    for name in ("A", "B"):
        tracker, results = finished[name]
        tracker.save_results_aggregated(results=results)
    for name, dump_n in (("A", 1), ("B", 2)):
        [results_file] = results_files(tmp_path / "out" / name)
        assert read_dump(run_folder(results_file) / "int8_baseline.json")["config"]["dump_n"] == dump_n, name
    assert read_dump(tmp_path / "dumps" / "int8_baseline.json")["config"]["dump_n"] == 2  # the last written wins
