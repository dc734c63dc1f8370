"""The hook contract of lm-eval-floatsim.

Plugins implement any of these with ``@lm_eval_floatsim.hookimpl`` and are found through the
``lm_eval_floatsim`` entry-point group (see `plugins`). The built-in behaviour (the run report,
the standard checks) is itself a plugin, `lm_eval_floatsim.builtin_plugin`.
"""

import pluggy

hookspec = pluggy.HookspecMarker("lm_eval_floatsim")


@hookspec
def floatsim_register_modes(register):
    """Add modes: call ``register(mode)`` with a `lm_eval_floatsim.modes.Mode` for each.

    A registered mode is a value of the model argument `mode` and of the `--modes` options, and
    its runs are dumped, checked and compared like the built-in ones (which the built-in plugin
    registers this way).
    """


@hookspec
def floatsim_dump_written(path, dump):
    """A run's dump file was written (atomically) to `path`; `dump` is its parsed content."""


@hookspec
def floatsim_run_finished(run, output_dir):
    """An evaluation finished.

    `run` is a dict: ``results`` (lm-eval's results dict, with ``config.floatsim``), ``dump``
    (the dump content), ``dump_path``, ``scales`` (the scales file content). `output_dir` is the
    folder holding the run's dump; files a plugin writes there belong to the run. Return value:
    a list of paths written, or None.
    """


@hookspec
def floatsim_compare_sections(runs):
    """Add to `lm-eval-floatsim compare`.

    `runs` is the list of runs found (each the dict described in `floatsim_run_finished`, plus
    ``source``, the results file). Return a list of sections, each a dict with ``title`` (str),
    ``markdown`` (str) and optionally ``checks``: a list of ``{"name", "ok", "detail"}``; a failed
    check makes `compare` exit 1.
    """
