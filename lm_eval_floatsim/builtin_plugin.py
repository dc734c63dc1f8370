"""The built-in behaviour, itself a plugin: the modes, the run report and the standard checks in `compare`."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from . import hookimpl
from .checks import run_checks
from .modes import BUILTIN_MODES, is_quantized
from .report import write_run_report
from .runs import comparable_groups, group_scales, summarize


@hookimpl(tryfirst=True)
def floatsim_register_modes(register):
    for mode in BUILTIN_MODES:
        register(mode)


@hookimpl
def floatsim_run_finished(run, output_dir):
    return [str(path) for path in write_run_report(run, output_dir)]


@hookimpl(tryfirst=True)
def floatsim_compare_sections(runs):
    """The user's checks (`lm-eval-floatsim check`) over the dumps of each set of comparable runs."""
    run_of = {}
    summaries = []
    for run in runs:
        summary = summarize(run)
        run_of[id(summary)] = run
        summaries.append(summary)
    sections = []
    for group in comparable_groups(summaries):
        for batch in dump_batches([run_of[id(summary)] for summary in checked_together(group)]):
            sections.append(checks_section(batch))
    return sections


def checked_together(group: list[dict]) -> list[dict]:
    """The group's runs whose dumps the checks can pool: an fp run joins a group whatever its
    scales (it uses none), but its dump records the scales it was loaded with, and the checks
    require one output scale per layer across the files."""
    scales = group_scales(group)
    return [summary for summary in group if is_quantized(summary["mode"]) or summary["scales_sha256"] in (None, scales)]


def dump_batches(group: list[dict]) -> list[list[dict]]:
    """Split runs so that no two dumps of one batch share a file name (e.g. `same` with two roundings)."""
    batches: list[list[dict]] = []
    for run in group:
        name = Path(run["dump_path"]).name
        target = next((b for b in batches if all(Path(r["dump_path"]).name != name for r in b)), None)
        if target is None:
            batches.append(target := [])
        target.append(run)
    return batches


def checks_section(batch: list[dict]) -> dict:
    """Run the checks over a temporary folder holding the batch's dump files side by side."""
    labels = [summarize(run)["label"] for run in batch]
    with tempfile.TemporaryDirectory(prefix="floatsim-compare-") as folder:
        for run in batch:
            shutil.copyfile(run["dump_path"], Path(folder) / Path(run["dump_path"]).name)
        results = run_checks(folder)
    checks = [check_entry(result) for result in results]
    return {
        "title": "Checks: " + ", ".join(labels),
        "markdown": "The checks of `lm-eval-floatsim check` over these runs' dump files: " + ", ".join(
            f"`{Path(run['dump_path']).name}`" for run in batch) + ".",
        "checks": checks,
    }


def check_entry(result) -> dict:
    """A CheckResult as a section check; informational results (a number, never failing) say so."""
    return {"name": result.name, "ok": result.ok, "detail": result.detail, "informational": result.informational}
