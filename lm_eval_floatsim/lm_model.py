"""`mamba_floatsim`: lm-eval's HFLM running a MambaLM whose Conv1D+SiLU is quantized in one mode.

HFLM does the batching, tokenizing, scoring and generation bookkeeping; FloatSimLM changes only
what differs (like lm-eval's own `mamba_ssm` model):
- model and tokenizer come from `api.load_model` (mamba_ssm or transformers checkpoints, scales
  from a file or calibration), after every model argument has been validated (`arguments`);
- the forward gets a padding mask, so that the statistics cover real tokens only: loglikelihood
  batches are right-padded (`scoring`, which notes the lengths) and lm-eval left-pads generation
  batches (their attention mask is passed on);
- loglikelihood requests are scored a batch at a time (`scoring`), with HFLM's answers bit for
  bit, instead of a dozen small GPU operations per request;
- generation is greedy, with the model's recurrent state (`MambaLM.generate`);
- on CUDA, loglikelihood forwards replay CUDA graphs (`kernels.fast_path.GraphedForward`, lengths
  padded to four sizes per octave); on the CPU they run as they are;
- a `Recorder` watches the first real batch and every real position after it. Batch-size
  probing runs without it. After the evaluation, lm-eval asks `get_model_info()`: the dump is
  written then and `results["config"]["floatsim"]` summarizes it; once lm-eval has saved its
  results, the run's files are copied beside them (`publishing`);
- data parallel (`accelerate launch` / `torchrun`): requests are split across ranks, statistics
  are all-reduced before the summary, and only rank 0 writes files (`data_parallel`);
- `--use_cache`: the response database lm-eval hands over (`set_cache_hook`) is bound to this run's
  model and arithmetic, and refused when it holds another's responses (`response_cache`).
- two of lm-eval's fixed costs per evaluation are cut, with results unchanged: a perplexity's
  bootstrapped standard error is drawn with numpy (`bootstrap`, lm-eval's number bit for bit) and
  each prompt template is compiled once instead of once per document.

A user error (a bad model argument, an unusable checkpoint or scales file) raises ArgumentError or
InputError; once a FloatSimLM is being constructed, an uncaught one prints as the single line that
says what is wrong. That and every other patch of lm-eval, and the HFLM private members this class
relies on, are in `lm_eval_patches`. Importing this module changes nothing process-wide.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from lm_eval.models.huggingface import HFLM

from . import data_parallel, lm_eval_patches, publishing, response_cache, scoring
from .arguments import parse_model_args
from .calibration import CalibrationSettings, Scales, cached_scales
from .kernels.fast_path import GraphedForward
from .lm_eval_patches import warn_once
from .modes import QuantSpec, parse_layers
from .recorder import Recorder

# Mamba has no position limit; the context lm-eval's own mamba_ssm model uses.
DEFAULT_MAX_LENGTH = 2048
# lm-eval's arguments that change a response, besides the model and its arithmetic.
RESPONSE_ARGUMENTS = ("max_length", "truncation", "add_bos_token", "prefix_token_id", "softmax_dtype")


# switch_mode's default for `layers`, whose None means every block.
KEEP = object()


class FloatSimLM(HFLM):
    """lm-eval model `mamba_floatsim`. Model arguments: see `arguments.ModelArgs`."""

    def __init__(self, **model_args) -> None:
        lm_eval_patches.install_one_line_user_errors()  # first: a bad model argument is one line too
        args = parse_model_args(model_args)  # every argument is checked before anything is loaded
        self.floatsim_args = args
        self.scales: Optional[Scales] = None
        self._padding_mask: Optional[torch.Tensor] = None
        self._statistics_closed = False
        self._response_cache: Optional[dict] = None
        self._encoded_pairs: dict = {}
        lm_eval_patches.install_results_hook(publishing.after_results_saved)
        lm_eval_patches.install_fast_bootstrap()
        lm_eval_patches.install_compiled_templates()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if data_parallel.launched() and torch.device(device).type == "cpu":
            data_parallel.start_cpu_process_group()
        super().__init__(
            pretrained=args.pretrained,
            backend="causal",
            tokenizer=args.tokenizer,
            device=device,
            dtype=args.dtype,
            revision=args.revision or "main",
            **{"max_length": DEFAULT_MAX_LENGTH, **args.harness},
        )
        data_parallel.use_all_processes(self)
        self._start_run()

    # --- building: HFLM's steps, with our loader -------------------------------------------------

    def _get_config(self, pretrained: str, **kwargs) -> None:
        self._config = None  # the MambaConfig, once _create_model has read the checkpoint

    def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
        """Nothing here: `api.load_model` returns the tokenizer with the model (`_create_model`)."""

    def _create_model(self, pretrained: str, **kwargs) -> None:
        from .api import load_model

        args = self.floatsim_args
        with data_parallel.main_process_first(self):
            loaded = load_model(
                args.pretrained,
                mode=args.mode,
                divisor=args.divisor,
                rounding=args.rounding,
                clamp=args.clamp,
                layers=args.layers,
                asic_dtype=args.asic_dtype,
                kernel_math=args.kernel_math,
                operand_rounding=args.operand_rounding,
                scales=args.scales,
                **args.calibration,
                dtype=args.dtype,
                device=str(self._device),
                tokenizer=args.tokenizer,
                revision=args.revision,
                progress=data_parallel.is_main_process(self),
            )
        self._model, self.tokenizer, self.scales = loaded
        self._config = loaded.model.config
        self._forward = GraphedForward(loaded.model)

    # --- one run = one recorder, one dump --------------------------------------------------------

    @property
    def spec(self) -> QuantSpec:
        return self.floatsim_args.spec

    def _start_run(self) -> None:
        self.recorder = Recorder(self.model.config.n_layer, self.floatsim_args.dump_n, device=self.device)
        self.model.recorder = self.recorder
        self._forward.reset()
        self._statistics_closed = False

    def _start_run_if_finished(self) -> None:
        # A further simple_evaluate on this instance is a new run: fresh statistics and snapshot.
        if self._statistics_closed:
            self._start_run()

    def switch_mode(self, mode: str, divisor=None, rounding=None, clamp=None, layers=KEEP) -> None:
        """Re-quantize the loaded model in another mode with the same scales; the next evaluation is
        a new run (fresh recorder, its own dump file). None keeps the current value; `layers` (None:
        every block) keeps the current blocks unless given."""
        current = self.floatsim_args
        spec = dataclasses.replace(
            current.spec,
            mode=mode,
            divisor=current.divisor if divisor is None else divisor,
            rounding=current.rounding if rounding is None else rounding,
            clamp=current.clamp if clamp is None else clamp,
            layers=current.layers if layers is KEEP else parse_layers(layers),
        )
        if spec.quantized and self.scales is None:
            self.scales = self._calibrated_scales()
        self.model.quantize(spec, self.scales.layers if self.scales is not None else None)
        self.floatsim_args = dataclasses.replace(
            current, mode=spec.mode, divisor=spec.divisor, rounding=spec.rounding, clamp=spec.clamp, layers=spec.layers
        )
        self._start_run()

    def _calibrated_scales(self) -> Scales:
        """The scales load_model would have used for a quantized mode (the model was loaded in fp)."""
        args = self.floatsim_args
        settings = CalibrationSettings(**args.calibration)
        with data_parallel.main_process_first(self):
            progress = data_parallel.is_main_process(self)
            return cached_scales(args.model_id, self.model, self.tokenizer, settings, progress=progress)

    # --- lm-eval's response cache ---------------------------------------------------------------

    def set_cache_hook(self, cache_hook) -> None:
        """`--use_cache`: lm-eval's CachingLM hands over its database before it looks anything up.

        This is the start of an evaluation, which may answer every request from the cache without
        calling the model: a finished run's statistics must not be reported for it.
        """
        super().set_cache_hook(cache_hook)
        self._start_run_if_finished()
        database = getattr(cache_hook, "dbdict", None)
        if database is None:
            self._response_cache = None
            return
        held = response_cache.claim(database, self.response_settings())
        self._response_cache = {"database": str(getattr(database, "filename", "")), "responses_before_run": held}

    def response_settings(self) -> dict:
        """What a response depends on besides its request: the model and the arithmetic of the mode."""
        args, spec = self.floatsim_args, self.spec
        return {
            "model": args.model_id,
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            **spec.settings(),
            "scales_sha256": self.scales.sha256 if spec.quantized else None,
            **{name: args.harness[name] for name in RESPONSE_ARGUMENTS if name in args.harness},
        }

    # --- requests: each rank runs its own, without lm-eval's cross-rank padding -------------------

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self._run_requests(super().loglikelihood, requests, disable_tqdm)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self._run_requests(super().loglikelihood_rolling, requests, disable_tqdm)

    def generate_until(self, requests, disable_tqdm: bool = False):
        return self._run_requests(super().generate_until, requests, disable_tqdm)

    def _run_requests(self, method, requests, disable_tqdm: bool):
        self._start_run_if_finished()
        return data_parallel.run_alone(self, method, requests, disable_tqdm)

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # A sweep evaluates the same requests in every run: each pair is tokenized once.
        if (context, continuation) not in self._encoded_pairs:
            self._encoded_pairs[(context, continuation)] = super()._encode_pair(context, continuation)
        context_enc, continuation_enc = self._encoded_pairs[(context, continuation)]
        return list(context_enc), list(continuation_enc)

    def _detect_batch_size(self, requests=None, pos: int = 0):
        # The probe's forwards are not part of the evaluation: no snapshot, no statistics, and no
        # CUDA graphs of batches that only test the memory.
        self.model.recorder = None
        forward, self._forward = self._forward, self.model
        try:
            return super()._detect_batch_size(requests, pos)
        finally:
            self.model.recorder = self.recorder
            self._forward = forward

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        """HFLM's answers, each batch scored at once (`scoring`). HFLM pads these batches with the
        token 0, which is also a real token: the rows' lengths, noted as they are padded, tell
        `_model_call` which positions are real."""
        try:
            return scoring.loglikelihood_tokens(self, requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._padding_mask = None

    def _note_padding(self, lengths: list[int], max_length: int, padding_side: str, device) -> None:
        self._padding_mask = padding_mask(lengths, max_length, padding_side, device)

    def _take_padding_mask(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        mask, self._padding_mask = self._padding_mask, None
        if mask is not None and mask.shape != input_ids.shape:
            warn_once(f"padding mask {tuple(mask.shape)} does not fit the batch {tuple(input_ids.shape)}: ignored")
            return None
        return mask

    def _arm_recorder(self) -> None:
        if self.model.recorder is not None:
            self.model.recorder.arm()  # only the first armed forward is the snapshot batch

    def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
        """Logits of a loglikelihood batch; on CUDA replayed from a CUDA graph (kernels.fast_path)."""
        mask = self._take_padding_mask(inps)
        self._arm_recorder()
        with torch.no_grad():
            return self._forward(inps, mask=mask)

    def _model_generate(self, context: torch.Tensor, max_length: int, stop, **generation_kwargs) -> torch.Tensor:
        """Greedy decoding with the recurrent state; HFLM cuts the text at the stop sequences."""
        mask = generation_kwargs.pop("attention_mask", None)
        _warn_if_not_greedy(generation_kwargs)
        self._arm_recorder()
        return self.model.generate(
            context, max_new_tokens=max_length - context.shape[1], mask=mask, eos_token_id=self.eot_token_id
        )

    # --- the end of a run ------------------------------------------------------------------------

    def gather_object(self, obj, dst: int = 0):
        # lm-eval gathers the per-sample results once every request has run, on every rank: the
        # one point where all ranks can combine their statistics.
        self._close_statistics()
        return super().gather_object(obj, dst)

    def _close_statistics(self) -> None:
        if self._statistics_closed:
            return
        if self.world_size > 1:
            data_parallel.combine_statistics(self.recorder)
        self._statistics_closed = True

    def get_model_info(self) -> dict:
        """HFLM's model info plus `floatsim`: lm-eval asks (on rank 0) once the evaluation is done."""
        info = super().get_model_info()
        if self.rank == 0:
            info["floatsim"] = self.write_dump()
        return info

    def write_dump(self) -> dict:
        """Write this run's dump to dump_dir, announce it, and return results' `floatsim` section."""
        if not self._statistics_closed and self.world_size > 1:
            warn_once("lm-eval did not gather results across ranks: the statistics are rank 0's only")
        self._statistics_closed = True
        args = self.floatsim_args
        section = publishing.write_dump(self.recorder, self.spec, self._recorded_scales(), args.model_id, args.dump_dir)
        return {**section, "use_cache": self._response_cache}

    def _recorded_scales(self) -> Optional[Scales]:
        """The scales this run records: an `fp` run loads none unless given a scales file
        (`api.load_model`), also when a sweep has calibrated this model for another mode."""
        return self.scales if self.spec.quantized or self.floatsim_args.scales is not None else None


def padding_mask(lengths: list[int], max_length: int, padding_side: str, device) -> Optional[torch.Tensor]:
    """(batch, max_length) with 1 on real tokens; None when no row is padded."""
    if all(length == max_length for length in lengths):
        return None
    positions = torch.arange(max_length)
    real = torch.tensor(lengths)[:, None]
    mask = positions < real if padding_side == "right" else positions >= max_length - real
    return mask.to(device=device, dtype=torch.long)


def _warn_if_not_greedy(generation_kwargs: dict) -> None:
    sampling = bool(generation_kwargs.get("do_sample")) or float(generation_kwargs.get("temperature") or 0) > 0
    ignored = sorted(key for key in generation_kwargs if key not in ("do_sample", "temperature"))
    if sampling or ignored:
        shown = {key: generation_kwargs[key] for key in sorted(generation_kwargs)}
        warn_once(f"mamba_floatsim decodes greedily; ignoring generation settings {shown}")
