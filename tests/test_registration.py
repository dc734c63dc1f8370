"""lm-eval finds `mamba_floatsim` with no import by hand: the .pth hook, in a regular and an editable
install, and the one-line error the stock command shows for a bad model argument."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures.floatsim_runs import OFFLINE, PTH_FILE, REPO, TASKS_DIR, subprocess_env

MODEL_TARGET = "lm_eval_floatsim.lm_model:FloatSimLM"

# Run in a fresh interpreter: what the hook imported at start, what lm-eval's registry holds once
# lm_eval.models is imported, and what lm-eval resolves the name to.
PROBE = """
import json, sys
heavy = ("torch", "transformers", "pluggy", "lm_eval", "lm_eval_floatsim")
at_start = sorted(name for name in heavy if name in sys.modules)
hook = sys.modules["lm_eval_floatsim_autoload"].__file__
import lm_eval.models
from lm_eval.api.registry import get_model, model_registry
placeholder = dict(model_registry.items()).get("mamba_floatsim")
loaded_early = "lm_eval_floatsim.lm_model" in sys.modules
model = get_model("mamba_floatsim")
from importlib.metadata import entry_points
declared = [ep.value for ep in entry_points(group="lm_eval.models") if ep.name == "mamba_floatsim"]
print(json.dumps({"at_start": at_start, "hook": hook, "placeholder": placeholder, "loaded_early": loaded_early,
                  "model": f"{model.__module__}:{model.__qualname__}", "declared": declared}))
"""


def probe(python: str, env: dict) -> dict:
    done = subprocess.run([python, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Error processing line" not in done.stderr, done.stderr  # a failing .pth line is only printed
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_hook_registers_lazily_and_imports_nothing_at_start(tmp_path):
    found = probe(sys.executable, subprocess_env(tmp_path))
    assert found["at_start"] == []
    assert found["placeholder"] == MODEL_TARGET
    assert not found["loaded_early"]  # torch and the model code load only when the model is asked for
    assert found["model"] == MODEL_TARGET


def project_copy(folder: Path) -> Path:
    """The files a build reads, copied: building writes build/ and *.egg-info into the source tree."""
    for name in ("setup.py", "setup.cfg", "pyproject.toml", "README.md", PTH_FILE.name, "lm_eval_floatsim_autoload.py"):
        shutil.copy(REPO / name, folder / name)
    shutil.copytree(REPO / "lm_eval_floatsim", folder / "lm_eval_floatsim", ignore=shutil.ignore_patterns("__pycache__"))
    return folder


def venv_site_packages(venv: Path) -> Path:
    [site_packages] = venv.glob("lib/python*/site-packages")
    return site_packages


def see_this_environment(site_packages: Path) -> None:
    """torch, lm_eval, pip and setuptools come from the environment running the tests.

    `venv --system-site-packages` would show the base interpreter's packages instead, which are not
    these when the tests run in a virtual environment (as CI's fresh one). A path line adds these
    folders to sys.path without running their .pth files, so this checkout's own install (editable
    or not) is not active in the new environment: only what the test installs there is.
    """
    folders = [folder for folder in site.getsitepackages() if Path(folder).is_dir()]
    (site_packages / "_test_environment.pth").write_text("".join(f"{folder}\n" for folder in folders))


@pytest.mark.parametrize("editable", [False, True], ids=["wheel", "editable"])
def test_pip_install_puts_the_hook_where_the_stock_lm_eval_finds_it(tmp_path, editable):
    (tmp_path / "src").mkdir()
    source = project_copy(tmp_path / "src")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    see_this_environment(venv_site_packages(venv))
    python = str(venv / "bin" / "python")
    install = [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q"]
    started = time.perf_counter()
    done = subprocess.run([*install, *(["-e"] if editable else []), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"pip install {'-e ' if editable else ''}took {time.perf_counter() - started:.1f} s")

    site_packages = venv_site_packages(venv)
    pth_files = sorted(path.name for path in site_packages.glob("*.pth"))
    assert PTH_FILE.name in pth_files
    assert (site_packages / PTH_FILE.name).read_text() == PTH_FILE.read_text()
    if editable:
        # site runs .pth files in name order: setuptools' finder must be installed before our line.
        editable_pth = [name for name in pth_files if name.startswith("__editable__")]
        assert editable_pth and all(name < PTH_FILE.name for name in editable_pth)

    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONUSERBASE")}
    found = probe(python, {**env, **OFFLINE, "PYTHONNOUSERSITE": "1"})
    hook_home = source if editable else site_packages
    assert Path(found["hook"]).parent == hook_home
    assert found["at_start"] == []
    assert found["placeholder"] == MODEL_TARGET and found["model"] == MODEL_TARGET
    assert found["declared"] == [MODEL_TARGET]  # the entry point, for lm-eval versions that read it


def test_a_bad_model_argument_is_one_line_from_python_m_lm_eval(tmp_path):
    empty_model = tmp_path / "model"
    empty_model.mkdir()  # loading it would fail differently: the argument is checked first
    command = [
        sys.executable, "-m", "lm_eval", "--model", "mamba_floatsim",
        "--model_args", f"pretrained={empty_model},mode=int4", "--include_path", str(TASKS_DIR),
        "--tasks", "floatsim_lambada", "--device", "cpu",
    ]
    done = subprocess.run(command, env=subprocess_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        "mamba_floatsim: error: mode='int4' is not allowed: expected one of fp, int8, same, better"
    )
