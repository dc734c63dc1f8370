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


def random_texts(seed, lengths):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(0, WORDS, n)) for n in lengths]
