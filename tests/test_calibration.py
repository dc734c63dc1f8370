"""Calibration (SPEC §2): calibration texts, the statistics, the scales file and its cache.

The scales are checked against a float64 reference written here: the conv input x is captured
with this test's own in_proj hooks, the conv+SiLU output recomputed from it in float64 with
torch's conv1d, quantiles taken with numpy.quantile, the EMA run as a plain loop.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import hashlib
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers_calibration import random_texts, tiny_mamba2, tiny_model, tiny_tokenizer
from lm_eval_floatsim import calibration
from lm_eval_floatsim.calibration import (
    CalibrationSettings,
    Scales,
    cached_scales,
    calibrate,
    ema,
    load_calibration_texts,
    parse_dataset_name,
    upper_quantile,
)
from lm_eval_floatsim.errors import ArgumentError, InputError
from lm_eval_floatsim.quant import LayerScales, QuantSpec, SegmentedScales


@torch.no_grad()
def float64_reference(model, tokenizer, texts, seqlen, percentile, widths=None):
    """(s_x, s_y, s_w, s_b) per block, from SPEC §2's definitions, in float64; with `widths` (the
    conv's channel segments, conv_scales=xbc) a list of them per block, s_x and s_y per segment."""
    config = model.config
    n_layer, conv_dim = config.n_layer, config.conv_dim
    # in_proj's output: (x, z) for Mamba-1, (z, xBC, dt) for Mamba-2.
    start = config.d_inner if config.mixer == "Mamba2" else 0
    widths = widths or (conv_dim,)
    captured = {}
    hooks = [
        layer.mixer.in_proj.register_forward_hook(
            lambda module, inputs, output, i=i: captured.__setitem__(i, output[..., start : start + conv_dim].double())
        )
        for i, layer in enumerate(model.backbone.layers)
    ]
    absmax = [[0.0] * len(widths) for _ in range(n_layer)]
    quantiles = [[[] for _ in widths] for _ in range(n_layer)]
    try:
        for text in texts:
            ids = tokenizer(text)["input_ids"][:seqlen]
            if not ids:
                continue
            model(torch.tensor([ids]))
            for i, x in captured.items():
                conv = model.backbone.layers[i].mixer.conv1d
                length, taps = x.shape[1], conv.weight.shape[-1]
                pre = F.conv1d(x.transpose(1, 2), conv.weight.double(), conv.bias.double(), padding=taps - 1, groups=conv_dim)
                y = (pre[..., :length] * torch.sigmoid(pre[..., :length])).transpose(1, 2)
                for k, (x_k, y_k) in enumerate(zip(x.split(widths, -1), y.split(widths, -1))):
                    absmax[i][k] = max(absmax[i][k], x_k.abs().max().item())
                    quantiles[i][k].append(float(np.quantile(y_k.abs().numpy().ravel(), percentile)))
    finally:
        for hook in hooks:
            hook.remove()
    expected = []
    for i, layer in enumerate(model.backbone.layers):
        conv = layer.mixer.conv1d
        segments = []
        for k in range(len(widths)):
            w = quantiles[i][k][0]
            for q in quantiles[i][k][1:]:
                w += 0.01 * (q - w)
            values = (absmax[i][k], w, conv.weight.double().abs().max().item(), conv.bias.double().abs().max().item())
            segments.append(tuple(float(np.float32(v / 127)) for v in values))
        expected.append(segments if len(widths) > 1 else segments[0])
    return expected, [per_segment[0] for per_segment in quantiles]


def assert_scales_match(layers, expected):
    for got, (s_x, s_y, s_w, s_b) in zip(layers, expected, strict=True):
        # x, w and b are the same fp32 numbers in both computations and /127 is one rounding to
        # fp32 on each side: these agree exactly.
        assert (got.input, got.weight, got.bias) == (s_x, s_w, s_b)
        # y: the model's fp32 conv+SiLU is within a few ulp (~1e-6 relative) of the float64 one;
        # a quantile moves at most as far as the values do and the EMA is an average, so 1e-5
        # holds with margin (measured: 2e-7), while an EMA rate of 0.011 instead of 0.01 already
        # moves s_y by ~5e-4 here, and a wrong percentile or sample order by more.
        assert got.output == pytest.approx(s_y, rel=1e-5)


# --- the statistics -----------------------------------------------------------------------


def test_calibrate_matches_float64_reference():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    seqlen, percentile = 40, 0.9995
    # Includes a sample longer than seqlen (truncated, not dropped) and empty ones (skipped).
    texts = random_texts(1, [40, 25, 90, 7, 33, 40]) + ["", "   "] + random_texts(2, [12, 60])
    layers = calibrate(model, tokenizer, texts, seqlen, percentile, progress=False)
    expected, quantiles = float64_reference(model, tokenizer, texts, seqlen, percentile)
    assert len(quantiles[0]) == 8
    # The samples' quantiles must differ, or an averaging rule other than the EMA would pass too.
    assert max(quantiles[0]) / min(quantiles[0]) > 1.05
    assert_scales_match(layers, expected)
    assert all(np.float32(v) == v for s in layers for v in (s.input, s.output, s.weight, s.bias))


def test_conv_scales_xbc_calibrates_each_segment_of_a_mamba2_conv_alone():
    model, tokenizer = tiny_mamba2(), tiny_tokenizer()
    texts = random_texts(5, [40, 25, 33])
    layers = calibrate(model, tokenizer, texts, 40, 0.9995, progress=False, conv_scales="xbc")
    widths = (model.config.d_inner, 8, 8)  # x, then B and C: ngroups 2 x d_state 4 each
    expected, _ = float64_reference(model, tokenizer, texts, 40, 0.9995, widths)
    for got, segments in zip(layers, expected, strict=True):
        assert isinstance(got, SegmentedScales) and got.names == ("x", "B", "C") and got.widths == widths
        assert_scales_match([segment for _, _, segment in got.segments()], segments)
        # The segments' ranges differ, or one scale for all would pass too.
        assert len({s_y for _, s_y, _, _ in segments}) == 3
    whole = calibrate(model, tokenizer, texts, 40, 0.9995, progress=False)
    assert_scales_match(whole, float64_reference(model, tokenizer, texts, 40, 0.9995)[0])


def test_conv_scales_xbc_is_refused_for_a_conv_of_x_only():
    with pytest.raises(ArgumentError, match="conv_scales=.xbc.* Mamba1 conv holds x only"):
        calibration.check_conv_scales("xbc", tiny_model().config, "some/model")
    calibration.check_conv_scales("conv", tiny_model().config, "some/model")


def test_first_sample_initializes_the_ema():
    model, tokenizer = tiny_model(), tiny_tokenizer()
    texts = random_texts(3, [30])
    layers = calibrate(model, tokenizer, texts, 30, 0.99, progress=False)
    expected, quantiles = float64_reference(model, tokenizer, texts, 30, 0.99)
    assert_scales_match(layers, expected)
    assert layers[0].output == pytest.approx(quantiles[0][0] / 127, rel=1e-5)  # no decay towards 0


def test_ema_rule():
    assert ema([3.0]) == 3.0
    assert ema([3.0, 5.0]) == 3.0 + 0.01 * 2.0
    assert ema([3.0, 5.0, 1.0]) == pytest.approx((3.02) + 0.01 * (1.0 - 3.02), rel=1e-15)


@pytest.mark.parametrize("n", [1, 2, 7, 1000])
@pytest.mark.parametrize("q", [0.0001, 0.5, 0.9, 0.9995, 1.0])
def test_upper_quantile_is_numpy_linear_quantile(n, q):
    rows = torch.rand(3, n, generator=torch.Generator().manual_seed(n))
    got = upper_quantile(rows, q)
    expected = np.quantile(rows.double().numpy(), q, axis=1)
    # Same order statistics, interpolated in float64 by both: equal up to float64 rounding.
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


def test_calibrate_restores_the_model_and_ignores_its_mode():
    reference = calibrate(tiny_model(), tiny_tokenizer(), random_texts(4, [20, 30]), 32, 0.999, progress=False)
    model = tiny_model()
    scales = [LayerScales(0.1, 0.1, 0.1, 0.1)] * model.config.n_layer
    model.quantize(QuantSpec("better", 7.0), scales)
    sentinel = object()
    model.recorder = sentinel
    model.train()
    layers = calibrate(model, tiny_tokenizer(), random_texts(4, [20, 30]), 32, 0.999, progress=False)
    assert layers == reference  # calibrated in fp, whatever mode the model was in
    assert model.spec == QuantSpec("better", 7.0) and model.scales == scales
    assert model.recorder is sentinel and model.training
    assert all(not layer.mixer.in_proj._forward_hooks and not layer.mixer._forward_hooks for layer in model.backbone.layers)


def test_calibrate_without_tokens_is_an_input_error():
    with pytest.raises(InputError):
        calibrate(tiny_model(), tiny_tokenizer(), ["", "  "], 16, 0.99, progress=False)


@pytest.mark.parametrize("seqlen, percentile", [(0, 0.99), (16, 0.0), (16, 1.5)])
def test_calibrate_rejects_bad_settings(seqlen, percentile):
    with pytest.raises(ArgumentError):
        calibrate(tiny_model(), tiny_tokenizer(), ["w1 w2"], seqlen, percentile, progress=False)


class CodesRecorder:
    """The model's recorder interface, keeping every block's output codes."""

    def __init__(self):
        self.codes = {}

    def layer(self, layer_idx, mask):
        return lambda before, after, codes, clamped: self.codes.__setitem__(layer_idx, codes.clone())


def test_same_scale_codes_reproduce_the_int8_kernel():
    model, tokenizer = tiny_model(seed=5, d_model=32, n_layer=4), tiny_tokenizer()
    layers = calibrate(model, tokenizer, random_texts(6, [64] * 4), 64, 0.9995, progress=False)
    ids = torch.tensor([tokenizer(text)["input_ids"] for text in random_texts(7, [64, 64])])
    codes = {}
    for mode in ("int8", "same"):
        model.quantize(QuantSpec(mode), layers)
        model.recorder = CodesRecorder()
        with torch.no_grad():
            model(ids)
        codes[mode] = torch.stack([model.recorder.codes[i] for i in range(4)])
    diff = (codes["same"] - codes["int8"]).abs()
    assert codes["int8"].numel() == 4 * 2 * 64 * 64
    assert len(codes["int8"].unique()) > 50  # calibrated scales use the code range, not a handful of codes
    assert diff.max() <= 1  # SPEC §2: off by one at most (a float rounding at a .5 tie)
    assert (diff == 0).double().mean() >= 0.9999


# --- calibration texts -----------------------------------------------------------------------


def test_txt_file_one_sample_per_non_empty_line(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("first line\n\n   \nsecond line\nthird\n", encoding="utf-8")
    assert load_calibration_texts(str(path), 2) == ["first line", "second line"]
    assert load_calibration_texts(str(path), 10) == ["first line", "second line", "third"]


def test_jsonl_file_text_field(tmp_path):
    path = tmp_path / "calib.jsonl"
    path.write_text('{"text": "a b"}\n\n{"text": "c", "meta": 1}\n', encoding="utf-8")
    assert load_calibration_texts(str(path), 5) == ["a b", "c"]


@pytest.mark.parametrize(
    "name, content",
    [
        ("missing.txt", None),
        ("empty.txt", "\n  \n"),
        ("nofield.jsonl", '{"text": "ok"}\n{"body": "x"}\n'),
        ("notjson.jsonl", '{"text": "ok"}\n{broken\n'),
        ("other.json", '{"text": "a json file, not json lines"}'),
    ],
)
def test_unusable_local_files_name_calib_data(tmp_path, name, content):
    path = tmp_path / name
    if content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(InputError) as error:
        load_calibration_texts(str(path), 5)
    assert "calib_data=" in str(error.value) and "\n" not in str(error.value)


def test_dataset_name_spelling():
    assert parse_dataset_name("monology/pile-uncopyrighted") == ("monology/pile-uncopyrighted", None, "validation")
    assert parse_dataset_name("monology/pile-uncopyrighted:train") == ("monology/pile-uncopyrighted", None, "train")
    assert parse_dataset_name("wikitext:wikitext-2-raw-v1:test") == ("wikitext", "wikitext-2-raw-v1", "test")
    for bad in ("a:b:c:d", "name:", ":split"):
        with pytest.raises(ArgumentError):
            parse_dataset_name(bad)


def test_dataset_offline_without_cache_is_one_input_error(monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(InputError) as error:
        load_calibration_texts("lm-eval-floatsim-tests/no-such-dataset:validation", 4)
    message = str(error.value)
    assert message.startswith("calib_data='lm-eval-floatsim-tests/no-such-dataset:validation'") and "\n" not in message


def write_json_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def test_dataset_folder_is_streamed_only_as_far_as_needed(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    write_json_lines(folder / "validation-00000-of-00002.jsonl", [{"text": f"doc {i}"} for i in range(5)])
    # The second shard is broken: reading 3 documents must never open it, reading 10 must.
    (folder / "validation-00001-of-00002.jsonl").write_text("{broken\n", encoding="utf-8")
    assert load_calibration_texts(f"{folder}:validation", 3) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(InputError, match="calib_data="):
        load_calibration_texts(f"{folder}:validation", 10)
    with pytest.raises(InputError, match="calib_data="):
        load_calibration_texts(f"{folder}:train", 3)


def test_dataset_documents_are_pulled_one_by_one(monkeypatch):
    import datasets

    pulled = []

    def documents():
        for i in range(100):
            pulled.append(i)
            yield {"text": f"doc {i}"}

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        return datasets.IterableDataset.from_generator(documents)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert load_calibration_texts("owner/corpus:cfg:val", 4) == [f"doc {i}" for i in range(4)]
    assert calls == [("owner/corpus", "cfg", "val", True)]
    assert len(pulled) <= 5  # the generator may be one document ahead, never the whole corpus


# --- the scales file -------------------------------------------------------------------------


VERSIONS = (calibration.FORMAT, calibration.FORMAT_V1)


def sample_scales(version=calibration.FORMAT):
    layers = [LayerScales(0.1, 0.02, 0.003, 0.4), LayerScales(1.5, 2.5, 3.5, 4.5)]
    settings = {"calib_data": "calib.txt", "calib_samples": 4, "percentile": 0.9995, "nested": {"b": 1, "a": None}}
    return Scales("some/model", settings, layers, format=version)


def conv_scales_entry(data, position):
    """A block's Conv1D+SiLU scales in a file's JSON: per site in version 2, flat in version 1."""
    entry = data["layers"][position]
    return entry if data["format"] == calibration.FORMAT_V1 else entry["conv_silu"]


def canonical_sha256(content):
    """The documented hash: sha256 of the content without `sha256`, keys sorted, no whitespace."""
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@pytest.mark.parametrize("version", VERSIONS)
def test_scales_round_trip(tmp_path, version):
    scales = sample_scales(version)
    assert scales.layers[0].input == float(np.float32(0.1))  # stored as what fp32 arithmetic multiplies by
    path = scales.save(tmp_path / "scales.json")
    data = json.loads(path.read_text())
    assert set(data) == {"format", "model", "settings", "layers", "sha256"} and data["format"] == version
    values = {"input_scale": 1.5, "output_scale": 2.5, "weight_scale": 3.5, "bias_scale": 4.5}
    by_site = values if version == calibration.FORMAT_V1 else {"conv_silu": values}
    assert data["layers"][1] == {"layer_idx": 1, **by_site}
    assert data["sha256"] == canonical_sha256({k: v for k, v in data.items() if k != "sha256"}) == scales.sha256
    loaded = Scales.load(path)
    assert loaded == scales and loaded.sha256 == scales.sha256 and loaded.path == path


def test_a_version_1_file_loads_with_its_own_hash(tmp_path):
    """Dumps and response caches record a scales file's sha256: loading today's files must keep it."""
    old = sample_scales(calibration.FORMAT_V1)
    path = old.save(tmp_path / "v1.json")
    recorded = json.loads(path.read_text())["sha256"]
    loaded = Scales.load(path)
    assert loaded.format == calibration.FORMAT_V1 and loaded.sha256 == recorded and loaded.layers == old.layers
    assert sample_scales().layers == loaded.layers and sample_scales().sha256 != recorded  # another layout


def test_sha256_depends_on_content_not_key_order():
    scales = sample_scales()
    reordered = Scales(scales.model_id, dict(reversed(list(scales.settings.items()))), scales.layers)
    assert reordered.sha256 == scales.sha256
    changed = Scales(scales.model_id, scales.settings, [scales.layers[0], LayerScales(1.5, 2.5, 3.5, 4.0)])
    assert changed.sha256 != scales.sha256


def mutations():
    def layer(key, value):
        return lambda d: conv_scales_entry(d, 0).__setitem__(key, value)

    return {
        "string scale": layer("output_scale", "0.5"),
        "negative scale": layer("input_scale", -0.5),
        "zero scale": layer("weight_scale", 0.0),
        "nan scale": layer("bias_scale", float("nan")),
        "bool scale": layer("bias_scale", True),
        "not fp32": layer("output_scale", 0.1),
        "missing key": lambda d: conv_scales_entry(d, 0).pop("weight_scale"),
        "layer order": lambda d: d["layers"][0].__setitem__("layer_idx", 1),
        "wrong format": lambda d: d.__setitem__("format", "something/2"),
        "settings not object": lambda d: d.__setitem__("settings", []),
        "no layers": lambda d: d.__setitem__("layers", []),
        "model not string": lambda d: d.__setitem__("model", 3),
        "site not object": lambda d: d["layers"][0].__setitem__("conv_silu", [1.0])
        if d["format"] == calibration.FORMAT else d["layers"][0].pop("input_scale"),
    }


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(mutations()))
def test_scales_load_rejects_bad_content(tmp_path, name, version):
    path = sample_scales(version).save(tmp_path / "scales.json")
    data = json.loads(path.read_text())
    mutations()[name](data)
    # A consistent hash, so that the content check (not the hash check) must catch the problem.
    data["sha256"] = canonical_sha256({k: v for k, v in data.items() if k != "sha256"})
    path.write_text(json.dumps(data))
    with pytest.raises(InputError) as error:
        Scales.load(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def segmented_scales():
    layers = [SegmentedScales(("x", "B", "C"), (32, 8, 8), (0.1, 0.2, 0.3), (0.01, 0.02, 0.03), 0.004, 0.5)] * 2
    return Scales("some/mamba2", {"calib_data": "calib.txt", "conv_scales": "xbc"}, layers)


def test_segmented_scales_round_trip(tmp_path):
    scales = segmented_scales()
    path = scales.save(tmp_path / "scales.json")
    data = json.loads(path.read_text())
    f = lambda value: float(np.float32(value))  # noqa: E731 - stored as fp32 values
    assert data["layers"][1] == {"layer_idx": 1, "conv_silu": {"weight_scale": f(0.004), "bias_scale": 0.5, "segments": [
        {"name": "x", "channels": 32, "input_scale": f(0.1), "output_scale": f(0.01)},
        {"name": "B", "channels": 8, "input_scale": f(0.2), "output_scale": f(0.02)},
        {"name": "C", "channels": 8, "input_scale": f(0.3), "output_scale": f(0.03)},
    ]}}
    loaded = Scales.load(path)
    assert loaded == scales and loaded.sha256 == canonical_sha256({k: v for k, v in data.items() if k != "sha256"})
    assert [(name, part, segment.input) for name, part, segment in loaded.layers[0].segments()] == [
        ("x", slice(0, 32), f(0.1)), ("B", slice(32, 40), f(0.2)), ("C", slice(40, 48), f(0.3))]


def segment_mutations():
    def segment(key, value, k=1):
        return lambda site: site["segments"][k].__setitem__(key, value)

    return {
        "zero channels": segment("channels", 0),
        "float channels": segment("channels", 8.0),
        "no name": segment("name", ""),
        "twice the same name": segment("name", "x"),
        "negative scale": segment("output_scale", -0.5),
        "not fp32": segment("input_scale", 0.1),
        "missing scale": lambda site: site["segments"][2].pop("output_scale"),
        "one segment": lambda site: site.__setitem__("segments", site["segments"][:1]),
        "segments not a list": lambda site: site.__setitem__("segments", {"x": 1}),
        "no weight scale": lambda site: site.pop("weight_scale"),
    }


@pytest.mark.parametrize("name", sorted(segment_mutations()))
def test_scales_load_rejects_bad_segments(tmp_path, name):
    path = segmented_scales().save(tmp_path / "scales.json")
    data = json.loads(path.read_text())
    segment_mutations()[name](data["layers"][1]["conv_silu"])
    data["sha256"] = canonical_sha256({k: v for k, v in data.items() if k != "sha256"})
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match=r"layers\[1\]\.conv_silu") as error:
        Scales.load(path)
    assert "\n" not in str(error.value)


def test_scales_load_rejects_edited_or_truncated_files(tmp_path):
    path = sample_scales().save(tmp_path / "scales.json")
    text = path.read_text()
    data = json.loads(text)
    conv_scales_entry(data, 1)["input_scale"] = 2.0
    path.write_text(json.dumps(data))
    with pytest.raises(InputError, match="sha256"):
        Scales.load(path)
    path.write_text(text[: len(text) // 2])
    with pytest.raises(InputError, match="not valid JSON"):
        Scales.load(path)
    with pytest.raises(InputError, match="no such file"):
        Scales.load(tmp_path / "missing.json")


# --- the cache -------------------------------------------------------------------------------


@pytest.fixture
def counted_calibrate(monkeypatch):
    calls = []
    real = calibration.calibrate

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(calibration, "calibrate", counting)
    return calls


@pytest.fixture
def calib_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text("\n".join(random_texts(8, [20, 30, 25])) + "\n", encoding="utf-8")
    return path


def test_cache_reuses_scales(tmp_path, counted_calibrate, calib_file):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    settings = CalibrationSettings(str(calib_file), calib_samples=3, calib_seqlen=24, percentile=0.999)
    first = cached_scales("tiny", model, tokenizer, settings, tmp_path / "cache", progress=False)
    second = cached_scales("tiny", model, tokenizer, settings, tmp_path / "cache", progress=False)
    assert len(counted_calibrate) == 1
    assert second == first and second.sha256 == first.sha256
    assert second.path == first.path and second.path.parent == tmp_path / "cache"
    assert Scales.load(first.path) == first  # the cache entry is an ordinary scales file
    assert first.layers == calibrate(model, tokenizer, load_calibration_texts(str(calib_file), 3), 24, 0.999, progress=False)
    record = first.settings
    assert record["calib_samples"] == 3 and record["calib_seqlen"] == 24 and record["percentile"] == 0.999
    assert record["dtype"] == "float32" and record["calib_data_sha256"] is not None


def test_cache_misses_when_anything_that_matters_changes(tmp_path, counted_calibrate, calib_file):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    settings = CalibrationSettings(str(calib_file), calib_samples=3, calib_seqlen=24, percentile=0.999)
    cache = tmp_path / "cache"
    base = cached_scales("tiny", model, tokenizer, settings, cache, progress=False)
    cached_scales("tiny", model, tokenizer, CalibrationSettings(str(calib_file), 3, 24, 0.99), cache, progress=False)
    cached_scales("other-id", model, tokenizer, settings, cache, progress=False)
    with torch.no_grad():
        model.backbone.layers[1].mixer.conv1d.weight[0, 0, 0] += 1.0
    retrained = cached_scales("tiny", model, tokenizer, settings, cache, progress=False)
    calib_file.write_text(calib_file.read_text() + "w1 w2 w3\n", encoding="utf-8")
    cached_scales("tiny", model, tokenizer, settings, cache, progress=False)
    assert len(counted_calibrate) == 5
    assert retrained.layers[1].weight != base.layers[1].weight


def test_damaged_cache_entry_is_recomputed(tmp_path, counted_calibrate, calib_file):
    model, tokenizer = tiny_model(), tiny_tokenizer()
    settings = CalibrationSettings(str(calib_file), calib_samples=3, calib_seqlen=24)
    first = cached_scales("tiny", model, tokenizer, settings, tmp_path, progress=False)
    first.path.write_text("{")
    again = cached_scales("tiny", model, tokenizer, settings, tmp_path, progress=False)
    assert len(counted_calibrate) == 2 and again == first and Scales.load(first.path) == first


def test_default_cache_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert calibration.default_cache_dir() == tmp_path / "lm_eval_floatsim" / "scales"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert calibration.default_cache_dir() == calibration.Path.home() / ".cache" / "lm_eval_floatsim" / "scales"


@pytest.mark.parametrize(
    "changes", [{"calib_samples": 0}, {"calib_seqlen": 2.5}, {"percentile": 0}, {"percentile": 1.01}, {"calib_data": ""}]
)
def test_calibration_settings_are_validated(changes):
    with pytest.raises(ArgumentError):
        CalibrationSettings(**changes)


def test_weights_fingerprint_sees_every_parameter():
    model = tiny_model()
    before = calibration.weights_sha256(model)
    assert calibration.weights_sha256(tiny_model()) == before
    with torch.no_grad():
        model.backbone.layers[2].mixer.D[3] += 1e-6
    assert calibration.weights_sha256(model) != before


def test_conv_scales_is_recorded_only_when_it_is_not_the_default():
    """Scales files and caches written before conv_scales existed keep their settings and sha256;
    xbc scales are another cache entry."""
    assert "conv_scales" not in CalibrationSettings().record()
    assert CalibrationSettings(conv_scales="xbc").record()["conv_scales"] == "xbc"
    assert calibration.recorded_setting({}, "conv_scales") == "conv"
    model = tiny_mamba2()
    per_conv = calibration.scales_settings(CalibrationSettings(calib_data="calib.txt"), model, None)
    per_segment = calibration.scales_settings(CalibrationSettings(calib_data="calib.txt", conv_scales="xbc"), model, None)
    assert calibration.cache_path("m", per_conv, "c") != calibration.cache_path("m", per_segment, "c")
    with pytest.raises(ArgumentError, match="conv_scales"):
        CalibrationSettings(conv_scales="per_channel")


def test_the_same_weights_under_another_mixer_are_another_cache_entry():
    """A FalconMamba config over Mamba-1 weights computes other activations: its scales must not
    come from the Mamba-1 model's cache entry (the weights' hash alone is the same)."""
    import dataclasses

    from lm_eval_floatsim.mamba import MambaConfig, MambaLM

    mamba = MambaLM(MambaConfig(d_model=16, n_layer=2, vocab_size=40))
    falcon = MambaLM(dataclasses.replace(mamba.config, mixer="FalconMamba"))
    falcon.load_state_dict(mamba.state_dict())
    settings = CalibrationSettings(calib_data="calib.txt")
    for_mamba = calibration.scales_settings(settings, mamba, None)
    for_falcon = calibration.scales_settings(settings, falcon, None)
    assert for_mamba["weights_sha256"] == for_falcon["weights_sha256"] and "mixer" not in for_mamba
    assert for_falcon["mixer"] == "FalconMamba" and for_falcon["mixer_rms_eps"] == 1e-6
    assert calibration.cache_path("m", for_mamba, "c") != calibration.cache_path("m", for_falcon, "c")
