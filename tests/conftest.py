"""Session fixtures shared by test modules: the Hugging Face Hub stand-in (tests/hub_standin.py).

`hub` serves, on 127.0.0.1, small seeded copies of every repository that the default
`lm_eval --model mamba_floatsim --tasks lambada` run downloads, so that hub ids can be tested
without a network; one server per session, started on first use and stopped at the end.
`hub_repos` gives those repositories and the transformers model whose weights they hold.
A session that uses neither starts nothing (pytest creates fixtures on demand).

`model_files` (a 2-block checkpoint in both layouts with its scales, once per test module) and
`task_manager` (lm-eval's index of the floatsim_* tasks) serve the tests of the lm-eval model.

`task_dir` (a lambada-style task `sweep_lambada` of N_DOCS documents; `ppl_task` adds
`sweep_lambada_ppl`, with perplexity) and `tiny_model` (a random
3-block checkpoint with its calibration settings as model arguments) serve the commands that run
many evaluations in one process, `sweep` and `sensitivity`.

`work` (a folder per test module) and `zygote` (helpers_forked_runs' process that forks real runs,
one per test module) serve the tests that kill runs or run them together. `one_thread` (torch on one
thread for the rest of a test module) is used, through `pytestmark`, by the modules whose models are tiny.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest

N_DOCS = 10


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory):
    import hub_standin

    return hub_standin.build_test_repos(tmp_path_factory.mktemp("hub-repos"))


@pytest.fixture(scope="session")
def hub(hub_repos):
    import hub_standin

    with hub_standin.HubStandIn(hub_repos.repos) as standin:
        yield standin


TASK_YAML = """task: sweep_lambada
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture
def task_dir(tmp_path) -> Path:
    """A lambada-style task of N_DOCS documents, `sweep_lambada`, read from a local json file."""
    folder = tmp_path / "task"
    folder.mkdir()
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f"passage {i} about the colour of the sky ends with blue{i}"}) + "\n"
                            for i in range(N_DOCS)))
    (folder / "sweep_lambada.yaml").write_text(TASK_YAML.format(data=data))
    return folder


PERPLEXITY_TASK = TASK_YAML.replace("task: sweep_lambada", "task: sweep_lambada_ppl") + """  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
"""


@pytest.fixture
def ppl_task(task_dir):
    """The sweep task again as `sweep_lambada_ppl`, with perplexity (a random model's accuracy is 0;
    lm-eval bootstraps a perplexity's standard error)."""
    data = task_dir / "docs.jsonl"
    (task_dir / "sweep_lambada_ppl.yaml").write_text(PERPLEXITY_TASK.format(data=data))
    return task_dir


@pytest.fixture
def tiny_model(tmp_path, monkeypatch):
    """A tiny random checkpoint, its calibration text and model arguments, for real sweeps; the
    scales cache in tmp_path (no scales from another test's cache)."""
    import lm_eval.evaluator
    import lm_eval.tasks
    from helpers_models import make_checkpoint

    model_dir, _ = make_checkpoint(tmp_path / "model", layout="transformers", num_hidden_layers=3)
    calib = tmp_path / "calib.txt"
    calib.write_text("".join(f"calibration sentence {i} about the colour of the sky\n" for i in range(8)))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    # Speed only: index just the test's task folder, and skip lm-eval's environment report.
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", functools.partial(lm_eval.tasks.TaskManager, include_defaults=False))
    monkeypatch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)
    return f"pretrained={model_dir},calib_data={calib},calib_samples=4,calib_seqlen=32,dump_dir={tmp_path / 'dumps'}"


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    """(transformers-layout folder, mamba_ssm-layout folder, scales file, reference model): 2 blocks."""
    from fixtures.floatsim_runs import make_model

    return make_model(tmp_path_factory.mktemp("model"))


@pytest.fixture(scope="module")
def task_manager():
    from fixtures.floatsim_runs import TASKS_DIR
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny models: threads only add synchronisation, which is
    slow on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("interrupted")


@pytest.fixture(scope="module")
def zygote(work):
    """Named before `model_files` by the tests, so that the model is built while the zygote imports."""
    from helpers_forked_runs import Zygote

    started = Zygote(work)
    yield started
    started.close()
