"""The example third-party plugin (examples/plugin) installs with pip, is found through the
`lm_eval_floatsim` entry-point group, and its section and check show up in `compare`."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers_runs import write_standard_runs

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "examples" / "plugin"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory) -> Path:
    """`pip install --target` of the example plugin (built from a copy: the build leaves files behind)."""
    work = tmp_path_factory.mktemp("plugin")
    shutil.copytree(PLUGIN, work / "src")
    site = work / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--disable-pip-version-check", "--target", str(site), str(work / "src")], check=True)
    assert list(site.glob("floatsim_example_plugin-*.dist-info/entry_points.txt"))
    return site


def compare(runs: Path, site: Path | None) -> subprocess.CompletedProcess:
    path = [str(site)] if site else []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path + [str(ROOT)])}
    return subprocess.run([sys.executable, "-m", "lm_eval_floatsim.cli", "compare", str(runs)],
                          capture_output=True, text=True, env=env, cwd=runs)


def test_installed_plugin_adds_its_section(tmp_path, plugin_site):
    write_standard_runs(tmp_path, labels=("int8", "same", "better/2025"))
    done = compare(tmp_path, plugin_site)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "## Example plugin: SQNR floor" in done.stdout
    assert "| int8 | 0 | 28.00 |" in done.stdout  # the fixture's int8 is weakest in layer 0 at 28 dB
    assert "✓ better/2025: every layer's SQNR >= 20 dB" in done.stdout

    without = compare(tmp_path, None)
    assert without.returncode == 0 and "Example plugin" not in without.stdout


def test_plugin_check_failure_makes_compare_exit_1(tmp_path, plugin_site):
    write_standard_runs(tmp_path, labels=("int8", "same"), sqnr_offset=-15.0)  # int8 layer 0 at 13 dB
    done = compare(tmp_path, plugin_site)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "✗ int8: every layer's SQNR >= 20 dB — weakest layer 0 at 13.00 dB" in done.stdout
    assert "**FAIL**" in done.stdout
