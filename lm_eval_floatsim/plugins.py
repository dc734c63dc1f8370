"""The plugin manager: the built-in plugin plus every plugin of the `lm_eval_floatsim` entry-point group."""

from __future__ import annotations

import functools

import pluggy

from . import hookspecs

ENTRY_POINT_GROUP = "lm_eval_floatsim"


@functools.lru_cache(maxsize=None)
def plugin_manager() -> pluggy.PluginManager:
    from . import builtin_plugin

    manager = pluggy.PluginManager("lm_eval_floatsim")
    manager.add_hookspecs(hookspecs)
    manager.register(builtin_plugin, name="builtin")
    manager.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
    return manager
