"""Runs killed with SIGKILL at random moments never leave a partial file, nor spoil an earlier one.

Each kill hits a real run in its own process: the `lm-eval-floatsim dump` command (cli.main), an
lm-eval evaluation of `mamba_floatsim` saved with `--output_path` (simple_evaluate and
EvaluationTracker.save_results_aggregated, as the `lm_eval` command runs them), or a writer that
does nothing but replace one dump file. The processes are forked from a *zygote*, a Python process
that has imported torch and lm-eval once, so that a run costs a second instead of the ten that an
interpreter start and lm-eval's imports take; a forked run is otherwise exactly a fresh process.

Kill times are drawn with a seeded RNG, uniformly over the duration of a complete run (the shortest
of three, so that a slow first fork cannot stretch it past what later runs take), so that they land in
every phase: loading, evaluating, writing the dumps, the results, the report. Runs are started until
enough of them were killed; a run that finished before its kill time is checked like the others.
After each kill every JSON file in dump_dir and under the output path is whole (a dump passes the
schema), each file that existed before is byte-identical or was replaced by a whole file of the
killed run, and new files belong to the killed run.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers_forked_runs import Zygote, dump_n_of, evaluation, files_under, whole
from lm_eval_floatsim.dumps import read_dump

SEED = 20251124


# --- what the files must be after a kill -------------------------------------------------------------


def temp_files(files) -> list[Path]:
    return [path for path in files if path.name.endswith(".tmp")]


def assert_after_kill(before: dict[Path, bytes], after: dict[Path, bytes], belongs_to_killed_run) -> None:
    """Files are whole; an old one is unchanged unless replaced by the killed run; new ones are the killed run's."""
    for path, data in after.items():
        if path.name.endswith(".tmp"):
            continue  # a write the kill interrupted: never renamed into place
        if path.name.startswith("results_") and path not in before and not _parses(data):
            # lm-eval writes its own results file in place (Path.write_text): a kill inside that
            # write truncates the killed run's file, which has its own date id; no earlier one.
            continue
        content = whole(path)
        if before.get(path) != data:
            assert belongs_to_killed_run(path, content), f"{path} was changed, but not by the killed run"
    assert set(before) - set(after) == set(), "a file disappeared"


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


# --- the dump command ---------------------------------------------------------------------------------


def shortest_run(zygote: Zygote, job: tuple[str, dict], runs: int = 3) -> float:
    return min(zygote.run([job])["seconds"] for _ in range(runs))


def dump_argv(model_files, dump_dir: Path, text: str) -> list:
    hf_folder, _, scales, _ = model_files
    return ["dump", "--pretrained", hf_folder, "--scales", scales, "--text", text, "--dump-dir", dump_dir, "--device", "cpu"]


def text_hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_killed_dump_commands_leave_every_file_whole(zygote, model_files, work):
    dump_dir = work / "dump-command"
    previous = zygote.run([("dump", {"argv": dump_argv(model_files, dump_dir, "The previous run.")})], in_process=True)
    assert previous["outcomes"] == ["exit 0"]
    duration = shortest_run(zygote, ("dump", {"argv": dump_argv(model_files, dump_dir, "The measured run.")}))
    rng = random.Random(SEED)
    outcomes = []
    while outcomes.count("killed") < 8 and len(outcomes) < 16:
        text = f"Killed run {len(outcomes)}."
        before = files_under(dump_dir)
        outcomes += zygote.run([("dump", {"argv": dump_argv(model_files, dump_dir, text)})],
                               kill_after=rng.uniform(0, 1.1 * duration))["outcomes"]

        def killed_runs(path, content, text=text):
            return isinstance(content, dict) and content["config"]["input"]["sha256"] == text_hash(text)

        assert_after_kill(before, files_under(dump_dir), killed_runs)
    assert set(outcomes) <= {"killed", "exit 0"} and outcomes.count("killed") >= 8, outcomes
    print(f"dump command: {duration:.2f} s per run, {outcomes.count('killed')} kills in {len(outcomes)} runs, "
          f"{len(temp_files(files_under(dump_dir)))} interrupted writes")


# --- an lm-eval evaluation saved with --output_path ----------------------------------------------------------


def test_killed_evaluations_leave_every_file_whole(zygote, model_files, work):
    dump_dir, output_path = work / "eval-dumps", work / "eval-out"
    previous = zygote.run([evaluation(model_files, dump_dir, output_path, dump_n=1)], in_process=True)
    assert previous["outcomes"] == ["exit 0"]
    previous_files = files_under(dump_dir, output_path)
    duration = shortest_run(zygote, evaluation(model_files, dump_dir, output_path, dump_n=2))
    rng = random.Random(SEED + 1)
    outcomes = []
    while outcomes.count("killed") < 5 and len(outcomes) < 10:
        dump_n = 3 + len(outcomes)
        before = files_under(dump_dir, output_path)
        outcomes += zygote.run([evaluation(model_files, dump_dir, output_path, dump_n)],
                               kill_after=rng.uniform(0, 1.1 * duration))["outcomes"]

        def killed_runs(path, content, dump_n=dump_n, before=before):
            identified = dump_n_of(path, content)
            if identified is not None:
                return identified == dump_n
            return path.parent not in {old.parent for old in before}  # scales.json, report.md: the run's new folder

        assert_after_kill(before, files_under(dump_dir, output_path), killed_runs)
    after = files_under(dump_dir, output_path)
    # The previous run's results folder is untouched; only the shared dump file may have moved on.
    assert {path: data for path, data in previous_files.items() if path.parent != dump_dir} == \
        {path: after[path] for path in previous_files if path.parent != dump_dir}
    assert set(outcomes) <= {"killed", "exit 0"} and outcomes.count("killed") >= 5, outcomes
    print(f"evaluation: {duration:.2f} s per run, {outcomes.count('killed')} kills in {len(outcomes)} runs, {len(temp_files(after))} interrupted writes")


# --- a writer killed in the middle of writing -------------------------------------------------------------------


def big_dump(source: Path, value: float) -> str:
    """A real dump with 2,000 values per layer, all equal to `value`."""
    dump = read_dump(source)
    dump["config"]["dump_n"] = 2000
    for layer in dump["layers"]:
        layer["before_quant"] = layer["after_quant"] = [value] * 2000
        layer["codes"] = [1] * 2000
    return json.dumps(dump, indent=2) + "\n"


def test_a_writer_killed_while_writing_leaves_the_old_or_the_new_file(zygote, model_files, work):
    source = work / "dump-command" / "int8_baseline.json"
    if not source.exists():
        zygote.run([("dump", {"argv": dump_argv(model_files, source.parent, "The previous run.")})], in_process=True)
    folder = work / "writer"
    folder.mkdir()
    path = folder / "int8_baseline.json"
    versions = [big_dump(source, 0.5), big_dump(source, 0.25)]
    path.write_text(versions[0], encoding="utf-8")
    rng = random.Random(SEED + 2)
    for _ in range(8):  # the loop does nothing but write: nearly every kill lands inside a write
        outcome = zygote.run([("write_loop", {"path": path, "texts": versions})], kill_after=rng.uniform(0.2, 0.5))
        assert outcome["outcomes"] == ["killed"]
        assert path.read_text(encoding="utf-8") in versions
        read_dump(path)
    interrupted = temp_files(files_under(folder))
    assert interrupted, "no kill landed inside a write: the test did not test what it says"
    print(f"writer: {len(interrupted)} of 8 kills interrupted a write")
