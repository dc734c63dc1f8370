"""Checkpoint loading: both layouts and weight formats load into MambaLM and match transformers.

Parity metric: rel = max|ours - ref| / max|ref| over all logits. Normalizing by the largest logit
makes it independent of the random model's scale, and the max catches a single wrong position.
Both models compute the same fp32 arithmetic in a different order (F.conv1d vs. tap by tap, scan
reductions), so each op differs by a few float32 ulps (eps = 1.2e-7) and the differences compound
over the layers; 1e-5 leaves room for ~100 ulps, while a wrong or missing weight, a bias dropped or a
shifted conv window changes the logits by 1e-2 or more.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers_models import (  # noqa: E402
    PADDED_VOCAB,
    TOKENIZER_VOCAB,
    hf_config,
    make_checkpoint,
    random_hf_model,
    save_mamba_ssm_layout,
    save_transformers_layout,
)
from lm_eval_floatsim.errors import ArgumentError, InputError  # noqa: E402
from lm_eval_floatsim.loading import (  # noqa: E402
    DEFAULT_TOKENIZER,
    load_pretrained,
    load_tokenizer,
    resolve_dtype,
    resolve_model_dir,
)
from lm_eval_floatsim.mamba import MambaLM  # noqa: E402

PARITY = 1e-5


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def reference_logits(hf_model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids, use_cache=False).logits


def our_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids)


def random_ids(vocab: int, batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "layout, weights",
    [
        ("mamba_ssm", "bin"),
        ("mamba_ssm", "safetensors"),
        ("transformers", "safetensors"),
        ("transformers", "bin"),
        ("transformers", "sharded"),
    ],
)
def test_small_checkpoint_matches_transformers(tmp_path, layout, weights):
    folder, reference = make_checkpoint(tmp_path / "ckpt", layout, weights, num_hidden_layers=3)
    model = load_pretrained(folder)
    ids = random_ids(TOKENIZER_VOCAB, batch=3, length=17)
    assert relative_error(our_logits(model, ids), reference_logits(reference, ids)) < PARITY


@pytest.mark.parametrize("layout", ["mamba_ssm", "transformers"])
def test_checkpoint_without_lm_head_ties_it_to_the_embedding(tmp_path, layout):
    reference = random_hf_model(hf_config(), seed=3)
    save = save_mamba_ssm_layout if layout == "mamba_ssm" else save_transformers_layout
    folder = save(reference, tmp_path / "ckpt", include_lm_head=False)
    model = load_pretrained(folder)
    assert model.lm_head.weight is model.backbone.embedding.weight
    ids = random_ids(TOKENIZER_VOCAB, batch=2, length=9)
    assert relative_error(our_logits(model, ids), reference_logits(reference, ids)) < PARITY


@pytest.fixture(scope="module")
def mamba_130m_shaped(tmp_path_factory):
    """A random model with mamba-130m's exact shapes, written in both layouts as the hub holds them."""
    root = tmp_path_factory.mktemp("mamba130m")
    reference = random_hf_model(hf_config(hidden_size=768, num_hidden_layers=24, vocab_size=50280, state_size=16))
    original = save_mamba_ssm_layout(reference, root / "mamba-130m", "bin", vocab_size=50277)
    converted = save_transformers_layout(reference, root / "mamba-130m-hf", "safetensors")
    return reference, original, converted


def test_mamba_130m_shapes_match_transformers_in_both_layouts(mamba_130m_shaped):
    reference, original, converted = mamba_130m_shaped
    ids = random_ids(50277, batch=1, length=5)
    expected = reference_logits(reference, ids)
    for folder in (original, converted):
        model = load_pretrained(folder)
        assert model.config.n_layer == 24 and model.config.d_model == 768
        assert relative_error(our_logits(model, ids), expected) < PARITY, folder.name
        del model


def test_mamba_ssm_vocabulary_is_padded_to_the_multiple(mamba_130m_shaped):
    _, original, _ = mamba_130m_shaped
    assert json.loads((original / "config.json").read_text())["vocab_size"] == 50277
    model = load_pretrained(original)
    assert model.config.vocab_size == 50277
    assert model.config.padded_vocab_size == 50280
    assert model.backbone.embedding.weight.shape == (50280, 768)
    assert our_logits(model, torch.tensor([[0, 50276]])).shape == (1, 2, 50280)


def test_small_vocabulary_padding(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm")
    assert json.loads((folder / "config.json").read_text())["vocab_size"] == TOKENIZER_VOCAB
    assert load_pretrained(folder).config.padded_vocab_size == PADDED_VOCAB


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_loads_in_that_dtype_with_fp32_ssm_parameters(tmp_path, dtype):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "transformers")
    model = load_pretrained(folder, dtype=dtype)
    mixer = model.backbone.layers[0].mixer
    assert mixer.in_proj.weight.dtype == getattr(torch, dtype)
    assert model.lm_head.weight.dtype == getattr(torch, dtype)
    assert mixer.A_log.dtype == torch.float32 and mixer.D.dtype == torch.float32  # as mamba_ssm keeps them


def test_dtype_values():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda:0") == torch.float16
    assert resolve_dtype("bfloat16") == torch.bfloat16
    with pytest.raises(ArgumentError, match="dtype='float64' is not allowed"):
        resolve_dtype("float64")


def test_loaded_model_is_for_inference(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm")
    model = load_pretrained(folder)
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


# --- errors: each is one line naming the file (or argument) and the problem ---------------------


def one_line_error(error_type, call, *args, **kwargs) -> str:
    with pytest.raises(error_type) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_missing_local_folder_is_an_argument_error(tmp_path):
    message = one_line_error(ArgumentError, load_pretrained, str(tmp_path / "no-such-model"))
    assert message.startswith("pretrained=") and "existing folder" in message


def test_a_file_is_not_a_checkpoint_folder(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"")
    assert "pretrained=" in one_line_error(ArgumentError, load_pretrained, str(path))


def write_config(folder, config: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")


def mamba2_config(**overrides):
    from transformers import Mamba2Config

    options = dict(hidden_size=32, num_hidden_layers=3, vocab_size=PADDED_VOCAB, state_size=8, head_dim=16, num_heads=4,
                   n_groups=2, expand=2, initializer_range=0.02, chunk_size=8, tie_word_embeddings=True)
    return Mamba2Config(**{**options, **overrides})


@pytest.mark.parametrize("layout, weights", [("transformers", "safetensors"), ("transformers", "sharded"), ("mamba_ssm", "safetensors")])
def test_a_mamba2_checkpoint_matches_transformers(tmp_path, layout, weights):
    """Mamba-2 (heads sharing their group's B and C, the gated RMSNorm per group) in both layouts:
    transformers' Mamba2ForCausalLM (its PyTorch path) is the reference."""
    reference = random_hf_model(mamba2_config())
    if layout == "transformers":
        folder = save_transformers_layout(reference, tmp_path / "m2", weights)
    else:
        folder = save_mamba_ssm_layout(reference, tmp_path / "m2", weights, vocab_size=TOKENIZER_VOCAB)
    model = load_pretrained(folder)
    assert (model.config.mixer, model.config.headdim, model.config.ngroups, model.config.conv_dim) == ("Mamba2", 16, 2, 64 + 2 * 2 * 8)
    ids = random_ids(TOKENIZER_VOCAB, batch=3, length=17)
    assert relative_error(our_logits(model, ids)[..., :PADDED_VOCAB], reference_logits(reference, ids)) < PARITY


@pytest.mark.parametrize(
    "ssm_cfg, problem",
    [({"layer": "Mamba2", "norm_before_gate": True}, "norm_before_gate"), ({"layer": "Mamba2", "d_ssm": 32}, "d_ssm"),
     ({"layer": "Mamba2", "headdim": 48}, "heads do not fit"), ({"layer": "Mamba3"}, "'Mamba3' is not supported")],
)
def test_mamba2_options_this_package_does_not_compute_are_refused(tmp_path, ssm_cfg, problem):
    write_config(tmp_path / "m2", {"d_model": 64, "n_layer": 2, "vocab_size": 100, "ssm_cfg": ssm_cfg})
    message = one_line_error(InputError, load_pretrained, tmp_path / "m2")
    assert problem in message and "config.json" in message


@pytest.mark.parametrize("weights", ["safetensors", "sharded"])
def test_a_falcon_mamba_checkpoint_written_by_transformers_matches_transformers(tmp_path, weights):
    """FalconMamba has Mamba-1's weight names and config keys; only its mixer's normalisation of dt,
    B and C tells it apart: without it the logits were off by 0.8 of 5.7."""
    from transformers import FalconMambaConfig

    config = FalconMambaConfig(hidden_size=32, num_hidden_layers=3, vocab_size=PADDED_VOCAB, state_size=8,
                               initializer_range=0.02, mixer_rms_eps=1e-5)
    reference = random_hf_model(config)
    folder = save_transformers_layout(reference, tmp_path / "falcon", weights)
    model = load_pretrained(folder)
    assert model.config.mixer == "FalconMamba" and model.config.mixer_rms_eps == 1e-5
    assert type(model.backbone.layers[0].mixer).__name__ == "FalconMambaMixer"
    ids = random_ids(TOKENIZER_VOCAB, batch=3, length=17)
    assert relative_error(our_logits(model, ids), reference_logits(reference, ids)) < PARITY
    as_mamba = MambaLM(dataclasses.replace(model.config, mixer="Mamba1"))
    as_mamba.load_state_dict(model.state_dict())
    assert relative_error(our_logits(as_mamba, ids), reference_logits(reference, ids)) > 100 * PARITY  # the test can tell


@pytest.mark.parametrize(
    "config_class",
    ["JambaConfig", "ZambaConfig", "Zamba2Config", "BambaConfig", "NemotronHConfig", "FalconH1Config",
     "GraniteMoeHybridConfig"],
)
def test_hybrid_configs_written_by_transformers_are_refused_by_model_type(tmp_path, config_class):
    import transformers

    config = getattr(transformers, config_class)()
    config.save_pretrained(tmp_path / "model")
    message = one_line_error(InputError, load_pretrained, tmp_path / "model")
    assert f"model_type {config.model_type!r} is not supported yet" in message


def test_revision_of_a_local_folder_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    message = one_line_error(ArgumentError, load_pretrained, folder, revision="main")
    assert message.startswith("revision='main' is not allowed: expected no revision")


def test_mamba2_weights_under_a_mamba1_config_are_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    state["backbone.layers.0.mixer.dt_bias"] = torch.zeros(64)
    save_file(state, str(folder / "model.safetensors"))
    message = one_line_error(InputError, load_pretrained, folder)
    assert "Mamba-2 weights" in message and "dt_bias" in message and "Mamba1" in message


def test_other_architecture_is_refused(tmp_path):
    write_config(tmp_path / "gpt2", {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257})
    message = one_line_error(InputError, load_pretrained, tmp_path / "gpt2")
    assert "config.json" in message and "not a Mamba checkpoint" in message and "gpt2" in message


def test_missing_config_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    (folder / "config.json").unlink()
    assert "config.json: missing" in one_line_error(InputError, load_pretrained, folder)


def test_missing_weights_are_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "transformers", tokenizer=False)
    (folder / "model.safetensors").unlink()
    assert "no weights found" in one_line_error(InputError, load_pretrained, folder)


def test_missing_shard_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "transformers", "sharded", tokenizer=False)
    (folder / "model-00002-of-00002.safetensors").unlink()
    message = one_line_error(InputError, load_pretrained, folder)
    assert "model-00002-of-00002.safetensors: missing" in message


def test_missing_tensor_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", "bin", tokenizer=False)
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["backbone.layers.1.mixer.x_proj.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    message = one_line_error(InputError, load_pretrained, folder)
    assert "pytorch_model.bin" in message and "missing" in message and "layers.1.mixer.x_proj.weight" in message


def test_shapes_that_disagree_with_the_config_are_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    config["ssm_cfg"]["d_state"] = 4  # the weights were made with d_state 8
    write_config(folder, config)
    message = one_line_error(InputError, load_pretrained, folder)
    assert "model.safetensors" in message and "has shape" in message and "config.json implies" in message


def test_vocabulary_that_pads_to_other_rows_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    config = json.loads((folder / "config.json").read_text())
    config["pad_vocab_size_multiple"] = 16  # 257 -> 272 rows, the file holds 264
    write_config(folder, config)
    message = one_line_error(InputError, load_pretrained, folder)
    assert "backbone.embedding.weight has shape [264, 32]" in message


def test_corrupt_weight_file_is_refused(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", "bin", tokenizer=False)
    (folder / "pytorch_model.bin").write_bytes(b"not a checkpoint")
    message = one_line_error(InputError, load_pretrained, folder)
    assert "pytorch_model.bin: not a readable weight file" in message


def test_bad_json_config_is_refused(tmp_path):
    write_config(tmp_path / "bad", {})
    (tmp_path / "bad" / "config.json").write_text("{not json", encoding="utf-8")
    assert "not readable JSON" in one_line_error(InputError, load_pretrained, tmp_path / "bad")


# --- hub ids: resolved through the normal Hugging Face cache -------------------------------------


@pytest.fixture
def offline_hub_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def cache_snapshot(cache, repo_id: str, source) -> None:
    """Place a checkpoint in the cache as snapshot_download leaves it: refs/main -> snapshots/<commit>."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def test_hub_id_resolves_through_the_cache(tmp_path, offline_hub_cache):
    source, reference = make_checkpoint(tmp_path / "src", "mamba_ssm")
    cache_snapshot(offline_hub_cache, "someone/tiny-mamba", source)
    folder = resolve_model_dir("someone/tiny-mamba")
    assert folder.is_relative_to(offline_hub_cache) and (folder / "config.json").is_file()
    ids = random_ids(TOKENIZER_VOCAB, batch=1, length=6)
    model = load_pretrained("someone/tiny-mamba")
    assert relative_error(our_logits(model, ids), reference_logits(reference, ids)) < PARITY
    assert load_tokenizer("someone/tiny-mamba").eos_token == "<|endoftext|>"


def test_unavailable_hub_id_is_one_line(offline_hub_cache):
    message = one_line_error(InputError, load_pretrained, "someone/not-cached")
    assert message.startswith("someone/not-cached: not a local folder")
    assert "offline mode is on (HF_HUB_OFFLINE) and the files are not in the local cache" in message


# --- tokenizers ------------------------------------------------------------------------------------


def test_folder_tokenizer_is_used_with_pad_set_to_eos(tmp_path):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm")
    tokenizer = load_tokenizer(folder)
    assert tokenizer.pad_token == tokenizer.eos_token == "<|endoftext|>"
    assert max(tokenizer("héllo, wörld")["input_ids"]) < TOKENIZER_VOCAB


def test_default_tokenizer_is_gpt_neox_when_the_folder_has_none(tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    requested = []

    class Stub:
        pad_token, eos_token = None, "<|endoftext|>"

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: requested.append(name) or Stub())
    tokenizer = load_tokenizer(folder)
    assert requested == [DEFAULT_TOKENIZER] and tokenizer.pad_token == "<|endoftext|>"
    load_tokenizer(folder, tokenizer="some/other-tokenizer")
    assert requested[-1] == "some/other-tokenizer"


def test_unloadable_tokenizer_is_one_line(tmp_path, offline_hub_cache):
    folder, _ = make_checkpoint(tmp_path / "ckpt", "mamba_ssm", tokenizer=False)
    message = one_line_error(InputError, load_tokenizer, folder, tokenizer="someone/no-such-tokenizer")
    assert message.startswith("tokenizer someone/no-such-tokenizer: could not be loaded")
