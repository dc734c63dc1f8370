"""Non-finite activations: a NaN and an infinity injected into one block's input during an lm-eval
evaluation. The run completes; the dump's statistics count them where they are (and nowhere else),
the run report shows the count, and `check` flags the block."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from fixtures.floatsim_runs import TASKS_DIR, make_model
from lm_eval_floatsim import cli
from lm_eval_floatsim.dumps import read_dump

pytestmark = pytest.mark.usefixtures("one_thread")

BROKEN_LAYER = 1
D_INNER = 64  # helpers_models' default model: hidden 32, expand 2
D_CONV = 4
# (position in batch row 0, value) written into the broken block's input.
INJECTED = ((1, math.nan), (40, math.inf))


def positions_reached(length: int) -> int:
    """Conv outputs that see an injected input: the causal conv carries each to its next D_CONV - 1 positions."""
    reached = set()
    for position, _ in INJECTED:
        reached.update(range(position, min(position + D_CONV, length)))
    return len(reached)


@pytest.fixture(scope="module")
def broken_run(tmp_path_factory):
    """One `same` evaluation with the injection, its results saved the way `lm_eval --output_path` saves them."""
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager

    from lm_eval_floatsim.lm_model import FloatSimLM

    work = tmp_path_factory.mktemp("nonfinite")
    hf_folder, _, scales, _ = make_model(work / "model")
    lm = FloatSimLM(pretrained=str(hf_folder), mode="same", scales=str(scales), dump_dir=str(work / "dumps"),
                    device="cpu", batch_size=4)
    row_lengths = []

    def inject(module, args):
        hidden = args[0].clone()
        for position, value in INJECTED:
            hidden[0, position, :] = value
        row_lengths.append(hidden.shape[1])
        return (hidden, *args[1:])

    lm.model.backbone.layers[BROKEN_LAYER].mixer.register_forward_pre_hook(inject)
    tracker = EvaluationTracker(output_path=str(work / "out"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(lm_eval.evaluator, "add_env_info", lambda results: None)  # runs pip: seconds, unchecked here
        results = lm_eval.simple_evaluate(
            model=lm, tasks=["floatsim_lambada"], task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
            limit=8, bootstrap_iters=0, evaluation_tracker=tracker,
        )
    tracker.save_results_aggregated(results=results)
    return work, results, row_lengths


def test_the_run_completes_and_counts_the_nonfinite_values_of_the_broken_block_only(broken_run):
    work, results, row_lengths = broken_run
    section = results["config"]["floatsim"]
    dump = read_dump(section["dump_file"])  # written as strict JSON: NaN became null
    stats = [layer["stats"] for layer in dump["layers"]]
    expected = D_INNER * sum(positions_reached(length) for length in row_lengths)
    assert len(row_lengths) == 2 and expected == 2 * D_INNER * 8
    assert [s["nonfinite"] for s in stats] == [0, expected]
    assert section["layers"][BROKEN_LAYER]["nonfinite"] == expected
    # Every real position is counted once: as finite (count) or not (nonfinite).
    assert stats[BROKEN_LAYER]["count"] + expected == stats[0]["count"]
    assert all(math.isfinite(s[key]) for s in stats for key in ("max_abs_err", "mean_abs_err", "sqnr_db"))
    # The snapshot is channel 0 of row 0, positions 0..9: the NaN reaches positions 1..4.
    assert [value is None for value in dump["layers"][BROKEN_LAYER]["before_quant"]] == [i in range(1, 5) for i in range(10)]


def test_the_report_shows_the_count(broken_run):
    work, results, _ = broken_run
    [report] = (work / "out").rglob("floatsim_*/report.md")
    expected = results["config"]["floatsim"]["layers"][BROKEN_LAYER]["nonfinite"]
    header = next(line for line in report.read_text().splitlines() if line.startswith("| layer |") and "non-finite" in line)
    rows = {line.split("|")[1].strip(): line for line in report.read_text().splitlines() if re.match(r"\| \d+ \|", line)}
    column = [cell.strip() for cell in header.split("|")].index("non-finite")
    assert [cell.strip() for cell in rows[str(BROKEN_LAYER)].split("|")][column] == str(expected)
    assert [cell.strip() for cell in rows["0"].split("|")][column] == "0"
    assert json.loads((report.parent / "report.json").read_text())["run"]["layers"][BROKEN_LAYER]["nonfinite"] == expected


def test_check_flags_the_broken_block(broken_run):
    work, results, _ = broken_run
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(["check", str(work / "dumps")])
    expected = results["config"]["floatsim"]["layers"][BROKEN_LAYER]["nonfinite"]
    assert code == 1
    failed = [line for line in out.getvalue().splitlines() if line.startswith("✗")]
    assert f"✗ floatsim_samescale.json: finite activations (stats of the run): layer {BROKEN_LAYER}: {expected} non-finite" \
        in "\n".join(failed)
    assert any(line.startswith(f"✗ floatsim_samescale.json: no nulls: layer {BROKEN_LAYER}:") for line in failed)
    assert all(f"layer {BROKEN_LAYER}" in line for line in failed)
