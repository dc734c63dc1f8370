"""`lm-eval-floatsim dump` end to end on a tiny checkpoint folder: files, checks, byte-identical
repeats, and the user's document's own Python example and jq one-liners run against the output."""

import hashlib
import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
from contextlib import redirect_stdout
from io import StringIO
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lm_eval_floatsim.cli import main
from lm_eval_floatsim.mamba import MambaConfig, MambaLM

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "examples" / "demo"
CALIB = DEMO / "calib.txt"
FILES = ["int8_baseline.json", "floatsim_samescale.json", "floatsim_betterscale_2025.json", "scales.json"]

# The section "Python脚本示例" of yzCheckFloatSim_FORMAT.zh.md, verbatim.
DOCUMENT_EXAMPLE = '''
import json
import numpy as np

# 读取三个文件
baseline = json.load(open("yzCheckFloatSim/int8_baseline.json"))
floatsim_same = json.load(open("yzCheckFloatSim/floatsim_samescale.json"))
floatsim_better = json.load(open("yzCheckFloatSim/floatsim_betterscale_2025.json"))

# 检查第0层
layer0_baseline = baseline["layers"][0]
layer0_same = floatsim_same["layers"][0]
layer0_better = floatsim_better["layers"][0]

print("Layer 0 检查:")
print(f"  Baseline scale:     {layer0_baseline['effective_scale']}")
print(f"  FloatSim scale:     {layer0_same['effective_scale']}")
print(f"  Better scale:       {layer0_better['effective_scale']}")

# 对比 after_quant
baseline_vals = np.array(layer0_baseline["after_quant"])
floatsim_vals = np.array(layer0_same["after_quant"])

diff = np.abs(baseline_vals - floatsim_vals)
print(f"\\nBaseline vs FloatSim (same scale):")
print(f"  Max diff:  {diff.max():.6e}")
print(f"  Mean diff: {diff.mean():.6e}")

# 检查量化误差
before_vals = np.array(layer0_better["before_quant"])
after_vals = np.array(layer0_better["after_quant"])
quant_error = np.abs(before_vals - after_vals)

print(f"\\nBetter scale quantization error:")
print(f"  Max error:  {quant_error.max():.6e}")
print(f"  Mean error: {quant_error.mean():.6e}")
'''

# The section "快速查看" of the same document, verbatim.
DOCUMENT_JQ = """
jq '.layers[0] | {layer_idx, effective_scale, output_scale}' yzCheckFloatSim/int8_baseline.json
jq '.layers[0] | {layer_idx, effective_scale, output_scale}' yzCheckFloatSim/floatsim_samescale.json
jq '.layers[0] | {layer_idx, effective_scale, output_scale}' yzCheckFloatSim/floatsim_betterscale_2025.json
jq '.layers[0].after_quant[0:3]' yzCheckFloatSim/int8_baseline.json
jq '.layers[0].after_quant[0:3]' yzCheckFloatSim/floatsim_samescale.json
"""


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 24-block Mamba (d_model 16) in mamba_ssm's layout, with the demo's word-level tokenizer."""
    folder = tmp_path_factory.mktemp("tiny-mamba")
    tokenizer = json.loads((DEMO / "model" / "tokenizer.json").read_text())
    vocab = len(tokenizer["model"]["vocab"]) + len(tokenizer.get("added_tokens", []))
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=16, n_layer=24, vocab_size=vocab))
    weights = {key: value.contiguous() for key, value in model.state_dict().items() if key != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"d_model": 16, "n_layer": 24, "vocab_size": vocab, "ssm_cfg": {}}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO / "model" / name, folder / name)
    return folder


def dump_options(checkpoint, *extra):
    return ["dump", "--pretrained", str(checkpoint), "--calib-data", str(CALIB), "--calib-samples", "4",
            "--calib-seqlen", "32", "--device", "cpu", *extra]


def subprocess_env(cache):
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "XDG_CACHE_HOME": str(cache), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, checkpoint, one_thread):
    """`lm-eval-floatsim dump` with its defaults, in-process, in a fresh folder: (folder, exit code, stdout)."""
    folder = tmp_path_factory.mktemp("run1")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        patch.setenv("XDG_CACHE_HOME", str(folder / "cache"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        out = StringIO()
        with redirect_stdout(out):
            code = main(dump_options(checkpoint))
    return folder, code, out.getvalue()


def test_dump_writes_the_files_and_checks_them(first_run):
    folder, code, out = first_run
    assert code == 0, out
    assert sorted(path.name for path in (folder / "yzCheckFloatSim").iterdir()) == sorted(FILES)
    assert "All " in out and "checks passed." in out and "✗" not in out
    dump = json.loads((folder / "yzCheckFloatSim" / "floatsim_samescale.json").read_text())
    assert len(dump["layers"]) == 24
    first_sample = next(line for line in CALIB.read_text(encoding="utf-8").splitlines() if line.strip())
    assert dump["config"]["input"]["sha256"] == hashlib.sha256(first_sample.encode()).hexdigest()
    scales = json.loads((folder / "yzCheckFloatSim" / "scales.json").read_text())
    assert dump["config"]["scales_sha256"] == scales["sha256"]


def test_a_second_run_in_another_process_is_byte_identical(first_run, checkpoint, tmp_path):
    folder, _, _ = first_run
    # A fresh process and an empty scales cache: calibration runs again.
    finished = subprocess.run(
        [sys.executable, "-m", "lm_eval_floatsim.cli", *dump_options(checkpoint)],
        cwd=tmp_path, env=subprocess_env(tmp_path / "cache"), capture_output=True, text=True, timeout=300,
    )
    assert finished.returncode == 0, finished.stdout + finished.stderr
    for name in FILES:
        assert (tmp_path / "yzCheckFloatSim" / name).read_bytes() == (folder / "yzCheckFloatSim" / name).read_bytes(), name


def test_the_documents_python_example_runs_unchanged(first_run):
    folder, _, _ = first_run
    finished = subprocess.run([sys.executable, "-c", DOCUMENT_EXAMPLE], cwd=folder, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr
    baseline = json.loads((folder / "yzCheckFloatSim" / "int8_baseline.json").read_text())
    assert f"Baseline scale:     {baseline['layers'][0]['effective_scale']}" in finished.stdout
    assert "Max diff:  0.000000e+00" in finished.stdout  # same reproduces the baseline's values


def jq_engines():
    """Every jq at hand: the jq program, and the `jq` Python package (PyPI) that CI installs."""
    engines = {}
    if shutil.which("jq"):
        engines["program"] = lambda program, path: [json.loads(subprocess.run(
            ["jq", "-c", program, path.name], cwd=path.parent, capture_output=True, text=True, check=True).stdout)]
    if importlib.util.find_spec("jq"):
        import jq

        engines["python"] = lambda program, path: jq.compile(program).input_text(path.read_text()).all()
    return engines


def test_the_documents_jq_one_liners_work(first_run):
    folder, _, _ = first_run
    engines = jq_engines()
    if not engines:
        pytest.fail("jq is needed: install the jq program or the jq Python package (pip install jq)")
    commands = [shlex.split(line) for line in DOCUMENT_JQ.strip().splitlines()]
    for name, run_jq in engines.items():
        for _, program, relative in commands:
            path = folder / relative
            layer0 = json.loads(path.read_text())["layers"][0]
            expected = ({"layer_idx": 0, "effective_scale": layer0["effective_scale"], "output_scale": layer0["output_scale"]}
                        if "{" in program else layer0["after_quant"][:3])
            assert run_jq(program, path) == [expected], (name, program)


def test_fp_mode_a_given_text_and_given_scales(first_run, checkpoint, tmp_path, capsys):
    folder, _, _ = first_run
    scales = folder / "yzCheckFloatSim" / "scales.json"
    code = main([*dump_options(checkpoint, "--modes", "fp,int8", "--text", "Anna lives in Paris",
                                "--scales", str(scales), "--dump-dir", str(tmp_path / "out"), "--dump-n", "6")])
    out = capsys.readouterr().out
    assert code == 0, out
    fp = json.loads((tmp_path / "out" / "fp_reference.json").read_text())
    assert fp["config"]["input"]["text"] == "--text" and fp["config"]["dump_n"] == 6
    assert fp["config"]["scales_sha256"] == json.loads(scales.read_text())["sha256"]
    assert (tmp_path / "out" / "scales.json").read_bytes() == scales.read_bytes()
    assert not (tmp_path / "out" / "floatsim_samescale.json").exists()


@pytest.mark.parametrize(
    "extra, named",
    [(["--modes", "int9"], "modes="), (["--dump-n", "0"], "dump_n="), (["--divisor", "-1"], "divisor="),
     (["--text", " "], "text=")],
)
def test_bad_options_exit_2_with_one_line(checkpoint, tmp_path, capsys, extra, named):
    code = main([*dump_options(checkpoint, *extra), "--dump-dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    assert named in err and err.strip().count("\n") == 0
