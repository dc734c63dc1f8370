"""A tiny word-level tokenizer, a tiny random Mamba of its vocabulary and random texts of its
words: calibration inputs small enough to check against a float64 reference."""

import numpy as np
import torch

from lm_eval_floatsim.mamba import MambaConfig, MambaLM

WORDS = 64


def tiny_tokenizer():
    """Word-level: 'w0'..'w63' are tokens 1..64, anything else [UNK] (0); no special tokens added."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{f"w{i}": i + 1 for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[UNK]")


def tiny_model(seed=0, d_model=16, n_layer=3):
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=d_model, n_layer=n_layer, vocab_size=WORDS + 1)).eval()


def tiny_mamba2(seed=0):
    """A tiny random Mamba-2 (x of 32 channels, B and C of 2 groups x 4 states) whose B and C
    projections are larger than x's, so that the conv's segments have different ranges."""
    torch.manual_seed(seed)
    config = MambaConfig(d_model=16, n_layer=2, vocab_size=WORDS + 1, d_state=4, mixer="Mamba2", headdim=8, ngroups=2,
                         mixer_rms_eps=1e-5)
    model = MambaLM(config).eval()
    with torch.no_grad():
        for layer in model.backbone.layers:
            layer.mixer.in_proj.weight[2 * config.d_inner : 2 * config.d_inner + 8] *= 4.0  # B
            layer.mixer.in_proj.weight[2 * config.d_inner + 8 : 2 * config.d_inner + 16] *= 0.25  # C
    return model


def random_texts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, WORDS, n)) for n in lengths]
