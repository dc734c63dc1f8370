"""The lm-eval model `mamba_floatsim`: numerics against lm-eval's stock `hf` model, the statistics'
coverage (real tokens only, no batch-size probe), the results section, dumps and hooks,
switch_mode, and every mode end to end through the `lm_eval` console script."""

from __future__ import annotations

import json
import os
import subprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch

from fixtures.floatsim_runs import (
    DOCS,
    LIMIT,
    TASK_NAMES,
    TASKS_DIR,
    console_script,
    evaluate,
    floatsim,
    model_args,
    subprocess_env,
)

from lm_eval_floatsim import dumps, hookimpl
from lm_eval_floatsim.errors import ArgumentError
from lm_eval_floatsim.data_parallel import _without_copies
from lm_eval_floatsim.lm_model import padding_mask
from lm_eval_floatsim.modes import MODES

D_INNER = 64  # helpers_models' default: hidden 32, expand 2
N_LAYER = 2


def responses(results, task) -> list:
    """Per document (in doc order), the model's raw response."""
    samples = sorted(results["samples"][task], key=lambda sample: sample["doc_id"])
    return [sample["resps"][0][0] for sample in samples]


def lambada_inputs(limit=LIMIT) -> list[bytes]:
    """What each floatsim_lambada request feeds the model: context + continuation minus the last token.

    The byte tokenizer has one token per UTF-8 byte and adds no special token, so the input of a
    document's request is its text's bytes without the last one.
    """
    lines = DOCS.read_text(encoding="utf-8").splitlines()[:limit]
    return [json.loads(line)["text"].encode("utf-8")[:-1] for line in lines]


# --- numerics: mode=fp is the original model -----------------------------------------------------


def test_fp_gives_the_stock_hf_models_loglikelihoods_and_generations(model_files, task_manager, tmp_path):
    import lm_eval

    hf_folder, ssm_folder, _, _ = model_files
    stock = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(hf_folder), "dtype": "float32"}, device="cpu", batch_size=1,
        tasks=list(TASK_NAMES), task_manager=task_manager, limit=LIMIT, log_samples=True, bootstrap_iters=0,
    )
    # batch_size 4 pads: right-padded loglikelihood batches, left-padded generation batches.
    for folder in (hf_folder, ssm_folder):
        ours = evaluate(floatsim(folder, tmp_path / folder.name, mode="fp", batch_size=4), task_manager)
        for task in ("floatsim_lambada", "floatsim_rolling"):
            expected = [resp[0] if isinstance(resp, tuple) else resp for resp in responses(stock, task)]
            found = [resp[0] if isinstance(resp, tuple) else resp for resp in responses(ours, task)]
            # Summed fp32 log-probabilities of ~80 tokens computed by two implementations of the same
            # model (transformers' and ours, different op order): agreement to ~1e-6 relative.
            assert found == pytest.approx(expected, abs=1e-4), (folder.name, task)
        assert [r[1] for r in responses(ours, "floatsim_lambada")] == [r[1] for r in responses(stock, "floatsim_lambada")]
        assert responses(ours, "floatsim_generate") == responses(stock, "floatsim_generate"), folder.name


@pytest.mark.parametrize("family", ["FalconMamba", "Mamba2"])
def test_a_checkpoint_of_the_mamba_family_in_every_mode(task_manager, tmp_path, monkeypatch, family):
    """FalconMamba and Mamba-2 as transformers writes them (and Mamba-2 as mamba_ssm does): fp gives
    lm-eval's own hf model's loglikelihoods and generations; int8, same and better write dumps of
    every layer that `check` passes (Mamba-2 also with conv_scales=xbc)."""
    import lm_eval
    import transformers

    from helpers_models import PADDED_VOCAB, random_hf_model, save_mamba_ssm_layout, save_tokenizer, save_transformers_layout
    from lm_eval_floatsim import checks

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    options = dict(hidden_size=32, num_hidden_layers=2, vocab_size=PADDED_VOCAB, state_size=8, initializer_range=0.02)
    if family == "Mamba2":
        options.update(head_dim=16, num_heads=4, n_groups=2, tie_word_embeddings=True)  # mamba_ssm's layout ties them
    config = getattr(transformers, f"{family}Config")(**options)
    model = random_hf_model(config)
    folder = save_transformers_layout(model, tmp_path / "hf")
    folders = [folder]
    if family == "Mamba2":  # mamba_ssm writes Mamba-2 checkpoints too (FalconMamba has no such layout)
        folders.append(save_mamba_ssm_layout(model, tmp_path / "ssm", pad_vocab_size_multiple=1))
    for checkpoint in folders:
        save_tokenizer(checkpoint)
    tasks = ("floatsim_lambada", "floatsim_generate")
    stock = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(folder), "dtype": "float32"}, device="cpu", batch_size=1,
        tasks=list(tasks), task_manager=task_manager, limit=LIMIT, log_samples=True, bootstrap_iters=0,
    )
    for checkpoint in folders:
        ours = evaluate(floatsim(checkpoint, tmp_path / "fp", mode="fp", batch_size=4), task_manager, tasks=tasks)
        # As for Mamba-1 above: two implementations of the same fp32 model, ~1e-6 relative.
        expected = [r[0] for r in responses(stock, "floatsim_lambada")]
        assert [r[0] for r in responses(ours, "floatsim_lambada")] == pytest.approx(expected, abs=1e-4), checkpoint.name
        assert responses(ours, "floatsim_generate") == responses(stock, "floatsim_generate"), checkpoint.name
    calibration = {"calib_data": str(DOCS), "calib_samples": 6, "calib_seqlen": 64}
    for mode in ("int8", "same", "better"):
        evaluate(floatsim(folder, tmp_path / "dumps", mode=mode, batch_size=4, **calibration), task_manager, tasks=("floatsim_lambada",))
    files = checks.load_dumps(tmp_path / "dumps")
    assert sorted(file.mode for file in files) == ["better", "int8", "same"] and all(len(file.layers) == 2 for file in files)
    results = checks.check_dumps(files)
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]
    if family != "Mamba2":
        with pytest.raises(ArgumentError, match="conv_scales=.xbc.*FalconMamba conv holds x only"):
            floatsim(folder, tmp_path / "xbc", mode="int8", conv_scales="xbc", **calibration)
        return
    # conv_scales=xbc: x, B and C each with their own scales, in every mode and through check.
    for mode in ("int8", "same", "better"):
        evaluate(floatsim(folder, tmp_path / "xbc", mode=mode, batch_size=4, conv_scales="xbc", **calibration), task_manager,
                 tasks=("floatsim_lambada",))
    files = checks.load_dumps(tmp_path / "xbc")
    segments = [[(s["name"], s["channels"]) for s in layer["segments"]] for file in files for layer in file.layers]
    assert segments == [[("x", 64), ("B", 16), ("C", 16)]] * 6 and files[0].config["calibration"]["conv_scales"] == "xbc"
    results = checks.check_dumps(files)
    assert all(result.ok for result in results), [result.line() for result in results if not result.ok]


# --- what the statistics cover ------------------------------------------------------------------


def test_statistics_count_real_tokens_only_whatever_the_batching(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    expected_count = sum(len(inputs) for inputs in lambada_inputs()) * D_INNER
    runs = {}
    # 4 and auto (the probe settles on max_batch_size 4) right-pad most batches.
    for batch_size in (1, 4, "auto"):
        lm = floatsim(hf_folder, tmp_path / str(batch_size), mode="int8", scales=scales, batch_size=batch_size, max_batch_size=4)
        results = evaluate(lm, task_manager, tasks=["floatsim_lambada"])
        section = results["config"]["floatsim"]
        assert [layer["count"] for layer in section["layers"]] == [expected_count] * N_LAYER, batch_size
        runs[batch_size] = (lm, results)
    assert runs["auto"][1]["config"]["batch_sizes"] == [4]  # the probe ran inside the evaluation
    single = runs[1][1]["config"]["floatsim"]["layers"]
    for batch_size in (4, "auto"):
        lm, results = runs[batch_size]
        for one, batched in zip(single, results["config"]["floatsim"]["layers"]):
            # The same positions, batched differently: fp32 sums of ~10^5 terms in another order.
            assert batched["max_abs_err"] == pytest.approx(one["max_abs_err"], rel=1e-6)
            assert batched["mean_abs_err"] == pytest.approx(one["mean_abs_err"], rel=1e-5)
        # The snapshot is the first real batch's row 0: the longest request (lm-eval sorts longest
        # first) whatever the batch size, and not a probe batch.
        for found, reference in zip(lm.recorder.snapshots(), runs[1][0].recorder.snapshots()):
            assert found.codes == reference.codes


def test_batch_size_probe_neither_arms_nor_feeds_the_recorder(model_files, tmp_path):
    hf_folder, _, scales, _ = model_files
    lm = floatsim(hf_folder, tmp_path, mode="same", scales=scales, batch_size="auto", max_batch_size=4)
    assert lm._detect_batch_size(requests=[(("a", "b"), list(range(30)), [7, 8])], pos=0) == 4
    assert not lm.recorder.armed
    assert torch.count_nonzero(lm.recorder.sums) == 0 and torch.count_nonzero(lm.recorder.maxes) == 0
    assert lm.model.recorder is lm.recorder  # attached again for the evaluation


def test_padding_mask_marks_real_positions():
    lengths, width = [3, 5, 1], 5
    for side in ("right", "left"):
        mask = padding_mask(lengths, width, side, "cpu").tolist()
        for row, length in zip(mask, lengths):
            real = [1] * length
            pad = [0] * (width - length)
            assert row == (real + pad if side == "right" else pad + real)
    assert padding_mask([4, 4], 4, "right", "cpu") is None


def test_data_parallel_copies_are_run_once_and_answered_like_their_original():
    class Request:
        def __init__(self, repeats):
            self.repeats = repeats

    a, b, c = Request(1), Request(2), Request(1)
    # lm-eval lists b twice (repeats) and pads the rank with copies of its last request, c.
    distinct, positions = _without_copies([a, b, b, c, c, c])
    assert distinct == [a, b, b, c]
    assert positions == [0, 1, 2, 3, 3, 3]


# --- the run's outputs: results section, dump files, hooks ------------------------------------------


class HookSpy:
    def __init__(self):
        self.dumps, self.runs = [], []

    @hookimpl
    def floatsim_dump_written(self, path, dump):
        self.dumps.append((path, dump))

    @hookimpl
    def floatsim_run_finished(self, run, output_dir):
        self.runs.append((run, output_dir))


@pytest.fixture
def hook_spy():
    from lm_eval_floatsim.plugins import plugin_manager

    spy = HookSpy()
    plugin_manager().register(spy)
    yield spy
    plugin_manager().unregister(spy)


def test_results_section_dump_and_files_beside_lm_evals_results(model_files, task_manager, tmp_path, hook_spy):
    from lm_eval.loggers import EvaluationTracker

    hf_folder, _, scales, _ = model_files
    lm = floatsim(hf_folder, tmp_path / "dumps", mode="better", divisor=50, scales=scales, batch_size=4)
    tracker = EvaluationTracker(output_path=str(tmp_path / "out"))
    results = evaluate(lm, task_manager, evaluation_tracker=tracker)
    results.pop("samples")
    tracker.save_results_aggregated(results=results)

    dump_path = tmp_path / "dumps" / "floatsim_betterscale_50.json"
    dump = json.loads(dump_path.read_text())
    section = results["config"]["floatsim"]
    assert {key: section[key] for key in ("mode", "divisor", "rounding", "clamp", "model")} == {
        "mode": "better", "divisor": 50.0, "rounding": "half_away", "clamp": "range", "model": str(hf_folder),
    }
    assert section["dump_file"] == str(dump_path)
    assert section["scales_file"] == str(scales)
    assert section["scales_sha256"] == json.loads(scales.read_text())["sha256"] == dump["config"]["scales_sha256"]
    assert section["layers"] == [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]]
    assert dumps.read_dump(dump_path) == dump  # the schema of the user's format
    assert dump["layers"][0]["effective_scale"] == pytest.approx(dump["layers"][0]["output_scale"] / 50)

    results_files = list((tmp_path / "out").rglob("results_*.json"))
    assert len(results_files) == 1
    saved = json.loads(results_files[0].read_text())
    assert saved["config"]["floatsim"] == section
    date_id = results_files[0].stem.removeprefix("results_")
    beside = results_files[0].parent / f"floatsim_{date_id}"
    assert json.loads((beside / dump_path.name).read_text()) == dump
    assert (beside / scales.name).read_text() == scales.read_text()

    assert [(path, written) for path, written in hook_spy.dumps] == [(str(dump_path), dump)]
    [(run, output_dir)] = hook_spy.runs
    assert output_dir == str(beside)
    assert run["dump"] == dump and run["dump_path"] == str(beside / dump_path.name)
    assert run["scales"] == json.loads(scales.read_text())
    assert run["results"]["results"]["floatsim_lambada"] == results["results"]["floatsim_lambada"]


def test_switch_mode_requantizes_with_the_same_scales_into_a_fresh_run(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    lm = floatsim(hf_folder, tmp_path, mode="fp", scales=scales, batch_size=4)
    sections = {}
    for mode, divisor in (("int8", None), ("same", None), ("better", 8)):
        lm.switch_mode(mode, divisor=divisor)
        sections[mode] = evaluate(lm, task_manager, tasks=["floatsim_lambada"])["config"]["floatsim"]
    expected_count = sum(len(inputs) for inputs in lambada_inputs()) * D_INNER
    for mode, section in sections.items():
        assert section["mode"] == mode
        assert section["scales_sha256"] == json.loads(scales.read_text())["sha256"]
        assert [layer["count"] for layer in section["layers"]] == [expected_count] * N_LAYER  # not accumulated
    assert sorted(path.name for path in tmp_path.glob("*.json")) == sorted(
        dumps.dump_filename(mode, 8) for mode in ("int8", "same", "better")
    )
    int8 = json.loads((tmp_path / "int8_baseline.json").read_text())
    same = json.loads((tmp_path / "floatsim_samescale.json").read_text())
    for int8_layer, same_layer in zip(int8["layers"], same["layers"]):
        assert max(abs(a - b) for a, b in zip(int8_layer["codes"], same_layer["codes"])) <= 1
    with pytest.raises(ArgumentError, match="mode='int4'"):
        lm.switch_mode("int4")


def test_switch_mode_from_fp_without_scales_calibrates(model_files, task_manager, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    hf_folder, _, _, _ = model_files
    lm = floatsim(hf_folder, tmp_path, mode="fp", calib_data=str(DOCS), calib_samples=3, calib_seqlen=32)
    assert lm.scales is None
    lm.switch_mode("int8")
    assert lm.scales is not None and lm.scales.settings["calib_samples"] == 3
    assert lm.model.spec.mode == "int8" and lm.model.scales == lm.scales.layers


def test_sampling_settings_are_reported_and_decoding_stays_greedy(model_files, tmp_path, caplog):
    hf_folder, _, _, _ = model_files
    lm = floatsim(hf_folder, tmp_path, mode="fp")
    context = torch.tensor([list(b"The sky is")])
    greedy = lm._model_generate(context, max_length=context.shape[1] + 4, stop=["."], do_sample=False, temperature=0.0)
    with caplog.at_level("WARNING", logger="lm_eval"):
        sampled = lm._model_generate(context, max_length=context.shape[1] + 4, stop=["."], do_sample=True, temperature=0.7)
    assert torch.equal(sampled, greedy)
    assert "decodes greedily" in caplog.text and "temperature" in caplog.text


def test_an_uncaught_user_error_prints_one_line(capsys, monkeypatch):
    import sys

    from lm_eval_floatsim.lm_eval_patches import install_one_line_user_errors

    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)  # as a fresh process has it
    install_one_line_user_errors()  # what constructing a FloatSimLM does first
    sys.excepthook(ArgumentError, ArgumentError("mode", "int4", "one of fp"), None)
    assert capsys.readouterr().err == "mamba_floatsim: error: mode='int4' is not allowed: expected one of fp\n"


def test_importing_the_model_leaves_sys_excepthook_alone(tmp_path):
    import sys

    check = "import sys; h = sys.excepthook; import lm_eval_floatsim.lm_model; assert sys.excepthook is h"
    done = subprocess.run([sys.executable, "-c", check], env=subprocess_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


# --- end to end: the lm_eval console script, every mode ----------------------------------------------


@pytest.fixture(scope="module")
def console_runs(model_files, tmp_path_factory):
    """One `lm_eval` run per mode, all started at once; the shared dump_dir and output folder."""
    hf_folder, _, scales, _ = model_files
    work = tmp_path_factory.mktemp("console")
    env = subprocess_env(work)
    processes = {}
    for mode in MODES:
        arguments = model_args(pretrained=hf_folder, mode=mode, scales=scales, dump_dir=work / "dumps")
        command = [
            console_script("lm_eval"), "--model", "mamba_floatsim", "--model_args", arguments,
            "--include_path", str(TASKS_DIR), "--tasks", ",".join(TASK_NAMES), "--limit", "6",
            "--batch_size", "4", "--device", "cpu", "--output_path", str(work / "out" / mode),
        ]
        processes[mode] = subprocess.Popen(command, env=env, cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    outputs = {mode: process.communicate(timeout=600)[0] for mode, process in processes.items()}
    for mode, process in processes.items():
        assert process.returncode == 0, outputs[mode][-3000:]
    return work


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs_through_the_lm_eval_command(console_runs, model_files, mode):
    _, _, scales, _ = model_files
    dump_path = console_runs / "dumps" / dumps.dump_filename(mode, 2025)
    dump = dumps.read_dump(dump_path)
    assert dump["config"]["mode"] == mode
    assert [layer["layer_idx"] for layer in dump["layers"]] == list(range(N_LAYER))
    [results_path] = (console_runs / "out" / mode).rglob("results_*.json")
    results = json.loads(results_path.read_text())
    assert set(results["results"]) == set(TASK_NAMES)
    section = results["config"]["floatsim"]
    assert section["mode"] == mode and section["dump_file"] == str(dump_path)
    assert all(layer["count"] > 0 for layer in section["layers"])
    beside = results_path.parent / f"floatsim_{results_path.stem.removeprefix('results_')}"
    assert json.loads((beside / dump_path.name).read_text()) == dump
    assert (beside / scales.name).is_file()


def test_the_dump_folder_of_all_modes_passes_the_users_checks(console_runs):
    from lm_eval_floatsim.checks import run_checks

    assert sorted(path.name for path in (console_runs / "dumps").iterdir()) == sorted(
        dumps.dump_filename(mode, 2025) for mode in MODES
    )
    failed = [(result.name, result.detail) for result in run_checks(console_runs / "dumps") if not result.ok]
    assert failed == []


def test_dtype_auto_runs_float32_on_the_cpu_with_the_same_responses(model_files, task_manager, tmp_path):
    hf_folder, _, scales, _ = model_files
    auto = floatsim(hf_folder, tmp_path / "auto", mode="int8", scales=scales, dtype="auto")
    assert auto.model.dtype == torch.float32  # lm-eval's mamba_ssm convention: float16 on CUDA only
    default = floatsim(hf_folder, tmp_path / "default", mode="int8", scales=scales)
    tasks = ("floatsim_lambada",)
    assert responses(evaluate(auto, task_manager, tasks), tasks[0]) == responses(evaluate(default, task_manager, tasks), tasks[0])
