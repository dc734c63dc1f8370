"""Real runs forked from a zygote, a Python process that has imported torch and lm-eval once, and
what the files they write must be: for the tests that kill runs or run them together.

`Zygote` starts the process and sends it jobs (`evaluation` makes one: an lm-eval evaluation of
`mamba_floatsim` saved with `--output_path`); `files_under`, `whole` and `dump_n_of` read what the
runs left.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fixtures.floatsim_runs import REPO, TASKS_DIR, subprocess_env
from lm_eval_floatsim.calibration import Scales
from lm_eval_floatsim.dumps import parse_filename, read_dump

# The zygote reads one JSON request per line on stdin: {"jobs": [[job, kwargs], ...], "kill_after":
# seconds or null, "in_process": bool}. It forks one child per job (or, in_process, runs the one job
# itself), kills the children kill_after seconds after the start, waits for them and answers one JSON
# line: {"seconds": wall time, "outcomes": ["exit N" or "killed", ...]}.
ZYGOTE = r"""
import contextlib, json, os, signal, sys, time, traceback

import torch

torch.set_num_threads(1)
import lm_eval_floatsim_autoload  # noqa: F401 (registers mamba_floatsim when lm_eval.models is imported)
import lm_eval
import lm_eval.evaluator
import lm_eval.models
from lm_eval.loggers import EvaluationTracker
from lm_eval.tasks import TaskManager

from lm_eval_floatsim import cli
from lm_eval_floatsim.files import write_text_atomic

TASKS = TaskManager(include_path=sys.argv[1], include_defaults=False)
# lm-eval's environment report runs pip in subprocesses: a second per run, and nothing checked here.
lm_eval.evaluator.add_env_info = lambda results: None


def dump(argv):
    return cli.main(argv)


def evaluate(model_args, output_path, limit):
    tracker = EvaluationTracker(output_path=output_path)
    results = lm_eval.simple_evaluate(
        model="mamba_floatsim", model_args=model_args, tasks=["floatsim_lambada"], task_manager=TASKS,
        limit=limit, bootstrap_iters=0, device="cpu", evaluation_tracker=tracker,
    )
    tracker.save_results_aggregated(results=results, samples=None)
    return 0


def write_loop(path, texts):
    while True:
        for text in texts:
            write_text_atomic(path, text)


JOBS = {"dump": dump, "evaluate": evaluate, "write_loop": write_loop}


def run(job, kwargs):
    try:
        with contextlib.redirect_stdout(sys.stderr):
            return JOBS[job](**kwargs)
    except BaseException:
        traceback.print_exc()
        return 3


def fork(job, kwargs):
    pid = os.fork()
    if pid == 0:
        os._exit(run(job, kwargs))
    return pid


def outcome(status):
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return f"exit {os.WEXITSTATUS(status)}"


print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    started = time.monotonic()
    if request.get("in_process"):
        [(job, kwargs)] = request["jobs"]
        outcomes = [f"exit {run(job, kwargs)}"]
    else:
        pids = [fork(job, kwargs) for job, kwargs in request["jobs"]]
        statuses = {}
        deadline = None if request.get("kill_after") is None else started + request["kill_after"]
        while len(statuses) < len(pids):
            for pid in pids:
                if pid not in statuses:
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done:
                        statuses[pid] = status
            if deadline is not None and time.monotonic() >= deadline:
                for pid in pids:
                    if pid not in statuses:
                        os.kill(pid, signal.SIGKILL)
                        statuses[pid] = os.waitpid(pid, 0)[1]
            time.sleep(0.001)
        outcomes = [outcome(statuses[pid]) for pid in pids]
    print(json.dumps({"seconds": time.monotonic() - started, "outcomes": outcomes}), flush=True)
"""


class Zygote:
    """The zygote process and its request/answer protocol."""

    def __init__(self, work: Path):
        env = {**subprocess_env(work), "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
        self.log = work / "zygote.log"
        with self.log.open("w") as log:
            self.process = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(TASKS_DIR)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, stderr=log, env=env, cwd=work, text=True, bufsize=1)
        self.ready = False  # it imports while the test builds its model


    def run(self, jobs: list[tuple[str, dict]], kill_after: float | None = None, in_process: bool = False) -> dict:
        if not self.ready:
            assert json.loads(self._answer()) == {"ready": True}
            self.ready = True
        request = {"jobs": [[job, {key: _plain(value) for key, value in kwargs.items()}] for job, kwargs in jobs],
                   "kill_after": kill_after, "in_process": in_process}
        self.process.stdin.write(json.dumps(request) + "\n")
        return json.loads(self._answer())

    def _answer(self) -> str:
        line = self.process.stdout.readline()
        assert line, f"the zygote died: {self.log.read_text()[-3000:]}"
        return line

    def close(self) -> None:
        self.process.kill()  # its children are reaped; an orderly interpreter exit only costs seconds
        self.process.communicate()


def _plain(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def files_under(*folders: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for folder in folders if folder.exists() for path in sorted(folder.rglob("*")) if path.is_file()}


def whole(path: Path) -> object:
    """The content of a file a run writes, read as strictly as its format allows (fails if partial)."""
    if parse_filename(path.name) is not None:
        return read_dump(path)
    if path.name == "scales.json":
        return Scales.load(path)
    if path.suffix == ".json":
        return json.loads(path.read_text(encoding="utf-8"))
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n"), f"{path} ends mid-line"
    return text


def evaluation(model_files, dump_dir: Path, output_path: Path, dump_n: int, mode: str = "int8") -> tuple[str, dict]:
    """dump_n tells the runs apart: it is recorded in the dump, the results and their copies."""
    hf_folder, _, scales, _ = model_files
    model_args = f"pretrained={hf_folder},mode={mode},scales={scales},dump_dir={dump_dir},dump_n={dump_n}"
    return "evaluate", {"model_args": model_args, "output_path": output_path, "limit": 4}


def dump_n_of(path: Path, content) -> int | None:
    """The run a file of the dump folder or of the output path belongs to (by its dump_n)."""
    if isinstance(content, dict) and "layers" in content:
        return content["config"]["dump_n"]
    if path.name.startswith("results_"):  # model_args as given: "pretrained=...,dump_n=7"
        return int(dict(arg.split("=", 1) for arg in content["config"]["model_args"].split(","))["dump_n"])
    if path.name == "report.json":
        return dump_n_of(Path(content["run"]["dump_path"]), read_dump(content["run"]["dump_path"]))
    return None
