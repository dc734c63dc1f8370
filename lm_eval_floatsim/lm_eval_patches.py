"""Every patch of lm-eval's internals that `mamba_floatsim` installs, and the logger it writes to.

Each patch was checked against lm-eval 0.4.13; none is installed on import (FloatSimLM's
constructor and `_loglikelihood_tokens` install them):
- `capturing_padding`: wraps `pad_and_concat` in HFLM's module while `_loglikelihood_tokens` runs,
  restoring what it found after;
- `install_results_hook`: wraps `EvaluationTracker.save_results_aggregated`, once per process;
- `install_one_line_user_errors`: wraps `sys.excepthook`, once per process.
Where an lm-eval lacks what the first two patch, they warn once instead of failing.

`lm_model.FloatSimLM` also relies on HFLM's private members (lm-eval 0.4.13), without patching them:
- it sets `_model` and `_config` (`_get_config`, `_create_model`; `tokenizer` too), `_rank` and
  `_world_size` (`data_parallel.use_all_processes`; `_world_size` also in `data_parallel.run_alone`),
  and reads `_device` and `accelerator`;
- it overrides `_get_config`, `_create_tokenizer`, `_create_model`, `_detect_batch_size`,
  `_loglikelihood_tokens`, `_model_call` and `_model_generate` (besides the public `loglikelihood`,
  `loglikelihood_rolling`, `generate_until`, `gather_object`, `set_cache_hook`, `get_model_info`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Callable

from .errors import FloatSimError

# lm-eval attaches its handler to the "lm_eval" logger only (`lm_eval.utils.setup_logging`, 0.4.13);
# messages logged beneath it are formatted and filtered like lm-eval's own (LMEVAL_LOG_LEVEL).
logger = logging.getLogger("lm_eval.models.mamba_floatsim")


@functools.lru_cache(maxsize=None)
def warn_once(message: str) -> None:
    logger.warning(message)


@contextlib.contextmanager
def capturing_padding(note_lengths: Callable):
    """Call `note_lengths(lengths, max_length, padding_side, device)` for each batch HFLM pads.

    Patches `pad_and_concat` as HFLM's module (lm_eval.models.huggingface) imported it, for the
    duration of the block, and restores what it found after. Why: HFLM's `_loglikelihood_tokens`
    right-pads a loglikelihood batch with `pad_and_concat(length, rows, "right")` and calls
    `_model_call` with the result and no mask; the padding is the token 0, which is also a real
    token, so the rows' lengths are the only way to tell padding from text.
    """
    from lm_eval.models.huggingface import HFLM

    module = sys.modules[HFLM.__module__]
    original = getattr(module, "pad_and_concat", None)
    if original is None:
        warn_once("this lm-eval has no pad_and_concat in HFLM's module: loglikelihood statistics include padding")
        yield
        return

    def pad_and_note_lengths(max_length, tensors, padding_side="right"):
        lengths = [tensor.shape[-1] for tensor in tensors]  # before pad_and_concat pads them in place
        batch = original(max_length, tensors, padding_side)
        note_lengths(lengths, max_length, padding_side, batch.device)
        return batch

    module.pad_and_concat = pad_and_note_lengths
    try:
        yield
    finally:
        module.pad_and_concat = original


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
