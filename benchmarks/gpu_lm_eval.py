#!/usr/bin/env python
"""Wall time of whole lm_eval runs on a GPU: lm-eval's `mamba_ssm` model against `mamba_floatsim`
in each mode, on one random mamba-130m-shaped checkpoint and a local LAMBADA-style task.

Everything is local (the GPU machine reaches no hub): the checkpoint is written in mamba_ssm's
layout (config.json + pytorch_model.bin, fp16, A_log and D fp32) with the demo's word-level
tokenizer beside it, and the task is the demo task's documents, each in several variants (another
document's first sentence put in front), so that there are --docs distinct requests.

  python benchmarks/gpu_lm_eval.py bench --out DIR [--docs 2500] [--batch-size 64]
      runs lm_eval once per configuration, prints a table, writes DIR/gpu_lm_eval.json
  python benchmarks/gpu_lm_eval.py lm_eval -- LM_EVAL_ARGS...
      one lm_eval run (what `bench` starts), with `mamba_floatsim` registered whether or not the
      package's .pth hook is installed
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
MODES = ("fp", "int8", "same", "better")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench")
    bench.add_argument("--out", default=".")
    bench.add_argument("--work", default="/tmp/gpu_lm_eval")
    bench.add_argument("--docs", type=int, default=2500)
    bench.add_argument("--batch-size", default="64")
    bench.add_argument("--modes", default=",".join(MODES))
    bench.add_argument("--device", default="cuda:0")
    bench.add_argument("--dtype", default="float16")
    run = sub.add_parser("lm_eval")
    run.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


# ------------------------------------------------------------------ inputs


def write_checkpoint(folder: Path) -> Path:
    """A random mamba-130m-shaped model in mamba_ssm's checkpoint layout, with the demo tokenizer."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_bench import random_model

    folder.mkdir(parents=True, exist_ok=True)
    model = random_model(24, torch.device("cpu"))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    config = {"d_model": 768, "n_layer": 24, "vocab_size": 50277, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, folder / name)
    return folder


def write_task(folder: Path, n_docs: int) -> Path:
    """The demo task under the name gpu_lambada, with n_docs distinct documents."""
    folder.mkdir(parents=True, exist_ok=True)
    source = DEMO / "task"
    docs = [json.loads(line)["text"] for line in (source / "demo_lambada.jsonl").read_text().splitlines() if line.strip()]
    openings = [doc.split(". ")[0] + "." for doc in docs]
    texts, seen = [], set()
    for shift in range(1, len(docs)):
        for index, doc in enumerate(docs):
            text = f"{openings[(index + shift) % len(docs)]} {doc}"
            if text not in seen:
                seen.add(text)
                texts.append(text)
            if len(texts) == n_docs:
                break
        if len(texts) == n_docs:
            break
    (folder / "gpu_lambada.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    yaml = (source / "demo_lambada.yaml").read_text()
    yaml = yaml.replace("task: demo_lambada", "task: gpu_lambada").replace("demo_lambada.jsonl", "gpu_lambada.jsonl")
    (folder / "gpu_lambada.yaml").write_text(yaml)
    shutil.copy(source / "utils.py", folder / "utils.py")
    return folder


# ------------------------------------------------------------------ runs


def run_configurations(args):
    work = Path(args.work)
    checkpoint = write_checkpoint(work / "checkpoint")
    task = write_task(work / "task", args.docs)
    common = ["--tasks", "gpu_lambada", "--include_path", str(task), "--batch_size", args.batch_size, "--device", args.device]
    base_args = f"pretrained={checkpoint},tokenizer={checkpoint},dtype={args.dtype}"
    calibration = f"calib_data={DEMO / 'calib.txt'},calib_samples=16,calib_seqlen=256"
    configurations = [("mamba_ssm", "mamba_ssm", base_args)]
    for mode in args.modes.split(","):
        model_args = f"{base_args},mode={mode},{calibration},dump_dir={work / ('dumps_' + mode)}"
        configurations.append((f"mamba_floatsim {mode}", "mamba_floatsim", model_args))
    rows = []
    for name, model, model_args in configurations:
        output = work / ("results_" + name.replace(" ", "_"))
        command = [sys.executable, __file__, "lm_eval", "--"]
        command += ["--model", model, "--model_args", model_args, "--output_path", str(output)] + common
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
        wall = time.perf_counter() - start
        row = {"name": name, "wall_s": wall, "returncode": done.returncode, **results_summary(output)}
        if done.returncode != 0:
            row["error_tail"] = (done.stdout + done.stderr)[-3000:]
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "error_tail"}), flush=True)
        if done.returncode != 0:
            print(row["error_tail"], flush=True)
    return rows


def results_summary(output: Path) -> dict:
    """acc and the number of requests from lm-eval's results file, if the run wrote one."""
    files = sorted(output.rglob("results_*.json"))
    if not files:
        return {}
    results = json.loads(files[-1].read_text())
    task = results["results"].get("gpu_lambada", {})
    samples = results.get("n-samples", {}).get("gpu_lambada", {})
    return {"acc": task.get("acc,none"), "requests": samples.get("effective"), "eval_s": _float(results.get("total_evaluation_time_seconds"))}


def _float(value):
    return None if value is None else float(value)


def lm_eval_main(args) -> None:
    """One lm_eval run in this process, `mamba_floatsim` registered."""
    sys.path.insert(0, str(ROOT))
    import lm_eval.models  # noqa: F401  (the registry the model is added to)
    import lm_eval_floatsim_autoload
    from lm_eval.__main__ import cli_evaluate

    lm_eval_floatsim_autoload.register_model()
    forwarded = args.lm_eval_args[1:] if args.lm_eval_args[:1] == ["--"] else args.lm_eval_args
    sys.argv = ["lm_eval"] + forwarded
    cli_evaluate()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.command == "lm_eval":
        lm_eval_main(args)
        return 0
    rows = run_configurations(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_lm_eval.json").write_text(json.dumps(rows, indent=1))
    base = next((r["wall_s"] for r in rows if r["name"] == "mamba_ssm" and r["returncode"] == 0), None)
    print(f"\nlm_eval runs, {args.docs} documents, batch size {args.batch_size}")
    print("| model | wall s | evaluation s | requests | acc | mamba_ssm wall / this |\n|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{base / r['wall_s']:.2f}x" if base and r["returncode"] == 0 else ("failed" if r["returncode"] else "")
        eval_s = f"{r['eval_s']:.1f}" if r.get("eval_s") is not None else ""
        print(f"| {r['name']} | {r['wall_s']:.1f} | {eval_s} | {r.get('requests', '')} | {r.get('acc', '')} | {ratio} |")
    return 0 if all(r["returncode"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
