"""scoring.loglikelihood_tokens against HFLM's own `_loglikelihood_tokens`, bit for bit: the same
answers, cache calls and batches, on the CPU and, where there is one, on a GPU (where torch's
reductions and argmax run other kernels)."""

from __future__ import annotations

import random

import pytest
import torch
from lm_eval.models import huggingface
from lm_eval.models.huggingface import HFLM

from lm_eval_floatsim import scoring

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
VOCAB = 23


class RecordingHook:
    def __init__(self):
        self.calls = []

    def add_partial(self, kind, request, answer):
        self.calls.append((kind, request, answer))


class TableLM(HFLM):
    """An HFLM whose model is a table of logits by token and position (no checkpoint): what
    `_loglikelihood_tokens` needs of it, HFLM's and scoring's alike."""

    def __init__(self, device: str, dtype: torch.dtype, batch_size: int, logits_cache: bool = True):  # no HFLM.__init__
        generator = torch.Generator().manual_seed(0)
        # Halves: ties for argmax, and sums whose order shows in the last bits after log_softmax.
        self.table = (torch.randn(VOCAB, VOCAB, generator=generator) * 4).round() / 2
        self.table = self.table.to(device=device, dtype=dtype)
        self.by_position = (torch.randn(64, VOCAB, generator=generator) / 3).to(device=device, dtype=dtype)
        self._device, self._max_length, self.batch_size_per_gpu = torch.device(device), 12, batch_size
        self.logits_cache, self.softmax_dtype, self._rank, self.backend = logits_cache, None, 0, "causal"
        self.cache_hook, self.batches, self.noted = RecordingHook(), [], []

    def _model_call(self, inps, attn_mask=None, labels=None):
        self.batches.append(inps.clone())
        return self.table[inps] + self.by_position[: inps.shape[1]]

    def _note_padding(self, lengths, width, padding_side, device):
        self.noted.append((lengths, width, padding_side, torch.device(device)))


def requests() -> list:
    """Loglikelihood requests as lm-eval hands them over: ((context, continuation), tokens, tokens).

    Multiple choice (one context, one-token answers: HFLM scores them from one row), multi-token
    continuations, repeated requests, inputs longer than max_length, and rolling windows (no string).
    """
    rng = random.Random(1)
    found = []
    for index in range(40):
        context = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 16))]
        continuation = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 9))]
        found.append(((f"c{index}", f"x{index}"), context, continuation))
    for question in range(4):
        context = [rng.randrange(VOCAB) for _ in range(rng.randint(2, 8))]
        found += [((f"q{question}", f"a{answer}"), context, [answer]) for answer in range(4)]
    found += found[:3]
    found += [(None, [rng.randrange(VOCAB)], [rng.randrange(VOCAB) for _ in range(5)]) for _ in range(3)]
    return found


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("batch_size, logits_cache", [(5, True), (1, True), (8, False)])
def test_answers_are_hflms_bit_for_bit(device, dtype, batch_size, logits_cache, monkeypatch):
    hflm, ours = TableLM(device, dtype, batch_size, logits_cache), TableLM(device, dtype, batch_size, logits_cache)
    padded = []
    pad_and_concat = huggingface.pad_and_concat

    def noting_lengths(width, rows, padding_side="right"):
        padded.append(([row.shape[-1] for row in rows], width, padding_side))
        return pad_and_concat(width, rows, padding_side)

    monkeypatch.setattr(huggingface, "pad_and_concat", noting_lengths)
    expected = HFLM._loglikelihood_tokens(hflm, requests())
    got = scoring.loglikelihood_tokens(ours, requests())
    assert [(repr(total), greedy) for total, greedy in got] == [(repr(total), greedy) for total, greedy in expected]
    assert any(greedy for _, greedy in expected) and not all(greedy for _, greedy in expected)
    assert ours.cache_hook.calls == hflm.cache_hook.calls
    assert len(ours.batches) == len(hflm.batches)
    for mine, theirs in zip(ours.batches, hflm.batches):
        assert mine.device == theirs.device and torch.equal(mine, theirs)
    assert [noted[:3] for noted in ours.noted] == padded
    assert all(noted[3] == torch.device(device) for noted in ours.noted)


def test_a_request_without_a_continuation_is_refused():
    with pytest.raises(ValueError, match="continuation of 1 to 12 tokens: got 3 and 0"):
        scoring.loglikelihood_tokens(TableLM("cpu", torch.float32, 4), [(("a", ""), [1, 2, 3], [])])
