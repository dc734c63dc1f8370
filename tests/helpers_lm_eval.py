"""The reference for the commands that evaluate many runs in one process: separate `lm_eval` runs.

`lm_eval_command(*argv)` runs lm-eval's own command line (`lm_eval ...`, its `cli_evaluate`) in
this process; `saved_runs(output_path)` reads back what runs saved under an output path, keyed by
their model arguments, without the fields lm-eval itself varies from run to run (dates, timings);
`counting(function, calls)` wraps a function to record its calls (what is done once per process).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Fields of a results file that lm-eval sets from the clock.
CLOCK_FIELDS = ("date", "start_time", "end_time", "total_evaluation_time_seconds")


def counting(function, calls: list):
    def counted(*args, **kwargs):
        calls.append(args)
        return function(*args, **kwargs)

    return counted


def lm_eval_command(*argv) -> None:
    from lm_eval.__main__ import cli_evaluate

    saved = sys.argv
    sys.argv = ["lm_eval", *map(str, argv)]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved


def saved_runs(output_path: Path) -> dict:
    """{model arguments as JSON: (results without CLOCK_FIELDS, {task: samples})} of every run saved there."""
    runs = {}
    for results_file in sorted(Path(output_path).rglob("results_*.json")):
        results = json.loads(results_file.read_text())
        date_id = results_file.stem.removeprefix("results_")
        samples = {path.name.removeprefix("samples_").removesuffix(f"_{date_id}.jsonl"): _records(path)
                   for path in results_file.parent.glob(f"samples_*_{date_id}.jsonl")}
        key = json.dumps(results["config"]["model_args"], sort_keys=True)
        assert key not in runs, f"two runs of {key} under {output_path}"
        runs[key] = ({name: value for name, value in results.items() if name not in CLOCK_FIELDS}, samples)
    return runs


def _records(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def differences(a, b, path: str = "") -> list[str]:
    """Where two JSON values differ, as paths with both values (an empty list: equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [found for key in sorted(set(a) | set(b), key=str)
                for found in (differences(a.get(key, "<missing>"), b.get(key, "<missing>"), f"{path}/{key}")
                              if key in a and key in b else [f"{path}/{key}: only in {'the first' if key in a else 'the second'}"])]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [found for i, (x, y) in enumerate(zip(a, b)) for found in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r:.200} != {b!r:.200}"]
