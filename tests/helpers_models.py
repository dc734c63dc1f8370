"""Small random Mamba checkpoints on disk, laid out exactly as the hub's, for tests.

The reference is always transformers' MambaForCausalLM: a test builds one with random weights,
writes it in the layout under test, loads the folder with the package and compares against the
transformers model it started from.

- `make_checkpoint(folder, layout, weights)`: the one-call version (random model + tokenizer).
- `random_hf_model`, `save_transformers_layout`, `save_mamba_ssm_layout`, `save_tokenizer`: the parts.

Layouts: "mamba_ssm" (state-spaces/mamba-130m: config.json with d_model/n_layer/ssm_cfg,
`backbone.embedding.weight`, unpadded vocab_size in the config) and "transformers"
(state-spaces/mamba-130m-hf: config.json with model_type "mamba", `backbone.embeddings.weight`).
Weights: "safetensors", "bin" (torch.save) or "sharded" (two safetensors shards + index).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

EOS_TOKEN = "<|endoftext|>"
TOKENIZER_VOCAB = 257  # 256 byte tokens + EOS
PADDED_VOCAB = 264  # TOKENIZER_VOCAB padded to a multiple of 8, as mamba_ssm pads it
LAYOUTS = ("mamba_ssm", "transformers")
WEIGHT_FORMATS = ("safetensors", "bin", "sharded")


def hf_config(
    hidden_size: int = 32,
    num_hidden_layers: int = 2,
    vocab_size: int = PADDED_VOCAB,
    state_size: int = 8,
    conv_kernel: int = 4,
    expand: int = 2,
    initializer_range: float = 0.02,
    **overrides,
):
    """A transformers MambaConfig; the defaults make a model of a few hundred kB.

    initializer_range 0.02 (GPT-style, as trained checkpoints' weights are scaled) instead of
    transformers' 0.1: with 0.1 a random 24-layer model's residual stream grows to hundreds and its
    own fp32 forward drifts 4e-5 from its fp64 forward, which no fp32 parity test could tolerate.
    """
    from transformers import MambaConfig as HFMambaConfig

    return HFMambaConfig(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        state_size=state_size,
        conv_kernel=conv_kernel,
        expand=expand,
        initializer_range=initializer_range,
        **overrides,
    )


@torch.no_grad()
def random_hf_model(config, seed: int = 0):
    """MambaForCausalLM, FalconMambaForCausalLM or Mamba2ForCausalLM (by the config's model_type;
    fp32, eval) with random weights, every parameter kind moved off its default.

    transformers initializes A_log, D, the norms and the conv bias to structured constants; a loader
    that dropped or swapped one of them would go unnoticed, so each gets random values here.
    """
    from transformers import FalconMambaForCausalLM, Mamba2ForCausalLM, MambaForCausalLM

    torch.manual_seed(seed)
    classes = {"mamba": MambaForCausalLM, "falcon_mamba": FalconMambaForCausalLM, "mamba2": Mamba2ForCausalLM}
    model = classes[config.model_type](config).eval()
    for layer in model.backbone.layers:
        mixer = layer.mixer
        mixer.A_log.add_(0.3 * torch.randn_like(mixer.A_log))
        mixer.D.copy_(torch.randn_like(mixer.D))
        if mixer.conv1d.bias is not None:
            mixer.conv1d.bias.copy_(0.1 * torch.randn_like(mixer.conv1d.bias))
        layer.norm.weight.copy_(1 + 0.1 * torch.randn_like(layer.norm.weight))
        if config.model_type == "mamba2":  # the gated RMSNorm and dt's bias
            mixer.norm.weight.copy_(1 + 0.1 * torch.randn_like(mixer.norm.weight))
            mixer.dt_bias.copy_(torch.randn_like(mixer.dt_bias) - 3)
    model.backbone.norm_f.weight.copy_(1 + 0.1 * torch.randn_like(model.backbone.norm_f.weight))
    return model


def save_transformers_layout(model, folder, weights: str = "safetensors", include_lm_head: bool = True) -> Path:
    """config.json as transformers writes it, weights under transformers' names."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(folder)
    state = _cloned_state(model)
    if not include_lm_head:
        state.pop("lm_head.weight")
    _save_weights(state, folder, weights)
    return folder


def save_mamba_ssm_layout(
    model,
    folder,
    weights: str = "safetensors",
    vocab_size: Optional[int] = None,
    pad_vocab_size_multiple: int = 8,
    include_lm_head: bool = True,
) -> Path:
    """config.json as mamba_ssm writes it (vocab_size unpadded), weights under mamba_ssm's names.

    `vocab_size` is what the config states (default: the model's rows); the embedding keeps its rows,
    which must equal vocab_size padded to `pad_vocab_size_multiple`.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config
    ssm_cfg = {"d_state": config.state_size, "d_conv": config.conv_kernel, "expand": config.expand}
    if config.model_type == "mamba2":  # mamba_ssm's Mamba2 layer (gated-norm eps 1e-5, as transformers' default)
        ssm_cfg.update(layer="Mamba2", headdim=config.head_dim, ngroups=config.n_groups)
    elif int(config.time_step_rank) != -(-config.hidden_size // 16):
        ssm_cfg["dt_rank"] = int(config.time_step_rank)
    if not config.use_conv_bias:
        ssm_cfg["conv_bias"] = False
    if config.use_bias:
        ssm_cfg["bias"] = True
    mamba_config = {
        "d_model": config.hidden_size,
        "n_layer": config.num_hidden_layers,
        "vocab_size": config.vocab_size if vocab_size is None else vocab_size,
        "ssm_cfg": ssm_cfg,
        "rms_norm": True,
        "residual_in_fp32": config.residual_in_fp32,
        "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_vocab_size_multiple,
    }
    (folder / "config.json").write_text(json.dumps(mamba_config, indent=2), encoding="utf-8")
    state = _cloned_state(model)
    state["backbone.embedding.weight"] = state.pop("backbone.embeddings.weight")
    if not include_lm_head:
        state.pop("lm_head.weight")
    _save_weights(state, folder, weights)
    return folder


def _cloned_state(model) -> dict[str, torch.Tensor]:
    # safetensors refuses tensors that share storage (the tied lm_head); the hub's files hold copies.
    return {key: tensor.detach().clone().contiguous() for key, tensor in model.state_dict().items()}


def _save_weights(state: dict[str, torch.Tensor], folder: Path, weights: str) -> None:
    from safetensors.torch import save_file

    if weights == "bin":
        torch.save(state, folder / "pytorch_model.bin")
    elif weights == "safetensors":
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    elif weights == "sharded":
        keys = sorted(state)
        halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
        weight_map = {}
        for name, shard_keys in halves.items():
            save_file({k: state[k] for k in shard_keys}, str(folder / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard_keys})
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    else:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_FORMATS}")


def save_tokenizer(folder):
    """A byte-level tokenizer (256 byte tokens + EOS, no merges): any text, no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    vocab[EOS_TOKEN] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, bos_token=EOS_TOKEN)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def make_checkpoint(folder, layout: str = "mamba_ssm", weights: str = "safetensors", seed: int = 0, tokenizer: bool = True, **config):
    """A random checkpoint folder (plus the byte tokenizer) and the MambaForCausalLM it holds.

    `config` overrides `hf_config`'s arguments. With the default vocabulary the mamba_ssm layout
    states vocab_size 257 (padded to 264 on load) and the transformers layout 264.
    """
    model = random_hf_model(hf_config(**config), seed=seed)
    if layout == "mamba_ssm":
        vocab = TOKENIZER_VOCAB if model.config.vocab_size == PADDED_VOCAB else None
        save_mamba_ssm_layout(model, folder, weights, vocab_size=vocab)
    elif layout == "transformers":
        save_transformers_layout(model, folder, weights)
    else:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if tokenizer:
        save_tokenizer(folder)
    return Path(folder), model


def statistics_recorder(model):
    """A Recorder of the model's layers, on its device, past its snapshot batch: forwards only
    add to its statistics."""
    from lm_eval_floatsim.recorder import Recorder

    recorder = Recorder(model.config.n_layer, device=model.device)
    recorder.arm()
    for layer in range(model.config.n_layer):
        recorder.keep_values(layer, None, None, None)
    return recorder
