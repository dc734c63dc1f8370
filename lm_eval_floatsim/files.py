"""Atomic file writing: a reader sees the old file or the new one, never a part of either."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import InputError


def write_text_atomic(path, text: str) -> Path:
    """Write to a temp file in the same folder, fsync, then rename over `path`.

    When writing fails (a folder that cannot be created or written, a full disk), the old file is
    left as it was, the temp file is removed, and the error is an InputError naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _cannot_write(path, error) from error
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; results are for the whole team
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):  # a folder gone read-only must not hide the first error
            os.unlink(tmp)
        if isinstance(error, OSError):
            raise _cannot_write(path, error, tmp) from error
        raise
    return path


def write_json_atomic(path, obj: Any) -> Path:
    return write_text_atomic(path, json_text(obj))


def json_text(obj: Any) -> str:
    """The text write_json_atomic writes: indented, strict JSON (no NaN), one final newline."""
    return json.dumps(obj, indent=2, allow_nan=False) + "\n"


def _cannot_write(path: Path, error: OSError, tmp=None) -> InputError:
    """One line: the file, the system's reason, and the folder it concerns when that is another path."""
    reason = error.strerror or str(error) or type(error).__name__
    concerned = error.filename and str(error.filename) not in (str(path), str(tmp))
    where = f" ({error.filename})" if concerned else ""
    return InputError(f"cannot write {path}: {reason}{where}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
