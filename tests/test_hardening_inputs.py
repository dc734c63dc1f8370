"""Bad inputs that docs/BAD_INPUTS.md lists and no other test file covers: each fails with one line
that says what is wrong (lm-eval-floatsim: exit 2; lm_eval: the last line of stderr), before the
evaluation where it can be known then, and never corrupts a file written earlier."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import os
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest

import helpers_models
from fixtures.floatsim_runs import DOCS, TASKS_DIR, console_script, model_args, subprocess_env
from lm_eval_floatsim import cli
from lm_eval_floatsim.arguments import parse_model_args
from lm_eval_floatsim.calibration import calibrate, load_calibration_texts
from lm_eval_floatsim.errors import ArgumentError, FloatSimError, InputError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def small_vocabulary_model(tmp_path_factory):
    """A checkpoint with 128 embedding rows beside the byte tokenizer's 257 tokens."""
    folder, _ = helpers_models.make_checkpoint(tmp_path_factory.mktemp("small-vocab"), "transformers", vocab_size=128)
    return folder


def can_create_files_in(folder: Path) -> bool:
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def unwritable_dump_dir(tmp_path_factory):
    """A dump_dir no file can be created in: below a read-only folder, or for root (whom permission
    bits do not stop) below /sys, where the kernel refuses new files to everyone."""
    read_only = tmp_path_factory.mktemp("read-only")
    read_only.chmod(0o555)
    for parent in (read_only, Path("/sys")):
        if not can_create_files_in(parent):
            yield parent / "floatsim-dumps"
            break
    else:
        pytest.fail("no folder here refuses new files, not even /sys: this test needs one")
    read_only.chmod(0o755)


def one_line(error: FloatSimError) -> str:
    message = str(error)
    assert message and "\n" not in message
    return message


def run_cli(*argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(arg) for arg in argv])
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code: int, err: str, command: str, *expected: str) -> None:
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"lm-eval-floatsim {command}: error: "), err
    for text in expected:
        assert text in err, err


# --- model arguments --------------------------------------------------------------------------------

# test_arguments.py covers each argument's typical bad values; these are the rest of the table.
MORE_BAD_ARGUMENTS = [
    ({"divisor": "nan"}, "a positive finite number"),
    ({"percentile": "nan"}, "a number in (0, 1]"),
    ({"dump_n": "ten"}, "an integer >= 1"),
    ({"calib_seqlen": 1.5}, "an integer >= 1"),
    ({"calib_samples": True}, "an integer >= 1"),
    ({"max_batch_size": 0}, "an integer >= 1"),
    ({"device": ""}, "a non-empty string"),
    ({"scales": ""}, "a non-empty string"),
    ({"dump_dir": ""}, "a non-empty string"),
    ({"mode": ""}, "one of fp, int8, same, better"),
    ({"tokenizer": "not a hub id"}, "a Hugging Face hub id"),
]


@pytest.mark.parametrize("given, allowed", MORE_BAD_ARGUMENTS, ids=[str(case[0]) for case in MORE_BAD_ARGUMENTS])
def test_more_bad_argument_values_are_one_line(given, allowed):
    with pytest.raises(ArgumentError) as raised:
        parse_model_args(given)
    [(argument, value)] = given.items()
    assert one_line(raised.value) == f"{argument}={value!r} is not allowed: expected {raised.value.allowed}"
    assert allowed in raised.value.allowed


@pytest.mark.parametrize("device", ["tpu", "gpu", "cdua:0"])
def test_a_device_that_does_not_exist_is_refused_before_loading(device):
    """HFLM runs on the CPU, without a word, when it does not know the device: a typo would turn an
    overnight GPU run into a week on the CPU. (cuda without a GPU falls back to the CPU on purpose:
    it is lm-eval's default device.)"""
    with pytest.raises(ArgumentError) as raised:
        parse_model_args({"device": device})
    assert one_line(raised.value) == f"device={device!r} is not allowed: expected cpu, cuda or cuda:N"
    assert parse_model_args({"device": "cuda:0"}).device == "cuda:0"


def test_a_dump_dir_that_cannot_be_written_is_refused_before_loading(unwritable_dump_dir, tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for dump_dir in (unwritable_dump_dir, a_file / "dumps"):
        with pytest.raises(ArgumentError) as raised:
            parse_model_args({"dump_dir": str(dump_dir)})
        assert one_line(raised.value).startswith(f"dump_dir={str(dump_dir)!r} is not allowed")


# --- checkpoints, tokenizers, scales ------------------------------------------------------------------------


def test_a_tokenizer_larger_than_the_embedding_is_one_line(small_vocabulary_model):
    """Token ids beyond the embedding's rows would be an IndexError in the middle of the evaluation."""
    from lm_eval_floatsim.api import load_model

    with pytest.raises(InputError) as raised:
        load_model(str(small_vocabulary_model))
    message = one_line(raised.value)
    assert "tokenizer" in message and "128" in message and str(small_vocabulary_model) in message


def test_scales_calibrated_on_other_weights_are_refused(tmp_path, monkeypatch):
    """Same architecture, same layer count, other weights: the scales file's weights_sha256 says so."""
    from lm_eval_floatsim.api import load_model

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    first, _ = helpers_models.make_checkpoint(tmp_path / "first", "transformers", seed=0)
    second, _ = helpers_models.make_checkpoint(tmp_path / "second", "transformers", seed=1)
    calibrated = load_model(str(first), mode="int8", calib_data=str(DOCS), calib_samples=2, calib_seqlen=16, progress=False)
    scales = calibrated.scales.save(tmp_path / "scales-of-first.json")
    assert load_model(str(first), mode="int8", scales=str(scales)).scales == calibrated.scales
    with pytest.raises(InputError) as raised:
        load_model(str(second), mode="int8", scales=str(scales))
    message = one_line(raised.value)
    assert str(scales) in message and "weights" in message


# --- calibration data ------------------------------------------------------------------------------------------
# What is allowed (SPEC §2, Quamba): samples shorter than calib_seqlen are used whole, never padded,
# and fewer samples than calib_samples calibrate with a warning. What is an error: no usable sample.


@pytest.fixture(scope="module")
def loaded_model(model_files):
    from lm_eval_floatsim.api import load_model

    hf_folder, _, _, _ = model_files
    return load_model(str(hf_folder), mode="fp", progress=False)


def test_calibration_samples_shorter_than_calib_seqlen_are_used_whole(loaded_model):
    model, tokenizer, _ = loaded_model
    texts = load_calibration_texts(str(DOCS), 4)
    longest = max(len(tokenizer(text)["input_ids"]) for text in texts)
    assert longest < 512
    # Truncation at the longest sample changes nothing, so padding to 512 would be the only difference.
    assert calibrate(model, tokenizer, texts, 512, 0.999, progress=False) == calibrate(model, tokenizer, texts, longest, 0.999, progress=False)


def test_fewer_calibration_samples_than_calib_samples_warn_and_calibrate(loaded_model, tmp_path, caplog):
    model, tokenizer, _ = loaded_model
    path = tmp_path / "two-samples.txt"
    path.write_text("The cat sat on the mat.\n\nA dog ran.\n", encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="lm_eval_floatsim"):
        texts = load_calibration_texts(str(path), 512)
    assert texts == ["The cat sat on the mat.", "A dog ran."]
    assert "holds 2 samples, fewer than calib_samples=512" in caplog.text
    assert len(calibrate(model, tokenizer, texts, 512, 0.999, progress=False)) == model.config.n_layer


def test_calibration_text_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("Ça coûte très cher.\n".encode("latin-1"))
    with pytest.raises(InputError) as raised:
        load_calibration_texts(str(path), 4)
    message = one_line(raised.value)
    assert message.startswith(f"calib_data={str(path)!r}") and "UTF-8" in message


# --- output folders: not writable, full disk -------------------------------------------------------------------


def dump_command(model_files, dump_dir, text="Anna has a red apple."):
    hf_folder, _, scales, _ = model_files
    return ["dump", "--pretrained", hf_folder, "--scales", scales, "--text", text, "--dump-dir", dump_dir, "--device", "cpu"]


def test_the_dump_command_with_an_unwritable_dump_dir_is_one_line(model_files, unwritable_dump_dir):
    code, _, err = run_cli(*dump_command(model_files, unwritable_dump_dir))
    assert_one_error_line(code, err, "dump", str(unwritable_dump_dir))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.fixture
def disk_full_after(monkeypatch):
    """disk_full_after(n): from the (n+1)-th file on, fsync fails with ENOSPC, as on a full disk."""

    def fill_after(files: int):
        real_fsync, synced = os.fsync, []

        def fsync(fd):
            if len(synced) >= files:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            synced.append(fd)
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", fsync)

    return fill_after


def test_a_full_disk_keeps_every_earlier_dump_and_says_so_in_one_line(model_files, tmp_path, disk_full_after):
    dump_dir = tmp_path / "dumps"
    assert run_cli(*dump_command(model_files, dump_dir))[0] == 0
    earlier = snapshot(dump_dir)
    disk_full_after(1)  # the next run replaces int8_baseline.json, then the disk is full
    code, _, err = run_cli(*dump_command(model_files, dump_dir, text="Ben has a dog."))
    assert_one_error_line(code, err, "dump", "floatsim_samescale.json", "No space left on device")
    now = snapshot(dump_dir)
    assert sorted(now) == sorted(earlier)  # and no temp file left behind
    assert now["int8_baseline.json"] != earlier["int8_baseline.json"]  # the one written before the disk filled
    assert {name: data for name, data in now.items() if name != "int8_baseline.json"} == {
        name: data for name, data in earlier.items() if name != "int8_baseline.json"}


def test_a_full_disk_at_the_end_of_an_evaluation_is_one_line(model_files, tmp_path, disk_full_after):
    from lm_eval_floatsim.lm_model import FloatSimLM

    hf_folder, _, scales, _ = model_files
    lm = FloatSimLM(pretrained=str(hf_folder), mode="same", scales=str(scales), dump_dir=str(tmp_path), device="cpu")
    dump_file = Path(lm.write_dump()["dump_file"])
    earlier = dump_file.read_bytes()
    disk_full_after(0)
    with pytest.raises(InputError) as raised:
        lm.write_dump()
    assert one_line(raised.value) == f"cannot write {dump_file}: No space left on device"
    assert snapshot(tmp_path) == {dump_file.name: earlier}


# --- check and compare on empty, foreign or truncated files -----------------------------------------------------
# Missing folders, truncated dumps and results, missing dumps: test_checks.py and test_compare.py.


def test_check_on_an_empty_or_foreign_file_is_one_line(tmp_path):
    empty, foreign = tmp_path / "empty", tmp_path / "foreign"
    for folder in (empty, foreign):
        folder.mkdir()
    (empty / "int8_baseline.json").write_bytes(b"")
    (foreign / "floatsim_samescale.json").write_text(json.dumps({"results": {}, "config": {"model": "hf"}}))
    code, _, err = run_cli("check", empty)
    assert_one_error_line(code, err, "check", "int8_baseline.json: invalid JSON: Expecting value at line 1 column 1")
    code, _, err = run_cli("check", foreign)
    assert_one_error_line(code, err, "check", "floatsim_samescale.json: not a dump file: top level: 'layers' is a required property")


def test_compare_on_foreign_or_empty_results_is_one_line(tmp_path):
    foreign, empty = tmp_path / "foreign", tmp_path / "empty"
    for folder in (foreign, empty):
        folder.mkdir()
    (foreign / "results_2027-01-15T10-00-00.json").write_text(json.dumps({"results": {"arc_easy": {"acc,none": 0.7}}, "config": {"model": "hf"}}))
    (empty / "results_2027-01-15T10-00-00.json").write_bytes(b"")
    code, _, err = run_cli("compare", foreign)
    assert_one_error_line(code, err, "compare", "no runs found under", "config.floatsim section")
    code, _, err = run_cli("compare", empty)
    assert_one_error_line(code, err, "compare", "results_2027-01-15T10-00-00.json is not readable JSON")


# --- through the lm_eval command: the last line says it, no traceback ------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def lm_eval_runs(model_files, small_vocabulary_model, unwritable_dump_dir, tmp_path_factory):
    """`lm_eval` runs with one bad input each, started before this module's first test and read by
    its last ones: the interpreter starts and lm-eval's task index take seconds, spent meanwhile."""
    hf_folder, _, scales, _ = model_files
    work = tmp_path_factory.mktemp("lm-eval-runs")
    env = {**subprocess_env(work), "OMP_NUM_THREADS": "1"}
    cases = {
        "tokenizer": model_args(pretrained=small_vocabulary_model, mode="fp", dump_dir=work / "dumps"),
        "dump_dir": model_args(pretrained=hf_folder, mode="int8", scales=scales, dump_dir=unwritable_dump_dir),
    }
    processes = {
        name: subprocess.Popen(
            [console_script("lm_eval"), "--model", "mamba_floatsim", "--model_args", arguments, "--include_path", str(TASKS_DIR),
             "--tasks", "floatsim_lambada", "--limit", "2", "--device", "cpu", "--output_path", str(work / "out" / name)],
            env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for name, arguments in cases.items()
    }
    yield processes
    for process in processes.values():
        if process.poll() is None:  # a test failed before reading it
            process.kill()
            process.communicate()


def finished(process: subprocess.Popen) -> str:
    _, err = process.communicate(timeout=600)
    assert process.returncode == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return err.strip().splitlines()[-1]


def test_lm_eval_with_a_tokenizer_larger_than_the_embedding_says_so(lm_eval_runs, small_vocabulary_model):
    last = finished(lm_eval_runs["tokenizer"])
    assert last.startswith("mamba_floatsim: error: ") and "tokenizer" in last and str(small_vocabulary_model) in last


def test_lm_eval_with_an_unwritable_dump_dir_stops_before_evaluating(lm_eval_runs, unwritable_dump_dir):
    last = finished(lm_eval_runs["dump_dir"])
    assert last.startswith("mamba_floatsim: error: dump_dir=") and str(unwritable_dump_dir) in last
