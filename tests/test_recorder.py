"""The recorder: statistics against an independent float64 computation, the snapshot batch, and
observers that never synchronise with the host."""

import math

import numpy as np
import pytest
import torch

from lm_eval_floatsim.mamba import MambaConfig, MambaLM
from lm_eval_floatsim.recorder import Recorder


def observation(seed, batch=3, length=7, channels=5, nonfinite=True):
    """before/after/codes/clamped like conv_silu's, plus a left-padding mask, with NaN and inf sprinkled in."""
    generator = torch.Generator().manual_seed(seed)
    before = torch.randn(batch, length, channels, generator=generator) * 3
    scale = 0.05
    codes = torch.round(before / scale).clamp(-40, 40)
    clamped = codes != torch.round(before / scale)
    after = codes * scale
    if nonfinite:
        before[0, 5, 1] = float("nan")
        after[1, 6, 2] = float("inf")
        before[-1, 0, 0] = float("-inf")  # the last row is left-padded: position 0 is padding
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[-1, :2] = 0
    return before, after, codes, clamped, mask


def reference_stats(observations):
    """count, sum|err|, max|err|, sum before^2, sum err^2, clamped, nonfinite in float64 with numpy."""
    total = dict(count=0, sum_abs=0.0, max_abs=0.0, signal=0.0, noise=0.0, clamped=0, nonfinite=0)
    for before, after, codes, clamped, mask in observations:
        b, a = before.double().numpy(), after.double().numpy()
        real = np.broadcast_to(mask.numpy()[..., None] == 1, b.shape)
        finite = np.isfinite(b) & np.isfinite(a)
        valid = real & finite
        err = np.abs(a - b)[valid]
        total["count"] += int(valid.sum())
        total["sum_abs"] += float(err.sum())
        total["max_abs"] = max(total["max_abs"], float(err.max(initial=0.0)))
        total["signal"] += float((b[valid] ** 2).sum())
        total["noise"] += float((err**2).sum())
        total["clamped"] += int((clamped.numpy() & valid).sum())
        total["nonfinite"] += int((real & ~finite).sum())
    return total


def test_statistics_match_an_independent_float64_computation():
    recorder = Recorder(n_layer=2, dump_n=4)
    recorder.arm()
    first, second, other = observation(0), observation(1), observation(2)
    for obs in (first, second):
        recorder.layer(0, obs[4])(*obs[:4])
    recorder.layer(1, other[4])(*other[:4])

    summaries = recorder.layer_summaries()
    for summary, observed in zip(summaries, ([first, second], [other])):
        ref = reference_stats(observed)
        assert summary["count"] == ref["count"]
        assert summary["nonfinite"] == ref["nonfinite"] > 0
        # Errors are after - before in fp32 (relative rounding 2**-24 per value) summed pairwise in
        # fp32 per call: 1e-6 relative covers both with a wide margin at these sizes.
        assert summary["mean_abs_err"] == pytest.approx(ref["sum_abs"] / ref["count"], rel=1e-6)
        assert summary["max_abs_err"] == pytest.approx(ref["max_abs"], rel=1e-6)
        assert summary["sqnr_db"] == pytest.approx(10 * math.log10(ref["signal"] / ref["noise"]), abs=1e-5)
        assert summary["clamped_fraction"] == pytest.approx(ref["clamped"] / ref["count"], rel=1e-12)
        assert 0 < summary["clamped_fraction"] < 1


def test_mask_none_counts_every_position():
    before, after, codes, clamped, _ = observation(3, nonfinite=False)
    recorder = Recorder(1, 4)
    recorder.arm()
    recorder.layer(0, None)(before, after, codes, clamped)
    ref = reference_stats([(before, after, codes, clamped, torch.ones(before.shape[:2], dtype=torch.long))])
    summary = recorder.layer_summaries()[0]
    assert summary["count"] == before.numel() == ref["count"]
    assert summary["nonfinite"] == 0
    assert summary["mean_abs_err"] == pytest.approx(ref["sum_abs"] / ref["count"], rel=1e-6)


def test_zero_error_has_no_sqnr_and_unseen_layers_no_statistics():
    y = torch.randn(2, 6, 3)
    recorder = Recorder(2, 4)
    recorder.arm()
    recorder.layer(0, None)(y, y, None, None)  # fp: after is before
    exact, unseen = recorder.layer_summaries()
    assert exact["count"] == y.numel()
    assert exact["max_abs_err"] == exact["mean_abs_err"] == 0.0
    assert exact["sqnr_db"] is None  # +inf dB: JSON has no infinity, so null
    assert exact["clamped_fraction"] == 0.0
    assert unseen == {"layer_idx": 1, "count": 0, "max_abs_err": None, "mean_abs_err": None,
                      "sqnr_db": None, "clamped_fraction": None, "nonfinite": 0}


def test_snapshot_is_row_0_in_channel_position_order_of_the_first_armed_batch():
    recorder = Recorder(n_layer=2, dump_n=10)
    assert recorder.layer(0, None) is None  # nothing recorded before arm(): calibration, batch-size probing
    recorder.arm()
    # length 3 < dump_n: the 10 values span channels 0..3 of row 0
    first = [observation(10 + i, batch=2, length=3, channels=6, nonfinite=False) for i in range(2)]
    for layer_idx, obs in enumerate(first):
        observer = recorder.layer(layer_idx, obs[4])
        assert observer.wants_values
        observer(*obs[:4])
    assert not recorder.armed
    recorder.arm()  # arming again once the snapshot is taken changes nothing
    later = observation(20, batch=2, length=3, channels=6, nonfinite=False)
    observer = recorder.layer(0, later[4])
    assert not observer.wants_values
    observer(*later[:4])

    for snapshot, (before, after, codes, _, _) in zip(recorder.snapshots(), first):
        order = [(c, t) for c in range(6) for t in range(3)][:10]  # (channel, position), built by hand
        assert snapshot.before == [before[0, t, c].item() for c, t in order]
        assert snapshot.after == [after[0, t, c].item() for c, t in order]
        assert snapshot.codes == [int(codes[0, t, c]) for c, t in order]
        assert all(isinstance(code, int) for code in snapshot.codes)
    real = int(first[0][4].sum() + later[4].sum())
    assert recorder.layer_summaries()[0]["count"] == real * 6  # both batches of layer 0, real positions


def test_model_forward_records_only_from_the_armed_batch():
    torch.manual_seed(0)
    config = MambaConfig(d_model=8, n_layer=3, vocab_size=20)
    model = MambaLM(config).eval()
    recorder = Recorder(config.n_layer, dump_n=5)
    model.recorder = recorder
    probe = torch.randint(0, 20, (4, 9))
    armed = torch.randint(0, 20, (2, 6))
    mask = torch.tensor([[1] * 6, [0, 0, 1, 1, 1, 1]])
    later = torch.randint(0, 20, (1, 4))
    captured = {}

    class Capture:
        def layer(self, layer_idx, mask):
            return lambda before, after, codes, clamped: captured.__setitem__(layer_idx, before.clone())

    with torch.no_grad():
        model(probe)  # before arm(): batch-size probing, not recorded
        recorder.arm()
        model(armed, mask=mask)
        model(later)
        model.recorder = Capture()
        model(armed, mask=mask)

    real_tokens = int(mask.sum()) + later.numel()
    for summary in recorder.layer_summaries():
        assert summary["count"] == real_tokens * config.d_inner
    for layer_idx, snapshot in enumerate(recorder.snapshots()):
        expected = captured[layer_idx][0].T.flatten()[:5].tolist()
        assert snapshot.before == expected


def test_fp_snapshot_has_no_codes_and_nan_codes_become_none_and_others_stay():
    recorder = Recorder(2, 3)
    recorder.arm()
    y = torch.randn(1, 4, 2)
    recorder.layer(0, None)(y, y, None, None)
    before = torch.tensor([[[float("nan")], [1.0], [2.05]]])
    codes = torch.tensor([[[float("nan")], [10.0], [20.5]]])  # a non-integer code stays visible to `check`
    recorder.layer(1, None)(before, codes * 0.1, codes, torch.zeros_like(codes, dtype=torch.bool))
    fp, quantized = recorder.snapshots()
    assert fp.codes is None
    assert quantized.codes == [None, 10, 20.5] and isinstance(quantized.codes[1], int)
    assert recorder.layer_summaries()[1]["nonfinite"] == 1


def test_observe_never_synchronises_with_the_host(monkeypatch):
    obs = observation(5)
    recorder = Recorder(1, 10)
    recorder.arm()
    observer = recorder.layer(0, obs[4])

    def synchronises(*args, **kwargs):
        raise AssertionError("observe synchronised with the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, synchronises)
    observer(*obs[:4])  # the snapshot batch
    observer(*observation(6)[:4])  # and a statistics-only one
    monkeypatch.undo()
    assert recorder.layer_summaries()[0]["count"] == reference_stats([obs, observation(6)])["count"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's synchronisation debug mode needs a GPU")
def test_observe_never_synchronises_with_a_gpu():
    observations = [[None if t is None else t.cuda() for t in observation(seed)] for seed in (7, 8)]
    recorder = Recorder(1, 10, device="cuda")
    recorder.arm()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for before, after, codes, clamped, mask in observations:
            recorder.layer(0, mask)(before, after, codes, clamped)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = [[t.cpu() for t in obs] for obs in observations]
    assert recorder.layer_summaries()[0]["count"] == reference_stats(cpu)["count"]
