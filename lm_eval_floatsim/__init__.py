"""lm-eval-floatsim: float simulation of an accelerator's quantized Conv1D+SiLU for Mamba models.

Importing the package is cheap (no torch): the .pth hook that registers the lm-eval model imports
it at interpreter start. The Python API is loaded on first use.
"""

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("lm_eval_floatsim")
