"""kernels.fast_path: what CUDA-graph replays rely on, checked where CI can run it (the CPU).

GraphedForward pads a batch on the right to `bucket_length` and masks the padding out. That is
only right if the model is causal (no real position sees the padding), the mask keeps padding out
of the recorder's statistics, and lm_head on the cut hidden states gives the forward's logits.
The replay itself needs CUDA: tests/test_kernels.py checks it against the eager forward there.
"""

from __future__ import annotations

import torch
from helpers_models import statistics_recorder

from lm_eval_floatsim.kernels import fast_path
from lm_eval_floatsim.kernels.fast_path import GraphedForward, _pad_to_bucket, bucket_length
from lm_eval_floatsim.mamba import MambaConfig, MambaLM
from lm_eval_floatsim.quant import LayerScales, QuantSpec


def quantized_model():
    torch.manual_seed(0)
    model = MambaLM(MambaConfig(d_model=32, n_layer=2, vocab_size=100)).eval()
    return model.quantize(QuantSpec("int8"), [LayerScales(0.05, 0.02, 0.01, 0.01)] * 2)


def test_buckets_pad_by_less_than_a_quarter_and_never_shorten():
    for length in range(1, 5000):
        bucket = bucket_length(length)
        assert bucket >= length
        assert bucket == 8 if length <= 8 else bucket < 1.25 * length
    # four sizes per octave: few graphs, few kernel compilations
    assert len({bucket_length(length) for length in range(129, 257)}) == 4


def test_padded_forward_gives_the_unpadded_logits_and_statistics():
    model = quantized_model()
    ids = torch.randint(0, 100, (3, 37))
    mask = torch.ones_like(ids)
    mask[1, 30:] = 0  # a right-padded row, as lm-eval's loglikelihood batches have
    with torch.no_grad():
        model.recorder = plain = statistics_recorder(model)
        expected = model(ids, mask=mask)
        padded_ids, padded_mask = _pad_to_bucket(ids, mask)
        model.recorder = padded = statistics_recorder(model)
        hidden = model.hidden_states(padded_ids, mask=padded_mask)
        got = model.lm_head(hidden[:, : ids.shape[1]])
    assert padded_ids.shape == (3, bucket_length(37)) and torch.equal(padded_ids[:, :37], ids)
    assert padded_mask[:, 37:].eq(0).all()
    # fp32 on the CPU: the padded matmuls have more rows but sum each row alike, so the real
    # positions' logits are the same to a few ulps (1e-6 of logits of order 1)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert torch.equal(padded.sums[:, 0], plain.sums[:, 0])  # the same positions counted
    torch.testing.assert_close(padded.sums, plain.sums, rtol=1e-6, atol=0)


def test_without_a_mask_padding_gets_one_that_counts_every_real_position():
    ids = torch.randint(0, 100, (2, 9))
    padded_ids, padded_mask = _pad_to_bucket(ids, None)
    assert padded_mask.dtype == ids.dtype  # the dtype lm_model's padding masks have: one graph each
    assert padded_mask[:, :9].eq(1).all() and padded_mask[:, 9:].eq(0).all()


def test_on_the_cpu_the_forward_is_the_eager_one():
    model = quantized_model()
    model.recorder = None
    ids = torch.randint(0, 100, (2, 13))
    forward = GraphedForward(model, capture_after=1)
    with torch.no_grad():
        assert torch.equal(forward(ids), model(ids))
    assert not forward._graphs


def test_a_capture_that_runs_out_of_memory_leaves_that_shape_eager(monkeypatch):
    """With --batch_size auto the eager probe may fill the GPU; a graph's own memory pool then
    does not fit. The forward must still answer, and not try that capture again."""
    captures = []

    def out_of_memory(*args):
        captures.append(args)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(GraphedForward, "_can_graph", staticmethod(lambda input_ids: True))
    monkeypatch.setattr(fast_path, "_Graph", out_of_memory)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    model = quantized_model()
    model.recorder = None
    ids = torch.randint(0, 100, (2, 13))
    forward = GraphedForward(model, capture_after=1)
    with torch.no_grad():
        got = [forward(ids) for _ in range(3)]
        expected = model(ids)
    assert all(torch.equal(logits, expected) for logits in got)
    assert len(captures) == 1 and not forward._graphs
