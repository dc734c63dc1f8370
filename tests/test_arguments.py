"""Model arguments of `mamba_floatsim`: every bad value fails with one line naming it, before any loading."""

from __future__ import annotations

import logging
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

from lm_eval_floatsim.arguments import DEFAULT_PRETRAINED, ModelArgs, known_arguments, parse_model_args
from lm_eval_floatsim.errors import ArgumentError


@pytest.fixture
def files(tmp_path, monkeypatch):
    """A model folder, a scales file and calibration text, with tmp_path as the working directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    (tmp_path / "scales.json").write_text("{}")
    (tmp_path / "calib.txt").write_text("some text\n")
    (tmp_path / "calib.csv").write_text("a,b\n")
    return tmp_path


BAD_ARGUMENTS = [
    ({"mode": "int4"}, "mode", "one of fp, int8, same, better"),
    ({"mode": 8}, "mode", "one of fp, int8, same, better"),
    ({"divisor": 0}, "divisor", "a positive finite number"),
    ({"divisor": -2025}, "divisor", "a positive finite number"),
    ({"divisor": "many"}, "divisor", "a positive finite number"),
    ({"divisor": "inf"}, "divisor", "a positive finite number"),
    ({"divisor": True}, "divisor", "a positive finite number"),
    ({"dump_n": 0}, "dump_n", "an integer >= 1"),
    ({"dump_n": 2.5}, "dump_n", "an integer >= 1"),
    ({"rounding": "up"}, "rounding", "one of half_away, half_even"),
    ({"clamp": "int16"}, "clamp", "one of range, none"),
    ({"percentile": 0}, "percentile", "a number in (0, 1]"),
    ({"percentile": 1.0001}, "percentile", "a number in (0, 1]"),
    ({"percentile": "high"}, "percentile", "a number in (0, 1]"),
    ({"calib_samples": 0}, "calib_samples", "an integer >= 1"),
    ({"calib_seqlen": -1}, "calib_seqlen", "an integer >= 1"),
    ({"dtype": "int8"}, "dtype", "one of float32, float16, bfloat16, auto"),
    ({"revision": ""}, "revision", "a non-empty string"),
    ({"layers": "0-5;12"}, "layers", "block indices and ranges joined by +, e.g. 0-5+12+20-23"),
    ({"layers": "5-3"}, "layers", "(a range runs upwards)"),
    ({"asic_dtype": "float8"}, "asic_dtype", "one of float32, float16, bfloat16"),
    ({"kernel_math": "fastest"}, "kernel_math", "one of exact, fast"),
    ({"operand_rounding": "down"}, "operand_rounding", "one of half_away, half_even"),
    ({"conv_scales": "per_channel"}, "conv_scales", "one of conv, xbc"),
    ({"layers": -1}, "layers", "block indices and ranges joined by +"),
    ({"revision": "v1", "pretrained": "model"}, "revision", "no revision: pretrained=model is a local folder"),
    ({"batch_size": "large"}, "batch_size", "an integer >= 1, auto or auto:N"),
    ({"batch_size": 0}, "batch_size", "an integer >= 1, auto or auto:N"),
    ({"max_length": 0}, "max_length", "an integer >= 1"),
    ({"pretrained": "./missing-model"}, "pretrained", "no such folder"),
    ({"pretrained": "~/missing-model-of-floatsim"}, "pretrained", "no such folder"),
    ({"pretrained": "/nowhere/mamba"}, "pretrained", "no such folder"),
    ({"pretrained": "model/missing"}, "pretrained", "no such folder"),  # its first part exists here
    ({"pretrained": "state-spaces/mamba-130m/extra"}, "pretrained", "no such folder"),
    ({"pretrained": "scales.json"}, "pretrained", "a file, not a folder"),
    ({"pretrained": "not a hub id"}, "pretrained", "a Hugging Face hub id"),
    ({"tokenizer": "./missing-tokenizer"}, "tokenizer", "no such folder"),
    ({"scales": "missing-scales.json"}, "scales", "an existing file"),
    ({"calib_data": "missing.txt"}, "calib_data", "no such file"),
    ({"calib_data": "calib.csv"}, "calib_data", "must be .txt or .jsonl"),
    ({"calib_data": "./data/missing"}, "calib_data", "no such file or folder"),
    ({"calib_data": "a:b:c:d"}, "calib_data", "NAME:CONFIG:SPLIT"),
    ({"dump_dir": "calib.txt"}, "dump_dir", "a folder"),
    ({"modee": "better"}, "modee", "a model argument of mamba_floatsim"),
    ({"parallelize": True}, "parallelize", "a model argument of mamba_floatsim"),
]


@pytest.mark.parametrize("given, argument, allowed", BAD_ARGUMENTS, ids=[str(case[0]) for case in BAD_ARGUMENTS])
def test_each_bad_argument_is_one_line_naming_it(files, given, argument, allowed):
    with pytest.raises(ArgumentError) as raised:
        parse_model_args(given)
    error = raised.value
    assert error.argument == argument
    message = str(error)
    assert "\n" not in message
    assert message.startswith(f"{argument}={given[argument]!r} is not allowed: expected")
    assert allowed in message


def test_defaults():
    args = parse_model_args({})
    assert args == ModelArgs()
    assert (args.pretrained, args.mode, args.divisor, args.dump_dir, args.dump_n) == (
        DEFAULT_PRETRAINED, "fp", 2025.0, "yzCheckFloatSim", 10,
    )
    # Calibration settings stay unset, so that a scales file is checked only against chosen ones.
    assert (args.calib_data, args.calib_samples, args.calib_seqlen, args.percentile) == (None, None, None, None)
    assert args.spec.mode == "fp" and args.harness == {}


def test_values_typed_by_lm_eval_or_given_as_text_mean_the_same(files):
    as_text = parse_model_args(
        {"mode": "better", "divisor": "2.5", "dump_n": "4", "calib_samples": "8", "percentile": "0.99", "batch_size": "auto:2"}
    )
    typed = parse_model_args(
        {"mode": "better", "divisor": 2.5, "dump_n": 4, "calib_samples": 8, "percentile": 0.99, "batch_size": "auto:2"}
    )
    assert as_text == typed
    assert (typed.divisor, typed.dump_n, typed.calib_samples, typed.percentile) == (2.5, 4, 8, 0.99)
    assert typed.harness == {"batch_size": "auto:2"}
    assert typed.spec.effective_scale(1.0) == pytest.approx(1 / 2.5)


def test_lm_evals_mamba_ssm_conventions_dtype_auto_and_a_hub_revision():
    args = parse_model_args({"dtype": "auto", "revision": "0123abc", "pretrained": "state-spaces/mamba-130m"})
    assert (args.dtype, args.revision) == ("auto", "0123abc")
    assert args.model_id == "state-spaces/mamba-130m@0123abc"  # as dumps, results and scales name the model
    assert parse_model_args({}).model_id == DEFAULT_PRETRAINED


def test_layers_as_lm_eval_passes_them():
    assert parse_model_args({"layers": "0-2+5+7-8"}).layers == (0, 1, 2, 5, 7, 8)
    assert parse_model_args({"layers": 3}).layers == (3,)  # lm-eval's parser types a lone index
    assert parse_model_args({"layers": "2+0-2"}).spec.label == "fp layers=0-2"  # sorted, merged
    assert parse_model_args({}).layers is None  # every block


def test_none_means_the_default():
    assert parse_model_args({"tokenizer": None, "device": None, "divisor": None}) == ModelArgs()


def test_local_folders_hub_ids_and_files(files):
    args = parse_model_args(
        {"pretrained": "model", "tokenizer": "EleutherAI/gpt-neox-20b", "scales": "scales.json", "calib_data": "calib.txt"}
    )
    assert (args.pretrained, args.tokenizer, args.scales, args.calib_data) == (
        "model", "EleutherAI/gpt-neox-20b", "scales.json", "calib.txt",
    )
    assert parse_model_args({"pretrained": "gpt2"}).pretrained == "gpt2"
    assert parse_model_args({"pretrained": str(files / "model")}).pretrained == str(files / "model")
    assert parse_model_args({"calib_data": "monology/pile-uncopyrighted:validation"}).calib_data.endswith(":validation")
    local_dataset_with_split = f"{files / 'model'}:validation"
    assert parse_model_args({"calib_data": local_dataset_with_split}).calib_data == local_dataset_with_split


def test_lm_evals_own_arguments_pass_through(files):
    args = parse_model_args(
        {"batch_size": 8, "max_batch_size": "16", "max_length": 1024, "truncation": True, "trust_remote_code": True, "device": "cpu"}
    )
    assert args.harness == {"batch_size": 8, "max_batch_size": 16, "max_length": 1024, "truncation": True, "trust_remote_code": True}
    assert args.device == "cpu"
    assert set(args.harness) <= set(known_arguments())


def test_divisor_outside_better_is_accepted_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="lm_eval_floatsim"):
        args = parse_model_args({"mode": "int8", "divisor": 100})
    assert args.mode == "int8" and args.divisor == 100.0
    assert "divisor=100 only applies to mode=better" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lm_eval_floatsim"):
        parse_model_args({"mode": "better", "divisor": 100})
    assert caplog.text == ""


@pytest.mark.parametrize(
    "given, argument",
    [
        ({"mode": "int4"}, "mode"),
        ({"divisor": -1}, "divisor"),
        ({"dump_n": 0}, "dump_n"),
        ({"percentile": 2}, "percentile"),
        ({"pretrained": "./missing-model"}, "pretrained"),
        ({"modee": "better"}, "modee"),
    ],
)
def test_the_lm_eval_model_fails_before_loading_anything(files, monkeypatch, given, argument):
    import lm_eval_floatsim.api as api
    import lm_eval_floatsim.loading as loading
    from lm_eval_floatsim.lm_model import FloatSimLM

    def must_not_load(*args, **kwargs):
        raise AssertionError("a model, tokenizer or accelerator was created before the arguments were checked")

    for module, name in ((api, "load_model"), (loading, "load_pretrained"), (loading, "load_tokenizer")):
        monkeypatch.setattr(module, name, must_not_load)
    monkeypatch.setattr("lm_eval.models.huggingface.Accelerator", must_not_load)
    with pytest.raises(ArgumentError) as raised:
        FloatSimLM.create_from_arg_string(",".join(f"{key}={value}" for key, value in given.items()), {"device": "cpu"})
    assert raised.value.argument == argument
