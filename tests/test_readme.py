"""The README's commands and code work as written.

Commands on the bundled demo model are run for real; those on the hub model (unreachable in CI)
are checked for what can go stale offline: the subcommand's options and the model arguments.
CI (`.ci/run`) runs the two quick-start commands, `make demo` and `make test`, in a fresh venv.
"""

import os
import re
import shlex
from pathlib import Path

import pytest
import torch

from lm_eval_floatsim import cli
from lm_eval_floatsim.arguments import known_arguments

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def code_blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def shell_commands():
    """Every command of the bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in code_blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def floatsim_commands():
    return [shlex.split(c)[1:] for c in shell_commands() if c.startswith("lm-eval-floatsim ")]


def test_the_readme_shows_the_two_quick_start_commands_that_ci_runs():
    quick_start = README.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    commands = [c.split("#")[0].strip() for c in code_blocks("bash")[0].splitlines() if c.strip()]
    assert "## Quick start" in README and commands == ["make demo", "make test"]
    assert "make demo" in quick_start
    ci = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert ci[-2:] == commands  # verbatim, last, after the fresh environment is made and entered
    assert 'python3 -m venv "$workdir/venv"' in ci and '. "$workdir/venv/bin/activate"' in ci


@pytest.mark.parametrize("argv", floatsim_commands(), ids=lambda argv: " ".join(argv[:2]))
def test_every_floatsim_command_parses(argv):
    parser = cli.build_parser()
    args = parser.parse_args(argv)
    assert args.command == argv[0]


def test_every_model_argument_in_the_readme_exists():
    used = set()
    for command in shell_commands():
        for match in re.finditer(r"--model_args\s+(\S+)", command):
            for pair in match.group(1).strip("\"'").split(","):
                if "=" in pair:
                    used.add(pair.split("=", 1)[0])
    table = README.split("## Model arguments", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(\w+)`", table, flags=re.M))
    assert used and used <= set(known_arguments())
    assert documented <= set(known_arguments())


def test_the_dump_command_on_the_demo_model_runs_and_its_checks_pass(tmp_path, monkeypatch):
    (dump,) = [argv for argv in floatsim_commands() if argv[0] == "dump" and "examples/demo/model" in argv]
    (tmp_path / "examples").symlink_to(REPO / "examples")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert cli.main(dump) == 0
    written = sorted(p.name for p in (tmp_path / "yzCheckFloatSim").iterdir())
    assert written == [
        "floatsim_betterscale_2025.json",
        "floatsim_samescale.json",
        "fp_reference.json",
        "int8_baseline.json",
        "scales.json",
    ]


def test_the_python_api_example_runs(tmp_path, monkeypatch):
    (example,) = [block for block in code_blocks("python") if "load_model" in block]
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    namespace = {}
    exec(compile(example.replace('"scales.json"', repr(str(tmp_path / "scales.json"))), "README", "exec"), namespace)
    logits, model = namespace["logits"], namespace["model"]
    assert logits.shape[:2] == namespace["input_ids"].shape
    assert logits.shape[-1] == model.config.padded_vocab_size
    assert torch.isfinite(logits).all()
    assert model.spec.mode == "better" and model.spec.divisor == 2025
    assert os.path.getsize(tmp_path / "scales.json") > 0
