"""`lm-eval-floatsim sweep --modes ... --divisors ... -- <lm_eval args>`: every mode in one process.

The model is loaded and calibrated once; each mode re-quantizes it with the same scales
(FloatSimLM.switch_mode) and is evaluated with lm_eval.simple_evaluate, its results saved exactly
as `lm_eval --output_path` saves them (EvaluationTracker), so that `compare` finds them. The task
index (lm-eval's TaskManager) is built once too. At the end the runs are compared. With
`--use_cache PATH` each run caches its responses in a database of its own (`PATH_<label>`): a
response depends on the mode, and lm-eval keys it by the request alone.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path
from typing import NamedTuple, Optional

from . import compare
from .errors import ArgumentError, InputError
from .modes import format_divisor, format_layers, get_mode, is_quantized, parse_mode_list
from .runs import load_run, run_label

MODEL_NAME = "mamba_floatsim"
# Set by sweep itself for each run; in --model_args they would be silently overridden.
SWEPT_ARGUMENTS = {"mode": "sweep sets it from --modes/--divisors", "divisor": "sweep sets it from --modes/--divisors"}


def add_arguments(parser) -> None:
    parser.add_argument("--modes", default="fp,int8,same,better", help="comma-separated modes, evaluated in this order "
                        "(default: fp,int8,same,better)")
    parser.add_argument("--divisors", default=None, help="comma-separated divisors for mode better (default: 2025)")
    parser.add_argument("--baseline", default="int8", help="compare's baseline (default: int8)")
    parser.add_argument("--max-drop", type=float, default=None, metavar="X", help="compare's regression gate (see compare)")
    parser.add_argument("--out", default=None, metavar="DIR", help="write compare.md, compare.json and plots into DIR")
    parser.add_argument("lm_eval_args", nargs=argparse.REMAINDER,
                        help="after --: lm_eval's own arguments (--model_args, --tasks, --output_path, ...)")


def run(args) -> int:
    plan = sweep_plan(args.modes, args.divisors)
    compare.validate_options(args.baseline, args.max_drop)
    config = lm_eval_config(args.lm_eval_args)
    check_baseline_swept(args.baseline, args.max_drop, plan)
    results_files = evaluate_all(config, plan)
    if not results_files:  # a data-parallel rank other than 0: rank 0 saves and compares
        return 0
    comparison = compare.compare_runs([load_run(path) for path in results_files], args.baseline, args.max_drop)
    text = compare.render_markdown(comparison)
    print(text, end="")
    if args.out:
        for path in compare.write_outputs(comparison, text, args.out):
            print(f"wrote {path}", file=sys.stderr)
    return comparison["exit_code"]


# --- options -------------------------------------------------------------------------------------


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_divisor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ArgumentError("--divisors", text, "comma-separated positive numbers, e.g. 16,256,2025")
    return value


class PlannedRun(NamedTuple):
    """One evaluation of a sweep or a sensitivity analysis: the mode, its divisor, and the blocks it
    applies to (None: those of --model_args, every block by default)."""

    mode: str
    divisor: Optional[float] = None
    layers: Optional[tuple[int, ...]] = None


def sweep_plan(modes: str, divisors: str | None) -> list[PlannedRun]:
    """The (mode, divisor) runs in order: each mode as listed, a mode with a finer scale once per divisor."""
    names = parse_mode_list(modes, "--modes")
    takes_divisor = {name: get_mode(name).takes_divisor for name in names}
    if divisors is not None and not any(takes_divisor.values()):
        raise ArgumentError("--divisors", divisors, "no value unless --modes includes a mode with a finer scale (better)")
    values = [parse_divisor(text) for text in _split(divisors if divisors is not None else "2025")]
    if not values or len(set(values)) != len(values):
        raise ArgumentError("--divisors", divisors, "comma-separated distinct positive numbers")
    return [PlannedRun(name, divisor) for name in names for divisor in (values if takes_divisor[name] else [None])]


def check_baseline_swept(baseline: str, max_drop, plan) -> None:
    """A gate against a mode the sweep does not evaluate would fail only after hours of work."""
    labels = [run_label(run.mode, run.divisor) for run in plan]
    modes = [run.mode for run in plan]
    if max_drop is not None and baseline not in labels and modes.count(baseline) != 1:
        raise ArgumentError("--baseline", baseline, "one of the swept runs: " + ", ".join(labels))


def lm_eval_parser() -> argparse.ArgumentParser:
    """lm-eval's own `run` parser, so that every lm_eval option is spelled as users know it."""
    from lm_eval._cli.run import Run

    parser = argparse.ArgumentParser(prog="lm-eval-floatsim sweep ... --")
    Run.create(parser.add_subparsers(dest="command"))
    return parser


def lm_eval_config(argv: list[str], swept: dict = SWEPT_ARGUMENTS):
    """lm-eval's EvaluatorConfig from the arguments after `--`, checked for what sweep needs;
    `swept`: the model arguments the command sets itself, and who sets them."""
    from lm_eval.config.evaluate_config import EvaluatorConfig

    argv = argv[1:] if argv[:1] == ["--"] else argv
    namespace = lm_eval_parser().parse_args(["run", *argv])
    if namespace.model not in (None, MODEL_NAME):
        raise ArgumentError("--model", namespace.model, f"{MODEL_NAME} (or nothing)")
    try:
        config = EvaluatorConfig.from_cli(namespace)
    except (ValueError, TypeError, OSError) as error:
        raise InputError(f"lm_eval arguments: {error}") from None
    config.model = MODEL_NAME
    config.hf_hub_log_args["output_path"] = config.output_path
    if os.environ.get("HF_TOKEN"):  # as lm-eval's own `run` does, for --hf_hub_log_args push_*
        config.hf_hub_log_args["token"] = os.environ["HF_TOKEN"]
    for name, setter in swept.items():
        if name in config.model_args:
            raise ArgumentError(f"--model_args {name}", config.model_args[name], f"nothing: {setter}")
    if not config.output_path or Path(config.output_path).suffix == ".json":
        raise ArgumentError("--output_path", config.output_path, "a folder: sweep saves every run's results there for compare")
    return config


# --- evaluating ----------------------------------------------------------------------------------


def build_lm(model_args: dict, config):
    """The one FloatSimLM of the sweep, built as lm_eval builds a registered model from its arguments."""
    from .lm_model import FloatSimLM

    extra = {"batch_size": config.batch_size, "max_batch_size": config.max_batch_size, "device": config.device}
    return FloatSimLM.create_from_arg_obj(model_args, extra)


def evaluate_all(config, plan) -> list[Path]:
    """Load once, then per (mode, divisor): switch, evaluate, save. Returns the results files in order."""
    first_quantized = next((run for run in plan if is_quantized(run.mode)), plan[0])
    lm = build_lm(run_model_args(config.model_args, first_quantized.mode, first_quantized.divisor), config)
    return [saved for _, saved in evaluate_runs(lm, config, plan)]


def evaluate_runs(lm, config, plan: list[PlannedRun], progress: bool = False):
    """Per planned run: switch the loaded model, evaluate, save as `lm_eval --output_path` saves.

    Yields (results, results file) in order; nothing on a data-parallel rank other than 0. The
    task index and the tasks' requests are built once (`lm_eval_patches.evaluating_repeatedly`).
    """
    from .lm_eval_patches import evaluating_repeatedly

    task_index = config.process_tasks(config.metadata)
    with evaluating_repeatedly(run_arguments=PlannedRun._fields):
        yield from _evaluate_each(lm, config, plan, task_index, progress)


def _evaluate_each(lm, config, plan, task_index, progress: bool):
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.utils import make_table
    from tqdm import tqdm

    from .lm_eval_patches import task_manager_with_metadata
    from .publishing import results_file_of

    for run in tqdm(plan, desc="evaluations", unit="run", disable=not progress):
        label = run_label(run.mode, run.divisor, layers=run.layers)
        print(f"lm-eval-floatsim: evaluating {label}", file=sys.stderr)
        lm.switch_mode(run.mode, divisor=run.divisor, **({} if run.layers is None else {"layers": run.layers}))
        tracker = EvaluationTracker(**config.hf_hub_log_args)
        model_args = run_model_args(config.model_args, run.mode, run.divisor, run.layers)
        metadata = run_metadata(config, model_args)
        results = lm_eval.simple_evaluate(model=lm, model_args=model_args,
                                          task_manager=task_manager_with_metadata(task_index, metadata),
                                          evaluation_tracker=tracker, **simple_evaluate_options(config, label, metadata))
        if results is None:  # not rank 0 of a data-parallel run: rank 0 saves
            continue
        results["config"]["model"] = MODEL_NAME
        # simple_evaluate, given a model object, records its source as "CUSTOM"; `lm_eval` records the name.
        tracker.general_config_tracker.model_source = MODEL_NAME
        save_results(tracker, results, config.log_samples)
        print(make_table(results))
        saved = results_file_of(tracker)
        if saved is None:
            raise InputError(f"lm-eval did not save the results of {label} under {config.output_path}")
        yield results, saved


def run_model_args(model_args: dict, mode: str, divisor, layers=None) -> dict:
    """The model arguments of a separate `lm_eval` run of this mode (recorded in the results): the
    run's values spelled as in `--model_args` and parsed by lm-eval (`divisor=16` is the int 16)."""
    from lm_eval.utils import simple_parse_args_string

    chosen = [f"mode={mode}"] + ([] if divisor is None else [f"divisor={format_divisor(divisor)}"])
    chosen += [] if layers is None else [f"layers={format_layers(layers)}"]
    return {**model_args, **simple_parse_args_string(",".join(chosen))}


def run_metadata(config, model_args: dict) -> dict:
    """The task metadata of a separate `lm_eval` run with these model arguments.

    lm-eval's EvaluatorConfig merges `model_args | metadata` (--metadata); `config.metadata` holds
    that merge for the sweep's own model arguments, from which --metadata's entries are taken back:
    those that are not model arguments or that override one.
    """
    given = {key: value for key, value in config.metadata.items()
             if key not in config.model_args or value != config.model_args[key]}
    return model_args | given


def run_cache_path(use_cache, label: str):
    """The response database of one run: `use_cache` with the run's label (lm-eval adds `_rank<N>.db`)."""
    return None if use_cache is None else f"{use_cache}_{re.sub(r'[^A-Za-z0-9.+-]+', '_', label)}"


def simple_evaluate_options(config, label: str, metadata: dict) -> dict:
    """simple_evaluate's keyword arguments as lm-eval's own `run` command passes them, for one run."""
    cache = config.cache_requests or {}
    seeds = config.seed or [None] * 4
    return dict(
        tasks=config.tasks, num_fewshot=config.num_fewshot, batch_size=config.batch_size,
        max_batch_size=config.max_batch_size, device=config.device, use_cache=run_cache_path(config.use_cache, label),
        cache_requests=cache.get("cache_requests", False), rewrite_requests_cache=cache.get("rewrite_requests_cache", False),
        delete_requests_cache=cache.get("delete_requests_cache", False), limit=config.limit, samples=config.samples,
        check_integrity=config.check_integrity, write_out=config.write_out, log_samples=config.log_samples,
        system_instruction=config.system_instruction, apply_chat_template=config.apply_chat_template,
        fewshot_as_multiturn=config.fewshot_as_multiturn, gen_kwargs=config.gen_kwargs, verbosity=config.verbosity,
        predict_only=config.predict_only, random_seed=seeds[0], numpy_random_seed=seeds[1],
        torch_random_seed=seeds[2], fewshot_random_seed=seeds[3],
        confirm_run_unsafe_code=config.confirm_run_unsafe_code, metadata=metadata,
    )


def save_results(tracker, results: dict, log_samples: bool) -> None:
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    for task_name in results["configs"] if log_samples else ():
        tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
