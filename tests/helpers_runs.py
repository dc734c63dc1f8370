"""Synthetic runs, as lm-eval 0.4.13 and the floatsim model lay them out, for the tests of what reads them.

`write_run` writes `<output_path>/<model>/results_<date_id>.json` (keys as lm-eval's
EvaluationTracker writes them) and the dump in `floatsim_<date_id>/` beside it, recorded under a
path that no longer exists; `make_scales`, `make_dump` and `make_results` build the parts. The dump
values are quantized here with numpy float32 (the user's rule, written out independently), so the
real checks pass on them; `METRICS` and `layer_stats` give the numbers from which tests compute
their expected values.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

MODEL = "tiny/mamba-demo"
MODEL_FOLDER = "tiny__mamba-demo"  # lm-eval's sanitize_model_name
N_LAYER = 4
DUMP_N = 10
DUMP_NAMES = {"fp": "fp_reference.json", "int8": "int8_baseline.json", "same": "floatsim_samescale.json"}
HIGHER_IS_BETTER = {"acc": True, "perplexity": False}
TASKS = ("lambada_openai", "lambada_standard")  # lm-eval's `lambada` tag: two tasks, no group entry

# Task metrics per run: {task: {metric: (value, stderr)}}.
METRICS = {
    "fp": {"lambada_openai": {"acc": (0.62, 0.0068), "perplexity": (5.10, 0.12)},
           "lambada_standard": {"acc": (0.55, 0.0069), "perplexity": (7.90, 0.21)}},
    "int8": {"lambada_openai": {"acc": (0.60, 0.0068), "perplexity": (5.40, 0.13)},
             "lambada_standard": {"acc": (0.53, 0.0070), "perplexity": (8.30, 0.22)}},
    "same": {"lambada_openai": {"acc": (0.59, 0.0069), "perplexity": (5.45, 0.13)},
             "lambada_standard": {"acc": (0.53, 0.0070), "perplexity": (8.35, 0.22)}},
    "better/2025": {"lambada_openai": {"acc": (0.615, 0.0068), "perplexity": (5.15, 0.12)},
                    "lambada_standard": {"acc": (0.545, 0.0069), "perplexity": (7.95, 0.21)}},
}


def f32(value) -> float:
    return float(np.float32(value))


def make_scales(seed: int = 0, n_layer: int = N_LAYER, model: str = MODEL) -> dict:
    rng = np.random.default_rng(seed)
    layers = [{"layer_idx": i, "input_scale": f32(0.02 + 0.01 * rng.random()), "output_scale": f32(0.01 + 0.004 * i + 0.001 * rng.random()),
               "weight_scale": f32(0.003), "bias_scale": f32(0.001)} for i in range(n_layer)]
    content = {"format": "lm_eval_floatsim.scales/1", "model": model,
               "settings": {"calib_data": "calib.txt", "calib_samples": 8, "calib_seqlen": 64, "percentile": 0.9995}, "layers": layers}
    content["sha256"] = hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()
    return content


def round_half_away(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.floor(np.abs(values) + 0.5)


def layer_stats(mode: str, divisor, layer_idx: int, scale: float, sqnr_offset: float = 0.0) -> dict:
    """Made-up statistics with the right ordering: finer scale, smaller error; fp has none."""
    if mode == "fp":
        return {"count": 4000, "max_abs_err": 0.0, "mean_abs_err": 0.0, "sqnr_db": None, "clamped_fraction": 0.0, "nonfinite": 0}
    step = scale / (divisor if mode == "better" else 1.0)
    sqnr = 28.0 + 1.5 * layer_idx + (0.3 if mode == "same" else 0.0) + sqnr_offset
    if mode == "better":  # the finer grid gains 20 log10(divisor) dB, some layers less than others
        sqnr += 20 * math.log10(divisor) - (4.0, 0.0, 7.0, 2.0)[layer_idx % 4]
    return {"count": 4000, "max_abs_err": step / 2, "mean_abs_err": step / 4, "sqnr_db": sqnr,
            "clamped_fraction": 0.0 if mode == "better" else 0.0005 * (layer_idx + 1), "nonfinite": 0}


def make_dump(mode: str, divisor, scales: dict, seed: int = 1, sqnr_offset: float = 0.0) -> dict:
    """A dump in the user's format: the same pre-quantization values y in every mode, quantized here."""
    rng = np.random.default_rng(seed)
    clamp = "range" if mode in ("int8", "same") else ("range" if mode == "better" else None)
    code_range = {"fp": None, "int8": [-128.0, 127.0], "same": [-128.0, 127.0]}.get(mode)
    if mode == "better":
        code_range = [-128.0 * divisor, 127.0 * divisor]
    config = {"float_sim_asic": mode in ("same", "better"), "float_sim_better_scale": mode == "better",
              "format": "lm_eval_floatsim.dump/1", "mode": mode, "divisor": float(divisor) if mode == "better" else None,
              "rounding": None if mode == "fp" else "half_away", "clamp": clamp, "code_range": code_range,
              "model": scales["model"], "scales_sha256": scales["sha256"], "calibration": scales["settings"],
              "n_layer": len(scales["layers"]), "dump_n": DUMP_N, "package_version": "0.1.0"}
    layers = []
    for entry in scales["layers"]:
        s = entry["output_scale"]
        y = rng.uniform(-90 * s, 90 * s, DUMP_N).astype(np.float32)  # inside the int8 range: no clamping
        effective = None if mode == "fp" else (s / divisor if mode == "better" else s)
        if mode == "fp":
            before, after, codes = [float(v) for v in y], [float(v) for v in y], None
        else:
            code_values = round_half_away((y / np.float32(effective)).astype(np.float64))
            after = [float(np.float32(c) * np.float32(effective)) for c in code_values]
            before = [float(np.float32(c) * np.float32(s)) for c in code_values] if mode == "int8" else [float(v) for v in y]
            codes = [int(c) for c in code_values]
        layers.append({"layer_idx": entry["layer_idx"], "effective_scale": effective, "output_scale": s,
                       "before_quant": before, "after_quant": after, "codes": codes,
                       "input_scale": entry["input_scale"], "weight_scale": entry["weight_scale"], "bias_scale": entry["bias_scale"],
                       "stats": layer_stats(mode, divisor, entry["layer_idx"], s, sqnr_offset)})
    return {"config": config, "layers": layers}


def dump_name(mode: str, divisor) -> str:
    if mode == "better":
        return f"floatsim_betterscale_{int(divisor) if float(divisor).is_integer() else divisor}.json"
    return DUMP_NAMES[mode]


def make_results(mode: str, divisor, metrics: dict, scales: dict, dump: dict, dump_file: str, date: float,
                 groups: dict | None = None) -> dict:
    """A results dict shaped like lm-eval 0.4.13's results_<date>.json, with config.floatsim."""
    tasks = {}
    for task, values in metrics.items():
        entry = {"name": task, "alias": task, "sample_len": 500}
        for metric, (value, stderr) in values.items():
            entry[f"{metric},none"] = value
            entry[f"{metric}_stderr,none"] = stderr
        tasks[task] = entry
    group_entries = {}
    for group, subtasks in (groups or {}).items():
        accs = [metrics[t]["acc"][0] for t in subtasks]
        group_entries[group] = {"alias": group, "name": group, "sample_len": 1000, "acc,none": sum(accs) / len(accs),
                                "acc_stderr,none": 0.005, "sample_count": {"acc,none": 1000}}
    all_tasks = list(group_entries) + list(tasks)
    results = {
        "results": {**group_entries, **tasks},
        "group_subtasks": {group: list(subtasks) for group, subtasks in (groups or {}).items()},
        "configs": {task: {"task": task, "output_type": "loglikelihood"} for task in tasks},
        "versions": {task: "N/A" if task in group_entries else 1.0 for task in all_tasks},
        "n-shot": {task: 0 for task in all_tasks},
        "higher_is_better": {task: dict(HIGHER_IS_BETTER) for task in all_tasks},
        "n-samples": {task: {"original": 500, "effective": 500} for task in tasks},
        "config": {
            "model": "mamba_floatsim",
            "model_args": {"pretrained": MODEL, "mode": mode, **({"divisor": divisor} if divisor else {})},
            "batch_size": 1, "batch_sizes": [], "device": "cpu", "use_cache": None, "limit": None,
            "bootstrap_iters": 100000, "gen_kwargs": {}, "random_seed": 0, "numpy_seed": 1234, "torch_seed": 1234,
            "fewshot_seed": 1234,
            "floatsim": {"mode": mode, "divisor": float(divisor) if divisor else 2025.0, "rounding": "half_away",
                         "clamp": "range", "model": scales["model"], "scales_file": "/gone/scales.json",
                         "scales_sha256": scales["sha256"], "dump_file": dump_file,
                         "layers": [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]]},
        },
        "git_hash": None, "date": date, "task_hashes": {}, "model_source": "mamba_floatsim",
        "model_name": scales["model"], "model_name_sanitized": MODEL_FOLDER, "system_instruction": None,
        "system_instruction_sha": None, "fewshot_as_multiturn": False, "chat_template": None, "chat_template_sha": None,
        "total_evaluation_time_seconds": "12.5",
    }
    if groups:
        results["groups"] = group_entries
    return results


def write_run(root: Path, label: str, metrics: dict | None = None, scales: dict | None = None, date: float = 1.8e9,
              groups: dict | None = None, sqnr_offset: float = 0.0, model_folder: str = MODEL_FOLDER) -> Path:
    """Write one run as `lm_eval --output_path root` plus the floatsim model would; return the results file."""
    mode, _, divisor_text = label.partition("/")
    divisor = float(divisor_text) if divisor_text else None
    scales = scales or make_scales()
    folder = Path(root) / model_folder
    date_id = f"2027-01-15T10-{int(date) % 60:02d}-{int(date * 1000) % 60:02d}.{int(date * 1e6) % 1000000:06d}"
    run_folder = folder / f"floatsim_{date_id}"
    run_folder.mkdir(parents=True, exist_ok=True)
    dump = make_dump(mode, divisor, scales, sqnr_offset=sqnr_offset)
    (run_folder / dump_name(mode, divisor)).write_text(json.dumps(dump, indent=1))
    (run_folder / "scales.json").write_text(json.dumps(scales))
    metrics = metrics or METRICS[label if label in METRICS else "better/2025"]  # other divisors: the same metrics
    results = make_results(mode, divisor, metrics, scales, dump,
                           f"/gone/yzCheckFloatSim/{dump_name(mode, divisor)}", date, groups)
    path = folder / f"results_{date_id}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def write_standard_runs(root: Path, labels=("fp", "int8", "same", "better/2025"), **kwargs) -> list[Path]:
    return [write_run(root, label, date=1.8e9 + 7 * i, **kwargs) for i, label in enumerate(labels)]
