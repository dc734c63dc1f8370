"""The errors a user can cause. The command-line tool and the lm-eval model print them as one line."""


class FloatSimError(Exception):
    """Base of every user-facing error of the package."""


class ArgumentError(FloatSimError, ValueError):
    """A model argument or command option has a value that is not allowed.

    The message names the argument, the bad value and what is allowed.
    """

    def __init__(self, argument: str, value, allowed: str):
        super().__init__(f"{argument}={value!r} is not allowed: expected {allowed}")
        self.argument, self.value, self.allowed = argument, value, allowed


class InputError(FloatSimError):
    """A file or folder is unusable: an input (checkpoint, scales, calibration data, dumps, results)
    that is missing or corrupt, or an output (dump_dir, --out) that cannot be written."""
