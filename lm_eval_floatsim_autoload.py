"""Registers the lm-eval model `mamba_floatsim` as soon as `lm_eval.models` has been imported.

lm-eval 0.4.13 has no plugin discovery: it only knows the models named in `lm_eval.models`. The
`lm_eval_floatsim_autoload.pth` file that the package installs into site-packages imports this
module at interpreter start. It is a top-level module that uses the standard library only, because
.pth files run while site-packages directories are still being added to sys.path: in a
`--system-site-packages` venv or a user site, the package's dependencies (pluggy, lm_eval, torch)
are not importable yet, so neither is `lm_eval_floatsim` itself. All this module does at start is
put a finder at the front of `sys.meta_path`. When something imports `lm_eval.models`, the finder
lets the other finders locate it and wraps its loader, so that right after the module has run,
`mamba_floatsim` is added to lm-eval's model registry as a lazy placeholder:
`lm_eval_floatsim.lm_model` (and torch) is imported only when the model is used.
"""

import sys

MODEL_NAME = "mamba_floatsim"
MODEL_TARGET = "lm_eval_floatsim.lm_model:FloatSimLM"
WATCHED_MODULE = "lm_eval.models"


def register_model() -> None:
    """Add `mamba_floatsim` to lm-eval's model registry (once)."""
    from lm_eval.api import registry

    model_registry = getattr(registry, "model_registry", None)
    if model_registry is not None:
        if MODEL_NAME not in model_registry:
            model_registry.register(MODEL_NAME, target=MODEL_TARGET)
        return
    # lm-eval before the lazy registry (a plain MODEL_REGISTRY dict): register the class itself.
    if MODEL_NAME not in registry.MODEL_REGISTRY:
        from lm_eval_floatsim.lm_model import FloatSimLM

        registry.register_model(MODEL_NAME)(FloatSimLM)


def _register_or_warn() -> None:
    # A failure here must not break `import lm_eval.models` for every other model.
    try:
        register_model()
    except Exception as error:  # noqa: BLE001 - any lm-eval API change lands here
        import warnings

        warnings.warn(f"lm_eval_floatsim: could not register the lm-eval model {MODEL_NAME!r}: {error}")


class _RegisteringLoader:
    """The real loader of `lm_eval.models`, plus registration once the module has executed."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _register_or_warn()

    def __getattr__(self, name):
        # get_code, get_source, get_resource_reader, ...: whatever importlib or tools ask for.
        return getattr(self._loader, name)


class _WatchForLmEvalModels:
    """A meta path finder that finds nothing itself; it only wraps the loader of `lm_eval.models`."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != WATCHED_MODULE:
            return None
        sys.meta_path.remove(self)  # one shot: a reload finds the module as usual
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            spec = find_spec(fullname, path, target) if find_spec is not None else None
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


def install() -> None:
    if WATCHED_MODULE in sys.modules:
        _register_or_warn()
    elif not any(isinstance(finder, _WatchForLmEvalModels) for finder in sys.meta_path):
        sys.meta_path.insert(0, _WatchForLmEvalModels())


install()
