"""Dump files: names, layout (against the packaged JSON Schema), values, repeatability, atomicity.

The good dumps of every mode come from helpers_dumps (a tiny 24-block model, absmax scales).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from importlib import resources
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_dumps import ALL_MODES, META, N_LAYER, tiny_input, tiny_model, write_good_dumps
from lm_eval_floatsim.dumps import build_dump, dump_filename, parse_filename, read_dump, write_dump
from lm_eval_floatsim.errors import InputError
from lm_eval_floatsim.quant import LayerScales, QuantSpec
from lm_eval_floatsim.recorder import Recorder

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_dumps(tmp_path_factory, one_thread):
    return write_good_dumps(tmp_path_factory.mktemp("dumps"))


def packaged_schema() -> dict:
    return json.loads(resources.files("lm_eval_floatsim").joinpath("dump.schema.json").read_text(encoding="utf-8"))


# --- names ------------------------------------------------------------------------------------


def test_file_names_are_the_documents():
    assert dump_filename("int8") == "int8_baseline.json"
    assert dump_filename("same") == "floatsim_samescale.json"
    assert dump_filename("better", 2025.0) == "floatsim_betterscale_2025.json"
    assert dump_filename("better", 2.5) == "floatsim_betterscale_2.5.json"
    assert dump_filename("fp") == "fp_reference.json"
    assert parse_filename("floatsim_betterscale_2.5.json") == ("better", 2.5)
    assert parse_filename("int8_baseline.json") == ("int8", None)
    assert parse_filename("scales.json") is None


# --- layout -----------------------------------------------------------------------------------


def test_every_mode_has_every_layer_in_order_and_matches_the_schema(good_dumps):
    validator = jsonschema.Draft202012Validator(packaged_schema())
    validator.check_schema(packaged_schema())
    assert sorted(path.name for path in good_dumps.values()) == sorted(
        ["int8_baseline.json", "floatsim_samescale.json", "floatsim_betterscale_2025.json", "fp_reference.json"]
    )
    for mode, path in good_dumps.items():
        dump = json.loads(path.read_text())
        validator.validate(dump)
        assert [layer["layer_idx"] for layer in dump["layers"]] == list(range(N_LAYER))
        config = dump["config"]
        assert config["float_sim_asic"] is (mode in ("same", "better"))
        assert config["float_sim_better_scale"] is (mode == "better")
        assert config["mode"] == mode and config["dump_n"] == 10 and config["n_layer"] == N_LAYER
        assert config["model"] == META["model"] and config["scales_sha256"] == META["scales_sha256"]
        for layer in dump["layers"]:
            assert len(layer["before_quant"]) == len(layer["after_quant"]) == 10
            assert layer["stats"]["count"] == 16 * 32  # every position of the one sequence, d_inner channels
        assert read_dump(path) == dump


def test_a_dump_read_again_is_validated_once_per_content(good_dumps, tmp_path, monkeypatch):
    """Reports read every earlier run's dump again: the schema is checked once per content, and a
    file whose content changed is checked again (here: refused)."""
    from lm_eval_floatsim import dumps

    checked = []
    monkeypatch.setattr(dumps, "schema_problem", lambda dump: checked.append(dump) or None)
    path = tmp_path / "int8_baseline.json"
    content = good_dumps["int8"].read_text()
    unread = content.replace('"dump_n": 10', '"dump_n": 10 ')  # the same dump in bytes no other test reads
    assert unread != content
    path.write_text(unread)
    first, again = read_dump(path), read_dump(path)
    assert first == again and len(checked) == 1
    monkeypatch.undo()
    path.write_text(content.replace('"layer_idx": 0', '"layer_idx": -1', 1))
    with pytest.raises(InputError, match="not a dump file"):
        read_dump(path)


def test_values_are_what_each_mode_computes(good_dumps):
    dumps = {mode: json.loads(path.read_text()) for mode, path in good_dumps.items()}
    for mode in ("int8", "same", "better"):
        for layer in dumps[mode]["layers"]:
            codes = np.array(layer["codes"], dtype=np.float32)
            assert all(isinstance(code, int) for code in layer["codes"])
            grid = codes * np.float32(layer["effective_scale"])
            assert np.array_equal(np.array(layer["after_quant"], dtype=np.float32), grid)
            if mode == "int8":  # the document: before_quant = y_int8 * output_scale
                assert np.array_equal(np.array(layer["before_quant"], dtype=np.float32), codes * np.float32(layer["output_scale"]))
    for layer in dumps["better"]["layers"]:
        assert layer["effective_scale"] == layer["output_scale"] / 2025
    for layer in dumps["fp"]["layers"]:
        assert layer["effective_scale"] is None and layer["codes"] is None
        assert layer["before_quant"] == layer["after_quant"]
        assert layer["stats"]["sqnr_db"] is None and layer["stats"]["max_abs_err"] == 0


def test_dumped_values_are_row_0_in_channel_position_order(good_dumps):
    """Layer 0's fp values against a float64 Conv1D+SiLU computed here from the weights."""
    model, input_ids = tiny_model(), tiny_input()
    block = model.backbone.layers[0]
    with torch.no_grad():
        h = model.backbone.embedding(input_ids).double()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5) * block.norm.weight.double()
        x = (h @ block.mixer.in_proj.weight.double().T)[..., : model.config.d_inner]
        conv = block.mixer.conv1d
        v = F.conv1d(x.transpose(1, 2), conv.weight.double(), conv.bias.double(), padding=3, groups=conv.groups)[..., :16]
        y = v * torch.sigmoid(v)  # (batch, channel, position)
    expected = y[0].flatten()[:10].tolist()
    dumped = json.loads(good_dumps["fp"].read_text())["layers"][0]["before_quant"]
    # fp32 through norm, in_proj and a 4-tap conv: a few dozen roundings of 2**-24 each.
    assert dumped == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_two_runs_write_byte_identical_files_without_times_or_hosts(tmp_path):
    first = write_good_dumps(tmp_path / "first")
    second = write_good_dumps(tmp_path / "second")
    for mode in ALL_MODES:
        assert first[mode].read_bytes() == second[mode].read_bytes()
        text = first[mode].read_text()
        assert socket.gethostname() not in text
        keys = set(json.loads(text)["config"])
        assert not {key for key in keys if any(word in key for word in ("time", "date", "host"))}


def test_nonfinite_values_are_written_as_null(tmp_path):
    recorder = Recorder(1, 3)
    recorder.arm()
    before = torch.tensor([[[float("nan")], [0.5], [float("inf")]]])
    codes = torch.tensor([[[float("nan")], [5.0], [127.0]]])
    recorder.layer(0, None)(before, codes * 0.1, codes, codes == 127)
    path = write_dump(tmp_path, recorder, QuantSpec("same"), [LayerScales(0.1, 0.1, 0.1, 0.1)])
    layer = read_dump(path)["layers"][0]
    assert layer["before_quant"][0] is None and layer["before_quant"][2] is None
    assert layer["after_quant"][0] is None and layer["codes"] == [None, 5, 127]
    assert layer["stats"]["nonfinite"] == 2


def test_meta_cannot_overwrite_the_dumps_own_keys():
    recorder = Recorder(1, 3)
    with pytest.raises(ValueError, match="mode"):
        build_dump(recorder, QuantSpec("fp"), None, {"mode": "int8"})


# --- reading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"config": {', "invalid JSON"),
        ('{"config": {"float_sim_asic": true, "float_sim_better_scale": false}, "layers": [NaN]}', "NaN"),
        ('{"config": {"float_sim_asic": true}, "layers": []}', "float_sim_better_scale"),
        ('{"config": {"float_sim_asic": true, "float_sim_better_scale": false}, "layers": [{"layer_idx": "0"}]}', "layers[0]"),
    ],
)
def test_read_dump_rejects_unusable_files_in_one_line(tmp_path, content, message):
    path = tmp_path / "int8_baseline.json"
    path.write_text(content)
    with pytest.raises(InputError) as error:
        read_dump(path)
    assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value)


# --- atomicity --------------------------------------------------------------------------------


KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys, torch
    from lm_eval_floatsim.dumps import write_dump
    from lm_eval_floatsim.quant import LayerScales, QuantSpec
    from lm_eval_floatsim.recorder import Recorder

    recorder = Recorder(1, 4)
    recorder.arm()
    y = torch.full((1, 4, 2), 7.0)
    recorder.layer(0, None)(y, y, None, None)
    os.replace = lambda source, target: os.kill(os.getpid(), signal.SIGKILL)
    write_dump(sys.argv[1], recorder, QuantSpec("fp"), None)
    """
)


def test_a_writer_killed_before_the_rename_leaves_the_old_file_intact(tmp_path, good_dumps):
    old = tmp_path / "fp_reference.json"
    old.write_bytes(good_dumps["fp"].read_bytes())
    before = old.read_bytes()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    finished = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(tmp_path)], env=env, capture_output=True, text=True)
    assert finished.returncode == -signal.SIGKILL, finished.stderr
    assert old.read_bytes() == before
    assert read_dump(old)["layers"][0]["before_quant"] != [7.0] * 4
    leftovers = [path for path in tmp_path.iterdir() if path.name.endswith(".tmp")]
    assert len(leftovers) == 1 and json.loads(leftovers[0].read_text())["layers"][0]["before_quant"] == [7.0] * 4
