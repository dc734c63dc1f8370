"""The Python API: load_model loads a checkpoint folder, gets scales and quantizes the model."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import pytest
import torch

from helpers_calibration import WORDS, random_texts, tiny_model, tiny_tokenizer
from lm_eval_floatsim import api, calibration
from lm_eval_floatsim.api import load_model
from lm_eval_floatsim.calibration import Scales, calibrate, load_calibration_texts
from lm_eval_floatsim.errors import ArgumentError, InputError
from lm_eval_floatsim.quant import LayerScales, QuantSpec


@pytest.fixture
def checkpoint(tmp_path):
    """A random 3-block model in mamba_ssm's layout (config.json + model.safetensors) + tokenizer."""
    from safetensors.torch import save_file

    folder = tmp_path / "tiny-mamba"
    folder.mkdir()
    model = tiny_model(seed=11)
    config = {"d_model": 16, "n_layer": 3, "vocab_size": WORDS + 1, "ssm_cfg": {}, "rms_norm": True,
              "residual_in_fp32": True, "fused_add_norm": True, "pad_vocab_size_multiple": 8}
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(weights, str(folder / "model.safetensors"))
    tiny_tokenizer().save_pretrained(str(folder))
    return folder


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(random_texts(21, [30, 12, 45, 30])) + "\n", encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def private_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    return tmp_path / "xdg-cache" / "lm_eval_floatsim" / "scales"


@pytest.fixture
def calibrations(monkeypatch):
    calls = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a, **k: calls.append(a) or real(*a, **k))
    return calls


def ids_of(tokenizer, text):
    return torch.tensor([tokenizer(text)["input_ids"]])


def test_fp_mode_needs_no_scales(checkpoint, calibrations):
    model, tokenizer, scales = load_model(str(checkpoint))
    assert scales is None and model.spec == QuantSpec("fp") and not calibrations
    reference = tiny_model(seed=11)
    ids = ids_of(tokenizer, random_texts(22, [20])[0])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), reference(ids), rtol=0, atol=0)  # the weights, as saved


def test_quantized_mode_calibrates_through_the_cache(checkpoint, calib_file, calibrations, private_cache):
    loaded = load_model(str(checkpoint), mode="better", divisor=100, calib_data=str(calib_file),
                        calib_samples=3, calib_seqlen=32, progress=False)
    model, tokenizer, scales = loaded
    assert model.spec == QuantSpec("better", 100) and model.scales == scales.layers
    assert len(calibrations) == 1 and scales.path.parent == private_cache
    texts = load_calibration_texts(str(calib_file), 3)
    assert scales.layers == calibrate(tiny_model(seed=11), tokenizer, texts, 32, 0.9995, progress=False)

    ids = ids_of(tokenizer, random_texts(23, [25])[0])
    with torch.no_grad():
        quantized = model(ids)
        unquantized = tiny_model(seed=11)(ids)
    assert torch.isfinite(quantized).all()
    assert not torch.equal(quantized, unquantized)  # the Conv1D+SiLU output really is quantized

    again = load_model(str(checkpoint), mode="int8", calib_data=str(calib_file), calib_samples=3,
                       calib_seqlen=32, progress=False)
    assert len(calibrations) == 1  # another mode, same model and settings: the first run's scales
    assert again.scales == scales and again.model.spec == QuantSpec("int8")


def test_scales_file_is_used_as_given(checkpoint, calib_file, calibrations, tmp_path, monkeypatch):
    first = load_model(str(checkpoint), mode="same", calib_data=str(calib_file), calib_samples=3, progress=False)
    path = first.scales.save(tmp_path / "scales.json")
    loaded = load_model(str(checkpoint), mode="better", scales=str(path), progress=False)
    assert loaded.scales == first.scales and loaded.scales.path == path and loaded.model.scales == first.scales.layers
    # The same settings may be repeated, the calibration file under another spelling of its path.
    monkeypatch.chdir(calib_file.parent)
    load_model(str(checkpoint), mode="int8", scales=path, calib_data=calib_file.name, calib_samples=3)
    assert len(calibrations) == 1


@pytest.mark.parametrize("name, value", [("calib_samples", 4), ("percentile", 0.99), ("calib_seqlen", 64)])
def test_scales_file_contradicting_explicit_settings(checkpoint, calib_file, tmp_path, name, value):
    scales = load_model(str(checkpoint), mode="same", calib_data=str(calib_file), calib_samples=3, progress=False).scales
    path = scales.save(tmp_path / "scales.json")
    with pytest.raises(ArgumentError) as error:
        load_model(str(checkpoint), mode="same", scales=str(path), **{name: value})
    assert str(error.value).startswith(f"{name}={value!r} is not allowed") and str(path) in str(error.value)


def test_scales_with_another_layer_count(checkpoint, tmp_path):
    path = Scales("elsewhere", {}, [LayerScales(0.1, 0.1, 0.1, 0.1)] * 2).save(tmp_path / "two.json")
    with pytest.raises(InputError, match="2 layers .* 3 blocks"):
        load_model(str(checkpoint), mode="int8", scales=str(path))


@pytest.mark.parametrize(
    "arguments, error",
    [
        ({"mode": "int4"}, ArgumentError),
        ({"mode": "better", "divisor": 0}, ArgumentError),
        ({"rounding": "up"}, ArgumentError),
        ({"percentile": 2}, ArgumentError),
        ({"calib_samples": 0}, ArgumentError),
        ({"dtype": "int8"}, ArgumentError),
        ({"scales": "/no/such/scales.json"}, InputError),
        ({"scales": 3}, ArgumentError),
    ],
)
def test_arguments_are_checked_before_loading(monkeypatch, arguments, error):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the arguments were checked")

    monkeypatch.setattr(api, "load_pretrained", must_not_load)
    with pytest.raises(error):
        load_model("state-spaces/mamba-130m", **arguments)
