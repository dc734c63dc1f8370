#!/usr/bin/env python
"""Wall time of whole lm_eval runs and of the commands that evaluate many runs in one process.

Configurations (each a fresh process, timed from start to exit, as a user runs it):
- `lm_eval`: one `lm_eval --model mamba_floatsim` run in mode int8, the reference of the ratios;
- `sweep`: `lm-eval-floatsim sweep --modes fp,int8,same,better --divisors 16,256,2025` (6 evaluations);
- `sensitivity`: `lm-eval-floatsim sensitivity --mode better --divisor 2025` (fp, every block, each
  block alone: 2 + n_layer evaluations);
- `modes` (GPU): `lm_eval --model mamba_ssm` and `lm_eval --model mamba_floatsim` in fp, same and
  better (int8's is the reference run).
After an untimed warm-up run (it calibrates into the scales cache and fills Triton's cache, as a
user's earlier runs would have), every round runs each configuration once, in a rotated order,
and the table gives per configuration the median and range over the rounds of the wall time and
of its ratio to the reference run of the same round. The sweep's int8 run is also compared with the
reference run: their results files must be identical but for the clock.

Presets (--preset):
- `demo` (the CPU box): the bundled demo model and task (2000 requests), float32, batch 32, the
  calibration of `make demo`;
- `gpu`: a random mamba-130m-shaped checkpoint in mamba_ssm's layout (fp16; the demo's word-level
  tokenizer) and a LAMBADA-style task of --docs distinct documents (the demo documents, each with
  another one's first sentence in front; 5153 as lambada_openai), batch 64, cuda:0.

  python benchmarks/lm_eval_runs.py bench --preset demo --out DIR [--rounds 3] [--configs lm_eval,sweep,sensitivity]
  python benchmarks/lm_eval_runs.py profile --preset gpu --out DIR [--configs sweep]
      after the warm-up, each configuration once under cProfile: DIR/<name>.prof and the functions
      that took the most time (cumulative) in DIR/<name>.txt
  python benchmarks/lm_eval_runs.py lm_eval -- LM_EVAL_ARGS...
      one lm_eval run (what `bench` starts), with `mamba_floatsim` registered whether or not the
      package's .pth hook is installed
Every finished run is appended to DIR/lm_eval_runs.jsonl at once: a run cut short keeps the rounds done.
Rounds longer than one call of the GPU machine allows: `bench --resume` continues the rounds that
the work folder (--work) records, without a warm-up: it finishes a round that --deadline-s cut, then
starts new ones until --rounds rounds are done, and reports them all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "examples" / "demo"
MODES = ("fp", "int8", "same", "better")
REFERENCE = "lm_eval"
REFERENCE_MODE = "int8"  # the reference run's mode
SWEEP = ["--modes", "fp,int8,same,better", "--divisors", "16,256,2025"]
SENSITIVITY = ["--mode", "better", "--divisor", "2025"]
# Fields of a results file that lm-eval sets from the clock.
CLOCK_FIELDS = ("date", "start_time", "end_time", "total_evaluation_time_seconds")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench")
    profile = sub.add_parser("profile")
    for parser_ in (bench, profile):
        _add_bench_arguments(parser_)
    run = sub.add_parser("lm_eval")
    run.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    return parser.parse_args(argv)


def _add_bench_arguments(bench) -> None:
    bench.add_argument("--preset", choices=("demo", "gpu"), required=True)
    bench.add_argument("--out", default=".")
    bench.add_argument("--work", default="/tmp/lm_eval_runs")
    bench.add_argument("--rounds", type=int, default=3, help="rounds in all (with --resume: the recorded ones included)")
    bench.add_argument("--resume", action="store_true", help="continue the rounds recorded in --work (no warm-up)")
    bench.add_argument("--configs", default=None, help="comma-separated: lm_eval, sweep, sensitivity, modes "
                       "(default: lm_eval,sweep,sensitivity; modes needs the gpu preset)")
    bench.add_argument("--docs", type=int, default=5153, help="documents of the gpu preset's task")
    bench.add_argument("--deadline-s", type=float, default=None,
                       help="start no run that would end after this many seconds (its last wall time as the guess)")


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


def preset_arguments(args, work: Path) -> tuple[str, list[str], str]:
    """(the floatsim model arguments without mode, lm_eval's other arguments, the task's name)."""
    if args.preset == "demo":
        model_args = f"pretrained={DEMO / 'model'},calib_data={DEMO / 'calib.txt'},calib_samples=64,calib_seqlen=128"
        return model_args, ["--include_path", str(DEMO / "task"), "--tasks", "demo_lambada", "--batch_size", "32",
                            "--device", "cpu"], "demo_lambada"
    checkpoint = write_checkpoint(work / "checkpoint")
    task = write_task(work / "task", args.docs)
    model_args = (f"pretrained={checkpoint},tokenizer={checkpoint},dtype=float16,"
                  f"calib_data={DEMO / 'calib.txt'},calib_samples=16,calib_seqlen=256")
    return model_args, ["--include_path", str(task), "--tasks", "gpu_lambada", "--batch_size", "64",
                        "--device", "cuda:0"], "gpu_lambada"


# ------------------------------------------------------------------ configurations


def configurations(args, work: Path) -> tuple[dict, str]:
    """{name: (evaluations, command)} of the chosen configurations, and the task's name."""
    floatsim_args, common, task = preset_arguments(args, work)
    dumps = f"dump_dir={work / 'dumps'}"  # one folder: the reference's and the sweep's int8 dumps are alike

    def lm_eval(name, model, model_args):
        return [sys.executable, __file__, "lm_eval", "--", "--model", model, "--model_args", model_args,
                "--output_path", str(work / name.replace(" ", "_")), *common]

    def floatsim_command(name, command, options):
        return [sys.executable, "-m", "lm_eval_floatsim.cli", command, *options, "--", "--model_args",
                f"{floatsim_args},{dumps}", "--output_path", str(work / name), *common]

    chosen = (args.configs or "lm_eval,sweep,sensitivity").split(",")
    if "modes" in chosen and args.preset != "gpu":
        raise SystemExit("--configs modes needs --preset gpu (lm-eval's mamba_ssm model needs CUDA)")
    checkpoint = Path(floatsim_args.split(",")[0].removeprefix("pretrained="))
    n_layer = json.loads((checkpoint / "config.json").read_text())["n_layer"]  # both presets: mamba_ssm's layout
    found = {REFERENCE: (1, lm_eval(REFERENCE, "mamba_floatsim", f"{floatsim_args},{dumps},mode={REFERENCE_MODE}"))}
    if "sweep" in chosen:
        found["sweep"] = (6, floatsim_command("sweep", "sweep", SWEEP))
    if "sensitivity" in chosen:
        found["sensitivity"] = (2 + n_layer, floatsim_command("sensitivity", "sensitivity",
                                                              [*SENSITIVITY, "--out", str(work / "sensitivity_report")]))
    if "modes" in chosen:
        base = floatsim_args.split(",calib_data")[0]
        found["mamba_ssm"] = (1, lm_eval("mamba_ssm", "mamba_ssm", base))
        for mode in [mode for mode in MODES if mode != REFERENCE_MODE]:  # that mode's run is the reference
            found[f"mamba_floatsim {mode}"] = (1, lm_eval(f"mamba_floatsim {mode}", "mamba_floatsim",
                                                           f"{floatsim_args},mode={mode},dump_dir={work / ('dumps_' + mode)}"))
    return found, task


def run_once(name: str, command: list[str], work: Path) -> dict:
    shutil.rmtree(work / name.replace(" ", "_"), ignore_errors=True)  # each run's results alone in its folder
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    load = os.getloadavg()[0]  # other processes' load: timings on a shared machine swing with it
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=work)
    row = {"name": name, "wall_s": time.perf_counter() - start, "returncode": done.returncode, "load_before": load}
    if done.returncode != 0:
        row["error_tail"] = (done.stdout + done.stderr)[-3000:]
    return row


def rounds_of_runs(args, found: dict, work: Path, log: Path) -> list[dict]:
    start = time.perf_counter()
    record = work / "rounds.jsonl"  # every round of this work folder, for --resume
    rows = [json.loads(line) for line in record.read_text().splitlines()] if args.resume and record.exists() else []
    rows = [row for row in rows if row["name"] in found]
    last_wall = {row["name"]: row["wall_s"] for row in rows}
    if not rows:
        record.unlink(missing_ok=True)
        print(f"warm-up: {REFERENCE} (not counted)", flush=True)
        warm = run_once(REFERENCE, found[REFERENCE][1], work)
        if warm["returncode"] != 0:
            raise SystemExit(f"the warm-up run failed:\n{warm['error_tail']}")
        last_wall[REFERENCE] = warm["wall_s"]
    for index, name in runs_to_do(list(found), rows, args.rounds):
        guess = time.perf_counter() - start + last_wall.get(name, 0.0)
        if args.deadline_s is not None and guess > args.deadline_s:
            print(f"stopping before round {index} {name}: it would end after --deadline-s", flush=True)
            return rows
        row = {"round": index, **run_once(name, found[name][1], work)}
        last_wall[name] = row["wall_s"]
        rows.append(row)
        for path in (log, record):
            with path.open("a") as out:
                out.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "error_tail"}), flush=True)
        if row["returncode"] != 0:
            print(row["error_tail"], flush=True)
    return rows


def runs_to_do(names: list[str], done: list[dict], rounds: int) -> list[tuple[int, str]]:
    """(round, configuration) of every run that `rounds` rounds still lack, in order: round i runs
    the configurations rotated by i (no configuration always first), skipping those it has run."""
    ran = {(row["round"], row["name"]) for row in done}
    return [(index, name) for index in range(rounds)
            for name in names[index % len(names):] + names[: index % len(names)] if (index, name) not in ran]


# ------------------------------------------------------------------ the report


def table(found: dict, rows: list[dict]) -> str:
    reference = {row["round"]: row["wall_s"] for row in rows if row["name"] == REFERENCE and row["returncode"] == 0}
    lines = ["| configuration | evaluations | wall s, median (range) | / one lm_eval run of the same round, median (range) | rounds |",
             "|---|---:|---|---|---:|"]
    for name, (evaluations, _) in found.items():
        ok = [row for row in rows if row["name"] == name and row["returncode"] == 0]
        walls = [row["wall_s"] for row in ok]
        ratios = [row["wall_s"] / reference[row["round"]] for row in ok if row["round"] in reference]
        failed = sum(row["name"] == name and row["returncode"] != 0 for row in rows)
        label = f"{name} (mamba_floatsim {REFERENCE_MODE}, the reference)" if name == REFERENCE else name
        lines.append(f"| {label} | {evaluations} | {_spread(walls, '{:.1f}')} | {_spread(ratios, '{:.2f}x')} | "
                     f"{len(ok)}{f' ({failed} failed)' if failed else ''} |")
    return "\n".join(lines)


def _spread(values: list[float], form: str) -> str:
    if not values:
        return "—"
    return f"{form.format(statistics.median(values))} ({form.format(min(values))}–{form.format(max(values))})"


def sweep_matches_reference(work: Path) -> str:
    """Whether the sweep's int8 run saved what the reference `lm_eval` run saved (but for the clock)."""
    def int8_results(folder: Path):
        for path in sorted(folder.rglob("results_*.json")):
            results = json.loads(path.read_text())
            if results["config"]["model_args"].get("mode") == REFERENCE_MODE:
                return {key: value for key, value in results.items() if key not in CLOCK_FIELDS}
        return None

    reference, swept = int8_results(work / REFERENCE), int8_results(work / "sweep")
    if reference is None or swept is None:
        return "not compared (a run is missing)"
    if reference == swept:
        task = next(iter(reference["results"].values()))
        metrics = {key: value for key, value in task.items() if "," in key}
        return f"identical (metrics and standard errors: {json.dumps(metrics)})"
    differing = sorted(key for key in set(reference) | set(swept) if reference.get(key) != swept.get(key))
    return f"DIFFERENT in {differing}"


def profile_runs(found: dict, work: Path, out: Path) -> int:
    """After the warm-up, each configuration once under cProfile; the 60 costliest functions printed."""
    import pstats

    warm = run_once(REFERENCE, found[REFERENCE][1], work)
    print(f"warm-up {REFERENCE}: {warm['wall_s']:.1f} s", flush=True)
    failed = 0
    for name, (_, command) in found.items():
        stats = out / f"{name.replace(' ', '_')}.prof"
        row = run_once(name, [command[0], "-m", "cProfile", "-o", str(stats), *command[1:]], work)
        print(json.dumps({k: v for k, v in row.items() if k != "error_tail"}), flush=True)
        failed += row["returncode"] != 0
        if row["returncode"] != 0:
            print(row["error_tail"], flush=True)
            continue
        with open(out / f"{name.replace(' ', '_')}.txt", "w") as report:
            pstats.Stats(str(stats), stream=report).sort_stats("cumulative").print_stats(60)
        print((out / f"{name.replace(' ', '_')}.txt").read_text()[:6000], flush=True)
    return 1 if failed else 0


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
    work, out = Path(args.work), Path(args.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    found, task = configurations(args, work)
    if args.command == "profile":
        return profile_runs(found, work, out)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    rows = rounds_of_runs(args, found, work, out / "lm_eval_runs.jsonl")
    rounds = len({row["round"] for row in rows})
    text = f"\n{args.preset} preset, task {task}, {rounds} rounds, started {started}, {os.cpu_count()} CPUs\n{table(found, rows)}\n"
    if "sweep" in found:  # the work folder may hold an earlier bench's sweep
        text += f"\nsweep's int8 run vs the lm_eval run: {sweep_matches_reference(work)}\n"
    print(text)
    (out / "lm_eval_runs.md").write_text(text)
    return 0 if all(row["returncode"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
