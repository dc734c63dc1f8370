"""Every patch of lm-eval's internals that `mamba_floatsim` installs, and the logger it writes to.

Each patch was checked against lm-eval 0.4.13; none is installed on import (FloatSimLM's
constructor installs them, `sweep` the last):
- `install_results_hook`: wraps `EvaluationTracker.save_results_aggregated`, once per process;
- `install_one_line_user_errors`: wraps `sys.excepthook`, once per process;
- `install_fast_bootstrap`: replaces `lm_eval.api.metrics.bootstrap_stderr` (which lm-eval's
  `stderr_for_metric` looks up by name) with `bootstrap.bootstrap_stderr`, once per process;
- `install_compiled_templates`: replaces `lm_eval.utils.apply_template` (which `Task` looks up
  by name) with one that compiles each template once, with lm-eval's Jinja environment
  (`lm_eval.utils.env`), once per process;
- `evaluating_repeatedly` (sweep and sensitivity, for the duration of their evaluations): replaces
  `lm_eval.evaluator.add_env_info` and `Task.build_all_requests` (reading `Task._instances`,
  `fewshot_rnd`, `dump_config()`), restoring them after; `task_manager_with_metadata` copies a
  TaskManager with another `_factory` (`lm_eval.tasks._factory.TaskFactory`).
Where an lm-eval lacks what the results hook patches, it warns once instead of failing; the bootstrap
is replaced only on the lm-eval releases whose algorithm `bootstrap` reproduces
(`REPRODUCED_LM_EVAL`), and the templates only where lm-eval has the function and environment.

`lm_model.FloatSimLM` also relies on HFLM's private members (lm-eval 0.4.13), without patching them:
- it sets `_model` and `_config` (`_get_config`, `_create_model`; `tokenizer` too), `_rank` and
  `_world_size` (`data_parallel.use_all_processes`; `_world_size` also in `data_parallel.run_alone`),
  and reads `_device` and `accelerator`;
- it overrides `_get_config`, `_create_tokenizer`, `_create_model`, `_detect_batch_size`,
  `_encode_pair` (TemplateLM's), `_loglikelihood_tokens`, `_model_call` and `_model_generate`
  (besides the public `loglikelihood`, `loglikelihood_rolling`, `generate_until`, `gather_object`,
  `set_cache_hook`, `get_model_info`);
- `scoring` (its `_loglikelihood_tokens`) reads `logits_cache`, `softmax_dtype`, `batch_size`,
  `max_length`, `cache_hook` and `rank`, calls `_batch_scheduler`, and resets `batch_sizes` as
  HFLM does; it uses `lm_eval.models.utils.Collator` as HFLM does.
`sweep` sets `EvaluationTracker.general_config_tracker.model_source` (what `lm_eval` records as the
results' `model_source`) after simple_evaluate, which records a model object as "CUSTOM".
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import random
import sys
from typing import Callable

import numpy as np

from .errors import FloatSimError

# lm-eval releases whose `bootstrap_stderr` `bootstrap.py` was checked to reproduce bit for bit.
REPRODUCED_LM_EVAL = ("0.4.13",)

# lm-eval attaches its handler to the "lm_eval" logger only (`lm_eval.utils.setup_logging`, 0.4.13);
# messages logged beneath it are formatted and filtered like lm-eval's own (LMEVAL_LOG_LEVEL).
logger = logging.getLogger("lm_eval.models.mamba_floatsim")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logger.warning(message)


def install_results_hook(after_results_saved: Callable) -> None:
    """Make `EvaluationTracker.save_results_aggregated` call `after_results_saved(tracker, results)` after it.

    Why: lm-eval offers no hook at the point where a run's results file exists; the run's dump and
    scales are copied beside it then (`publishing.after_results_saved`). Installed once per process.
    """
    try:
        from lm_eval.loggers.evaluation_tracker import EvaluationTracker
    except ImportError:
        EvaluationTracker = None
    original = getattr(EvaluationTracker, "save_results_aggregated", None)
    if original is None:
        warn_once("this lm-eval has no EvaluationTracker.save_results_aggregated: dumps are written to dump_dir only")
        return
    if getattr(original, "floatsim_wrapped", False):
        return

    @functools.wraps(original)
    def save_results_aggregated(tracker, results, *args, **kwargs):
        saved = original(tracker, results, *args, **kwargs)
        after_results_saved(tracker, results)
        return saved

    save_results_aggregated.floatsim_wrapped = True
    EvaluationTracker.save_results_aggregated = save_results_aggregated


def install_one_line_user_errors() -> None:
    """Make an uncaught user error (FloatSimError) print as the one line that says what is wrong.

    Patches `sys.excepthook`, once per process; every other error goes to the hook found. Why:
    lm-eval's `lm_eval` command lets an exception raised while building the model escape as a
    traceback, so a bad model argument or an unusable checkpoint would bury its message.
    """
    if not getattr(sys.excepthook, "floatsim_one_line", False):
        sys.excepthook = _one_line_user_errors(sys.excepthook)


def _one_line_user_errors(previous):
    def excepthook(kind, error, traceback):
        if isinstance(error, FloatSimError):
            print(f"mamba_floatsim: error: {error}", file=sys.stderr)
        else:
            previous(kind, error, traceback)

    excepthook.floatsim_one_line = True
    return excepthook


def install_fast_bootstrap() -> None:
    """Make lm-eval bootstrap a perplexity's standard error with `bootstrap.bootstrap_stderr`.

    Why: lm-eval draws ~10^8 Python random numbers per 1000 documents for it, the largest fixed
    cost of an evaluation after the forwards (half of a demo run's time); `bootstrap` draws the
    same resamples with numpy and gives the same number bit for bit (tests/test_bootstrap.py),
    and hands every other statistic to lm-eval's own function. Installed once per process.
    """
    from importlib.metadata import version

    from lm_eval.api import metrics

    from . import bootstrap

    current = metrics.bootstrap_stderr
    if getattr(current, "floatsim_fast", False):
        return
    if version("lm_eval") not in REPRODUCED_LM_EVAL:
        warn_once(f"lm-eval {version('lm_eval')} may bootstrap otherwise than {', '.join(REPRODUCED_LM_EVAL)}: "
                  "its own (slower) bootstrap computes the standard errors")
        return
    fast = functools.partial(bootstrap.bootstrap_stderr, original=current)
    fast.floatsim_fast = True
    metrics.bootstrap_stderr = fast


def install_compiled_templates() -> None:
    """Make lm-eval compile each prompt template once, not once per document it renders.

    Why: `lm_eval.utils.apply_template` compiles its Jinja template (`env.from_string`) on every
    call, and a task calls it several times per document (prompt, target, ...): for a
    lambada-style task that is most of the time it takes to build its requests (~6 s for 2000
    documents on a laptop-class core). The compiled template of lm-eval's own environment renders
    the same string. Installed once per process.
    """
    from lm_eval import utils

    if not (hasattr(utils, "apply_template") and hasattr(utils, "env")):
        warn_once("this lm-eval has no utils.apply_template or utils.env: its prompt templates are compiled per document")
        return
    if getattr(utils.apply_template, "floatsim_compiled_once", False):
        return
    compiled = functools.lru_cache(maxsize=1024)(utils.env.from_string)

    def apply_template(template: str, doc: dict) -> str:
        return compiled(template).render(**doc)

    apply_template.floatsim_compiled_once = True
    apply_template.floatsim_original = utils.apply_template
    utils.apply_template = apply_template


# --- many evaluations in one process (sweep, sensitivity) ------------------------------------------


def task_manager_with_metadata(task_manager, metadata: dict):
    """`task_manager` (its task index shared, not rebuilt) building tasks with `metadata`, as
    `TaskManager(metadata=metadata)` would.

    Why: lm-eval gives every task the run's model arguments as metadata (`EvaluatorConfig` merges
    `model_args | metadata`; the results record it under `configs`, custom dataset loaders
    receive it), so each run of a sweep builds its tasks with its own; building the index is
    what costs seconds.
    """
    import copy

    from lm_eval.tasks._factory import TaskFactory

    manager = copy.copy(task_manager)
    manager.metadata = metadata
    manager._factory = TaskFactory(meta=metadata)
    return manager


@contextlib.contextmanager
def evaluating_repeatedly(run_arguments):
    """While the block runs, each `simple_evaluate` after the first costs its forwards and metrics only.

    What lm-eval recomputes per evaluation although it is the same for every run of a sweep is
    computed once; every result is the one lm-eval computes (tests/test_sweep.py compares whole
    results files and samples with separate runs):
    - `add_env_info` (pip, the GPU and git in subprocesses, about a second): the process's
      environment, reported once and copied into every run's results;
    - `Task.build_all_requests` (every document's prompt rendered): see `_requests_built_once`;
      `run_arguments` are the model arguments the runs differ in, which a task's requests do
      not depend on;
    - the picks of a perplexity's bootstrap resamples, which depend on the number of documents
      alone (`bootstrap.reusing_resamples`).
    Restores what it replaced when the block ends. The tokenized requests are kept by FloatSimLM
    (`_encode_pair`).
    """
    from lm_eval import evaluator
    from lm_eval.api.task import Task

    from .bootstrap import reusing_resamples

    with contextlib.ExitStack() as stack:
        stack.enter_context(reusing_resamples())
        stack.enter_context(_replaced(evaluator, "add_env_info", _reported_once(evaluator.add_env_info)))
        built_once = _requests_built_once(Task.build_all_requests, frozenset(run_arguments))
        stack.enter_context(_replaced(Task, "build_all_requests", built_once))
        yield


@contextlib.contextmanager
def _replaced(owner, name: str, replacement):
    original = getattr(owner, name)
    setattr(owner, name, replacement)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _reported_once(add_env_info: Callable) -> Callable:
    """`add_env_info(results)` that asks the environment once and then adds the same report."""
    report: dict = {}

    def add_reported_env_info(storage: dict) -> None:
        if not report:
            add_env_info(report)
        storage.update(report)

    return add_reported_env_info


def _requests_built_once(build_all_requests: Callable, run_arguments: frozenset) -> Callable:
    """`Task.build_all_requests` that renders a task's requests once and gives later calls copies.

    A call is answered from an earlier one when the task is of the same class with the same
    configuration (its metadata but for `run_arguments`) and the call's arguments are the same,
    and when its few-shot generator and the global random generators are in the same state:
    then it would build the same requests. The copies have empty responses.
    """
    built = _Replayed()

    def build_requests_once(task, **kwargs):
        key = (type(task), _configuration(task, run_arguments), repr(sorted(kwargs.items())), _fewshot_state(task))

        def build():
            build_all_requests(task, **kwargs)
            return list(task._instances)

        instances = built.call(key, build)
        task._instances = [dataclasses.replace(instance, resps=[], filtered_resps={}) for instance in instances]

    return build_requests_once


def _configuration(task, run_arguments: frozenset) -> str:
    config = dict(task.dump_config())
    metadata = config.get("metadata")
    if isinstance(metadata, dict):
        config["metadata"] = {key: value for key, value in metadata.items() if key not in run_arguments}
    return repr(config)


def _fewshot_state(task):
    generator = getattr(task, "fewshot_rnd", None)
    return None if generator is None else generator.getstate()


class _Replayed:
    """Results of calls replayed when a call repeats with the random generators in the same state.

    A replayed call leaves the generators (Python's, numpy's and torch's global ones) in the state
    the call left them in, as if it had run again.
    """

    def __init__(self):
        self._results: dict = {}

    def call(self, key, compute: Callable):
        key = (key, _generator_states())
        if key not in self._results:
            result = compute()
            self._results[key] = (result, _generator_states())
        result, after = self._results[key]
        _set_generator_states(after)
        return result


def _generator_states() -> tuple:
    import torch

    name, keys, position, has_gauss, gauss = np.random.get_state()
    return random.getstate(), (name, keys.tobytes(), position, has_gauss, gauss), bytes(torch.get_rng_state().numpy())


def _set_generator_states(states: tuple) -> None:
    import torch

    python, (name, keys, position, has_gauss, gauss), torch_state = states
    random.setstate(python)
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32), position, has_gauss, gauss))
    torch.set_rng_state(torch.frombuffer(bytearray(torch_state), dtype=torch.uint8))
