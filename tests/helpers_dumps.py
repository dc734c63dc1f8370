"""Good dumps of every mode from one forward of a tiny random 24-block model, with absmax scales:
input for the tests of what reads dumps."""

import torch

from lm_eval_floatsim.dump_command import write_mode_dumps
from lm_eval_floatsim.mamba import MambaConfig, MambaLM
from lm_eval_floatsim.quant import LayerScales, QuantSpec, SegmentedScales

N_LAYER = 24
VOCAB = 64
ALL_MODES = ("int8", "same", "better", "fp")
META = {"model": "tiny-test-model", "scales_sha256": "ab" * 32, "calibration": {"calib_samples": 1}}


def tiny_model(n_layer=N_LAYER, seed=0) -> MambaLM:
    torch.manual_seed(seed)
    return MambaLM(MambaConfig(d_model=16, n_layer=n_layer, vocab_size=VOCAB)).eval()


def tiny_input(length=16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, length), generator=torch.Generator().manual_seed(1))


def conv_absmaxes(model, input_ids, widths) -> tuple[dict, dict]:
    """Per block, the absmax of the conv input and of its output in each channel segment of
    `widths`, from one fp forward: ({block: [per segment]}, {block: [per segment]})."""
    config = model.config
    start = config.d_inner if config.mixer == "Mamba2" else 0  # in_proj's output: (x, z), or (z, xBC, dt)
    inputs, outputs = {}, {}

    def segment_absmaxes(t):
        return [part.abs().max().item() for part in t.split(widths, -1)]

    class OutputAbsmax:
        def layer(self, layer_idx, mask):
            return lambda before, after, codes, clamped: outputs.__setitem__(layer_idx, segment_absmaxes(before))

    hooks = [
        layer.mixer.in_proj.register_forward_hook(
            lambda module, args, out, i=i: inputs.__setitem__(i, segment_absmaxes(out[..., start : start + config.conv_dim]))
        )
        for i, layer in enumerate(model.backbone.layers)
    ]
    model.recorder = OutputAbsmax()
    with torch.no_grad():
        model(input_ids)
    model.recorder = None
    for hook in hooks:
        hook.remove()
    return inputs, outputs


def absmax_scales(model, input_ids) -> list:
    """Scales from one fp forward: absmax / 127 of the conv input, output, weight and bias.

    Test scaffolding, not SPEC calibration: any positive scales exercise the dumps equally.
    """
    inputs, outputs = conv_absmaxes(model, input_ids, (model.config.conv_dim,))
    conv = [layer.mixer.conv1d for layer in model.backbone.layers]
    return [
        LayerScales(inputs[i][0] / 127, outputs[i][0] / 127, conv[i].weight.abs().max().item() / 127, conv[i].bias.abs().max().item() / 127)
        for i in range(len(conv))
    ]


def write_good_dumps(folder, modes=ALL_MODES, dump_n=10, n_layer=N_LAYER, length=16) -> dict:
    """Every mode's dump of one forward of the tiny model, same scales for all: {mode: path}."""
    model, input_ids = tiny_model(n_layer), tiny_input(length)
    scales = absmax_scales(model, input_ids)
    specs = [QuantSpec(mode) for mode in modes]
    return dict(zip(modes, write_mode_dumps(model, input_ids, specs, scales, folder, dump_n, META)))


def write_segmented_dumps(folder, modes=("int8", "same", "better"), n_layer=3) -> dict:
    """Dumps of one forward of a tiny random Mamba-2 whose conv is quantized in its segments x, B
    and C (conv_scales=xbc), with absmax scales per segment: {mode: path}."""
    torch.manual_seed(0)
    config = MambaConfig(d_model=16, n_layer=n_layer, vocab_size=VOCAB, d_state=4, mixer="Mamba2", headdim=8, ngroups=2,
                         mixer_rms_eps=1e-5)
    model, input_ids = MambaLM(config).eval(), tiny_input()
    segments = config.conv_segments()
    widths = tuple(segments.values())
    inputs, outputs = conv_absmaxes(model, input_ids, widths)
    scales = []
    for i, layer in enumerate(model.backbone.layers):
        conv = layer.mixer.conv1d
        scales.append(SegmentedScales(tuple(segments), widths, tuple(v / 127 for v in inputs[i]), tuple(v / 127 for v in outputs[i]),
                                      conv.weight.abs().max().item() / 127, conv.bias.abs().max().item() / 127))
    specs = [QuantSpec(mode) for mode in modes]
    return dict(zip(modes, write_mode_dumps(model, input_ids, specs, scales, folder, 40, META)))
