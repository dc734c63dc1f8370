"""Checkpoints -> MambaLM: a hub id or a local folder, in mamba_ssm's layout or transformers' layout.

- mamba_ssm (state-spaces/mamba-130m): config.json with d_model, n_layer, ssm_cfg, ...; weights
  under mamba_ssm's names (`backbone.embedding.weight`), vocabulary padded to a multiple of
  pad_vocab_size_multiple.
- transformers MambaForCausalLM (state-spaces/mamba-130m-hf): config.json with model_type "mamba",
  hidden_size, num_hidden_layers, ...; weights as transformers names them
  (`backbone.embeddings.weight`), vocabulary used as the config gives it. FalconMambaForCausalLM
  (tiiuae/falcon-mamba-7b, model_type "falcon_mamba") the same, with mixer_rms_eps.

Weights come from model.safetensors, pytorch_model.bin, or their sharded forms (*.index.json).
Every problem with a checkpoint is an InputError naming the file and the problem, in one line.
Mamba-2 loads from both layouts (mamba_ssm's ssm_cfg.layer "Mamba2", transformers' model_type
"mamba2"). Checkpoints of other models, hybrids such as Jamba or Zamba included, are refused by
their model type: loaded as Mamba-1 they would run, wrongly.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Optional, Union

import torch

from .errors import ArgumentError, InputError
from .mamba import MambaConfig, MambaLM

DEFAULT_TOKENIZER = "EleutherAI/gpt-neox-20b"  # what lm-eval's mamba_ssm model uses for these checkpoints
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

CONFIG_FILE = "config.json"
SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PYTORCH_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# Tensors that mamba_ssm keeps in fp32 whatever the model dtype: the SSM's decay and skip terms.
FP32_PARAMETERS = re.compile(r"\.mixer\.(A_log|D|dt_bias)$")
MAMBA2_KEYS = re.compile(r"\.mixer\.(norm\.weight|dt_bias)$")


def resolve_model_dir(pretrained: Union[str, Path], revision: Optional[str] = None) -> Path:
    """The local folder of a checkpoint: `pretrained` itself, or its hub snapshot (at `revision`, a
    branch, tag or commit; the default branch when None) in the HF cache."""
    path = Path(pretrained).expanduser()
    if path.is_dir():
        refuse_revision_of_folder(pretrained, revision)
        return path
    if path.exists() or not _is_hub_id(str(pretrained)):
        raise ArgumentError("pretrained", str(pretrained), "a hub id or an existing folder holding config.json and weights")
    return _download(str(pretrained), revision)


def refuse_revision_of_folder(pretrained: Union[str, Path], revision: Optional[str]) -> None:
    """A revision names a version of a hub repository; a local folder has only the one it holds."""
    if revision is not None and Path(pretrained).expanduser().is_dir():
        raise ArgumentError("revision", revision, f"no revision: pretrained={pretrained} is a local folder, not a hub id")


def model_label(pretrained: Union[str, Path], revision: Optional[str] = None) -> str:
    """How dumps, results and scales files name a checkpoint: `pretrained`, `@revision` when one was chosen."""
    return f"{pretrained}@{revision}" if revision is not None else str(pretrained)


def _is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _download(repo_id: str, revision: Optional[str]) -> Path:
    """Config, tokenizer and one weight format (safetensors when the repo has them, else .bin)."""
    common = [CONFIG_FILE, *TOKENIZER_FILES]
    folder = _snapshot(repo_id, revision, common + ["model*.safetensors", "model.safetensors.index.json"])
    if not _weight_files(folder):
        folder = _snapshot(repo_id, revision, common + ["pytorch_model*.bin", "pytorch_model.bin.index.json"])
    return folder


def _snapshot(repo_id: str, revision: Optional[str], patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # not found, gated, offline and not cached, network down: all the user's to fix
        at = f" at revision {revision!r}" if revision is not None else ""
        raise InputError(
            f"{repo_id}{at}: not a local folder, and the Hugging Face Hub did not provide it ({_hub_reason(error)})"
        ) from error


def _hub_reason(error: Exception) -> str:
    """huggingface_hub's error as one line that says what to do; its own first line is an HTTP status."""
    from huggingface_hub import constants, errors

    unreachable = "offline mode is on (HF_HUB_OFFLINE)" if constants.HF_HUB_OFFLINE else "the hub could not be reached"
    reasons = (  # most specific first: a gated repository is also "not found"
        (errors.GatedRepoError, "the repository is gated: accept its terms on the hub, then log in with `hf auth login`"),
        (errors.RepositoryNotFoundError, "no such repository, or a private one: check the id, or log in with `hf auth login`"),
        (errors.RevisionNotFoundError, "no such branch, tag or commit in the repository"),
        ((errors.OfflineModeIsEnabled, errors.LocalEntryNotFoundError), f"{unreachable} and the files are not in the local cache"),
    )
    for kind, reason in reasons:
        if isinstance(error, kind):
            return f"{type(error).__name__}: {reason}"
    return _one_line(error)


def _one_line(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def resolve_dtype(dtype: Union[str, torch.dtype], device: Union[str, torch.device] = "cpu") -> torch.dtype:
    """"float32" | "float16" | "bfloat16" | "auto" (float16 on CUDA, float32 elsewhere)."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    if dtype in DTYPES:
        return DTYPES[dtype]
    raise ArgumentError("dtype", dtype, "one of " + ", ".join([*DTYPES, "auto"]))


def load_pretrained(
    pretrained: Union[str, Path],
    dtype: Union[str, torch.dtype] = "float32",
    device: Union[str, torch.device] = "cpu",
    revision: Optional[str] = None,
) -> MambaLM:
    """A MambaLM in eval mode with the checkpoint's weights, in `dtype` on `device` (A_log, D in fp32)."""
    torch_dtype = resolve_dtype(dtype, device)
    folder = resolve_model_dir(pretrained, revision)
    config, layout = read_config(folder)
    stored, source = read_weights(folder)
    state_dict = to_mamba_ssm_names(stored, layout, config, source)
    with torch.device("meta"):
        model = MambaLM(config)
    check_state_dict(model, state_dict, source)
    weights = _cast(state_dict, torch_dtype)
    if config.tie_embeddings:
        weights["lm_head.weight"] = weights["backbone.embedding.weight"]
    model.load_state_dict(weights, assign=True)
    model.tie_weights()
    return model.to(device).eval().requires_grad_(False)


def _cast(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {
        key: tensor.float() if FP32_PARAMETERS.search(key) else tensor.to(dtype) for key, tensor in state_dict.items()
    }


def read_config(folder: Path) -> tuple[MambaConfig, str]:
    """The checkpoint's MambaConfig and its layout, "mamba_ssm" or "transformers"."""
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing (a Mamba checkpoint folder holds config.json and its weights)")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"{path}: not readable JSON ({_one_line(error)})") from error
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a JSON object")
    ssm_cfg = raw.get("ssm_cfg") or {}
    _refuse_other_models(raw, ssm_cfg, path)
    try:
        if raw.get("model_type") in TRANSFORMERS_MIXERS or "hidden_size" in raw:
            return _transformers_config(raw, path), "transformers"
        if "d_model" in raw:
            return _mamba_ssm_config(raw, ssm_cfg, path), "mamba_ssm"
    except (KeyError, TypeError, ValueError) as error:
        raise InputError(f"{path}: not a usable Mamba config ({_one_line(error)})") from error
    kind = raw.get("model_type") or raw.get("architectures") or "unknown"
    raise InputError(f"{path}: not a Mamba checkpoint (model_type {kind!r}; expected mamba_ssm's or model_type 'mamba')")


# Model types that share Mamba's names or config keys and would otherwise load as Mamba-1.
OTHER_FAMILY_MODELS = {
    "jamba": "Jamba: a hybrid of Mamba and attention layers",
    "zamba": "Zamba: a hybrid of Mamba and shared attention layers",
    "zamba2": "Zamba2: a hybrid of Mamba-2 and shared attention layers",
    "bamba": "Bamba: a hybrid of Mamba-2 and attention layers",
    "falcon_h1": "Falcon-H1: a hybrid of Mamba-2 and attention layers",
    "nemotron_h": "Nemotron-H: a hybrid of Mamba-2 and attention layers",
    "granitemoehybrid": "Granite 4.0: a hybrid of Mamba-2 and attention layers",
}
SUPPORTED = ("mamba, falcon_mamba and mamba2 (transformers' MambaForCausalLM, FalconMambaForCausalLM, Mamba2ForCausalLM) "
             "or mamba_ssm's layout with a Mamba1 or Mamba2 layer")
# transformers' model types this package loads, and the mixer each has (mamba.MIXERS).
TRANSFORMERS_MIXERS = {"mamba": "Mamba1", "falcon_mamba": "FalconMamba", "mamba2": "Mamba2"}
MAMBA_SSM_MIXERS = ("Mamba1", "Mamba2")


def _refuse_other_models(raw: dict, ssm_cfg, path: Path) -> None:
    model_type = raw.get("model_type")
    if model_type in OTHER_FAMILY_MODELS:
        raise InputError(
            f"{path}: model_type {model_type!r} is not supported yet ({OTHER_FAMILY_MODELS[model_type]}); supported: {SUPPORTED}"
        )
    if model_type is not None and model_type not in TRANSFORMERS_MIXERS:
        raise InputError(f"{path}: not a Mamba checkpoint (model_type {model_type!r}); supported: {SUPPORTED}")
    layer = ssm_cfg.get("layer", "Mamba1") if isinstance(ssm_cfg, dict) else "Mamba1"
    if layer not in MAMBA_SSM_MIXERS:
        raise InputError(f"{path}: ssm_cfg.layer {layer!r} is not supported; supported: {SUPPORTED}")


def _mamba_ssm_config(raw: dict, ssm_cfg, path: Path) -> MambaConfig:
    if not isinstance(ssm_cfg, dict):
        raise InputError(f"{path}: ssm_cfg must be an object, found {ssm_cfg!r}")
    if raw.get("attn_layer_idx"):
        raise InputError(f"{path}: hybrid checkpoints with attention layers (attn_layer_idx) are not supported")
    if raw.get("d_intermediate"):
        raise InputError(f"{path}: checkpoints with MLP layers (d_intermediate > 0) are not supported")
    _require_rms_norm(raw.get("rms_norm", True), path)
    mamba2 = ssm_cfg.get("layer", "Mamba1") == "Mamba2"
    family = {}
    if mamba2:  # mamba_ssm's Mamba2 block: d_state 128 by default, its gated RMSNorm's eps fixed at 1e-5
        _require_supported_mamba2(ssm_cfg, path)
        family = {"mixer": "Mamba2", "headdim": int(ssm_cfg.get("headdim", 64)), "ngroups": int(ssm_cfg.get("ngroups", 1)),
                  "mixer_rms_eps": 1e-5, "dt_limit": _dt_limit(ssm_cfg.get("dt_limit", (0.0, math.inf)))}
    return _checked_mamba2(MambaConfig(
        d_model=int(raw["d_model"]),
        n_layer=int(raw["n_layer"]),
        vocab_size=int(raw["vocab_size"]),
        d_state=int(ssm_cfg.get("d_state", 128 if mamba2 else 16)),
        d_conv=int(ssm_cfg.get("d_conv", 4)),
        expand=int(ssm_cfg.get("expand", 2)),
        dt_rank=_dt_rank(ssm_cfg.get("dt_rank", "auto")),
        norm_epsilon=float(raw.get("norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        conv_bias=bool(ssm_cfg.get("conv_bias", True)),
        bias=bool(ssm_cfg.get("bias", False)),
        pad_vocab_size_multiple=int(raw.get("pad_vocab_size_multiple", 8)),
        tie_embeddings=bool(raw.get("tie_embeddings", True)),
        **family,
    ), path)


def _transformers_config(raw: dict, path: Path) -> MambaConfig:
    _require_rms_norm(raw.get("rms_norm", True), path)
    mixer = TRANSFORMERS_MIXERS[raw.get("model_type") or "mamba"]
    # FalconMamba's dt/B/C norms take mixer_rms_eps, Mamba-2's gated norm layer_norm_epsilon.
    family = {"mixer": mixer, "mixer_rms_eps": float(raw.get("mixer_rms_eps", MambaConfig.mixer_rms_eps))}
    if mixer == "Mamba2":
        family.update(headdim=int(raw.get("head_dim", 64)), ngroups=int(raw.get("n_groups", 1)),
                      dt_limit=_dt_limit(raw.get("time_step_limit", (0.0, math.inf))),
                      mixer_rms_eps=float(raw.get("layer_norm_epsilon", 1e-5)))
    # transformers sizes the embedding with vocab_size as given: no padding.
    return _checked_mamba2(MambaConfig(
        d_model=int(raw["hidden_size"]),
        n_layer=int(raw["num_hidden_layers"]),
        vocab_size=int(raw["vocab_size"]),
        d_state=int(raw.get("state_size", 16)),
        d_conv=int(raw.get("conv_kernel", 4)),
        expand=int(raw.get("expand", 2)),
        dt_rank=_dt_rank(raw.get("time_step_rank", "auto")),
        norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
        residual_in_fp32=bool(raw.get("residual_in_fp32", True)),
        conv_bias=bool(raw.get("use_conv_bias", True)),
        bias=bool(raw.get("use_bias", False)),
        pad_vocab_size_multiple=1,
        tie_embeddings=bool(raw.get("tie_word_embeddings", True)),
        **family,
    ), path)


def _require_supported_mamba2(ssm_cfg: dict, path: Path) -> None:
    """mamba_ssm's Mamba2 options this package computes: the gate after the norm, all of the
    inner width in the scan (no d_ssm split), a gated RMSNorm."""
    if ssm_cfg.get("norm_before_gate", False):
        raise InputError(f"{path}: ssm_cfg.norm_before_gate true is not supported (Mamba-2 checkpoints use false)")
    if ssm_cfg.get("d_ssm") is not None:
        raise InputError(f"{path}: ssm_cfg.d_ssm is not supported (the scan must cover all of d_inner)")
    if not ssm_cfg.get("rmsnorm", True):
        raise InputError(f"{path}: ssm_cfg.rmsnorm false is not supported (Mamba-2 checkpoints use its gated RMSNorm)")


def _checked_mamba2(config: MambaConfig, path: Path) -> MambaConfig:
    if config.mixer == "Mamba2" and (config.d_inner % config.headdim or (config.d_inner // config.headdim) % config.ngroups):
        raise InputError(f"{path}: Mamba-2 heads do not fit: d_inner {config.d_inner}, headdim {config.headdim}, ngroups {config.ngroups}")
    return config


def _dt_limit(value) -> tuple[float, float]:
    # transformers 5 writes infinity as {"__float__": "Infinity"}.
    low, high = (float(bound["__float__"] if isinstance(bound, dict) else bound) for bound in value)
    return low, high


def _dt_rank(value) -> Union[int, str]:
    return "auto" if value == "auto" else int(value)


def _require_rms_norm(rms_norm, path: Path) -> None:
    if not rms_norm:
        raise InputError(f"{path}: LayerNorm Mamba checkpoints (rms_norm=false) are not supported")


def _weight_files(folder: Path) -> list[Path]:
    """The weight files of the folder's preferred format (safetensors first), in load order."""
    for single, index in (SAFETENSORS_FILES, PYTORCH_FILES):
        if (folder / index).is_file():
            return _shards(folder / index)
        if (folder / single).is_file():
            return [folder / single]
    return []


def _shards(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
        raise InputError(f"{index}: not a usable shard index ({_one_line(error)})") from error
    return [index.parent / name for name in names]


def read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], str]:
    """Every tensor of the checkpoint (on CPU, as stored), and the file(s) they came from, for messages."""
    files = _weight_files(folder)
    if not files:
        expected = ", ".join(SAFETENSORS_FILES + PYTORCH_FILES)
        raise InputError(f"{folder}: no weights found (expected one of {expected})")
    weights: dict[str, torch.Tensor] = {}
    for path in files:
        weights.update(_read_weight_file(path))
    source = str(files[0]) if len(files) == 1 else f"{files[0].parent}/({', '.join(p.name for p in files)})"
    return weights, source


def _read_weight_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: missing (listed in the shard index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        tensors = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # corrupt, truncated or not a checkpoint: report the file, not a traceback
        raise InputError(f"{path}: not a readable weight file ({_one_line(error)})") from error
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise InputError(f"{path}: expected a state dict of tensors")
    return tensors


def to_mamba_ssm_names(
    weights: dict[str, torch.Tensor], layout: str, config: MambaConfig, source: str
) -> dict[str, torch.Tensor]:
    """The weights under MambaLM's (mamba_ssm's) names; a tied lm_head is dropped (MambaLM ties it)."""
    mamba2 = next((key for key in weights if MAMBA2_KEYS.search(key)), None)
    if mamba2 is not None and config.mixer != "Mamba2":
        raise InputError(f"{source}: holds Mamba-2 weights ({mamba2}) but its config.json describes {config.mixer}")
    renamed = dict(weights)
    if layout == "transformers" and "backbone.embeddings.weight" in renamed:
        renamed["backbone.embedding.weight"] = renamed.pop("backbone.embeddings.weight")
    if config.tie_embeddings:
        renamed.pop("lm_head.weight", None)
    return renamed


def check_state_dict(model: MambaLM, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Every weight the config implies is present with its shape, and nothing else is."""
    expected = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    if model.config.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(state_dict))
    if missing:
        raise InputError(f"{source}: {len(missing)} weight(s) missing, e.g. {missing[0]}")
    unexpected = sorted(set(state_dict) - set(expected))
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} unexpected weight(s), e.g. {unexpected[0]}")
    for key, shape in expected.items():
        found = tuple(state_dict[key].shape)
        if found != shape:
            raise InputError(f"{source}: {key} has shape {list(found)} but config.json implies {list(shape)}")


def load_tokenizer(pretrained: Union[str, Path], tokenizer: Optional[str] = None, revision: Optional[str] = None):
    """`tokenizer` when given, else the checkpoint folder's own (at `revision`), else
    EleutherAI/gpt-neox-20b; pad = eos if unset."""
    from transformers import AutoTokenizer

    if tokenizer is None:
        folder = resolve_model_dir(pretrained, revision)
        has_own = any((folder / name).is_file() for name in TOKENIZER_FILES)
        tokenizer = str(folder) if has_own else DEFAULT_TOKENIZER
    try:
        loaded = AutoTokenizer.from_pretrained(tokenizer)
    except Exception as error:  # not found, offline and not cached, unreadable files
        raise InputError(f"tokenizer {tokenizer}: could not be loaded ({_one_line(error)})") from error
    if loaded.pad_token is None:
        loaded.pad_token = loaded.eos_token
    return loaded
