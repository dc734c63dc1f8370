"""`mamba_floatsim`: lm-eval's HFLM running a MambaLM whose Conv1D+SiLU is quantized in one mode.

HFLM does the batching, tokenizing, scoring and generation bookkeeping; this subclass changes only
what differs (like lm-eval's own `mamba_ssm` model):
- model and tokenizer come from `api.load_model` (mamba_ssm or transformers checkpoints, scales
  from a file or calibration), after every model argument has been validated (`arguments`);
- the forward gets a padding mask, so that the statistics cover real tokens only: lm-eval
  right-pads loglikelihood batches (`pad_and_concat`, whose lengths are captured here) and
  left-pads generation batches (their attention mask is passed on);
- generation is greedy, with the model's recurrent state (`MambaLM.generate`);
- on CUDA, loglikelihood forwards replay CUDA graphs (`kernels.fast_path.GraphedForward`, lengths
  padded to four sizes per octave); on the CPU they run as they are;
- a `Recorder` watches the first real batch and every real position after it. Batch-size
  probing runs without it. After the evaluation, lm-eval asks `get_model_info()`: the dump is
  written then and `results["config"]["floatsim"]` summarizes it. When lm-eval saves its results
  (`EvaluationTracker.save_results_aggregated`), the dump and scales are copied beside them and
  the `floatsim_run_finished` hook runs (`publish_run`);
- data parallel (`accelerate launch` / `torchrun`): requests are split across ranks, statistics
  are all-reduced before the summary, and only rank 0 writes files;
- `--use_cache`: the response database lm-eval hands over (`set_cache_hook`) is bound to this run's
  model and arithmetic, and refused when it holds another's responses (`response_cache`).

A user error (a bad model argument, an unusable checkpoint or scales file) raises ArgumentError or
InputError. lm-eval lets it escape as a traceback; importing this module makes an uncaught one print
as the single line that says what is wrong (`sys.excepthook`), and leaves every other error alone.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
from lm_eval.models.huggingface import HFLM

from . import dumps, response_cache
from .arguments import parse_model_args
from .calibration import CalibrationSettings, Scales, cached_scales
from .errors import FloatSimError
from .files import json_text, write_text_atomic
from .kernels.fast_path import GraphedForward
from .quant import QuantSpec
from .recorder import Recorder

# lm-eval attaches its handler to the "lm_eval" logger only; messages logged beneath it are
# formatted and filtered like lm-eval's own (LMEVAL_LOG_LEVEL).
logger = logging.getLogger("lm_eval.models.mamba_floatsim")

MODEL_NAME = "mamba_floatsim"
# The dumps this process wrote, by the sha256 of their text: a run publishes the dump it wrote, even
# when another run of its mode (another process, or another model here) has replaced the file in
# the shared dump_dir since.
_written_dumps: dict[str, str] = {}
# Mamba has no position limit; the context lm-eval's own mamba_ssm model uses.
DEFAULT_MAX_LENGTH = 2048
# lm-eval's arguments that change a response, besides the model and its arithmetic.
RESPONSE_ARGUMENTS = ("max_length", "truncation", "add_bos_token", "prefix_token_id", "softmax_dtype")


class FloatSimLM(HFLM):
    """lm-eval model `mamba_floatsim`. Model arguments: see `arguments.ModelArgs`."""

    def __init__(self, **model_args) -> None:
        args = parse_model_args(model_args)  # every argument is checked before anything is loaded
        self.floatsim_args = args
        self.scales: Optional[Scales] = None
        self._padding_mask: Optional[torch.Tensor] = None
        self._statistics_closed = False
        self._response_cache: Optional[dict] = None
        _install_results_hook()
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if _launched_data_parallel() and torch.device(device).type == "cpu":
            _start_cpu_process_group()
        super().__init__(
            pretrained=args.pretrained,
            backend="causal",
            tokenizer=args.tokenizer,
            device=device,
            dtype=args.dtype,
            revision=args.revision or "main",
            **{"max_length": DEFAULT_MAX_LENGTH, **args.harness},
        )
        self._use_all_processes()
        self._start_run()

    # --- building: HFLM's steps, with our loader -------------------------------------------------

    def _get_config(self, pretrained: str, **kwargs) -> None:
        self._config = None  # the MambaConfig, once _create_model has read the checkpoint

    def _create_tokenizer(self, pretrained, tokenizer, **kwargs) -> None:
        """Nothing here: `api.load_model` returns the tokenizer with the model (`_create_model`)."""

    def _create_model(self, pretrained: str, **kwargs) -> None:
        from .api import load_model

        args = self.floatsim_args
        with self._main_process_first():  # rank 0 calibrates and caches the scales; the others read them
            loaded = load_model(
                args.pretrained,
                mode=args.mode,
                divisor=args.divisor,
                rounding=args.rounding,
                clamp=args.clamp,
                scales=args.scales,
                calib_data=args.calib_data,
                calib_samples=args.calib_samples,
                calib_seqlen=args.calib_seqlen,
                percentile=args.percentile,
                dtype=args.dtype,
                device=str(self._device),
                tokenizer=args.tokenizer,
                revision=args.revision,
                progress=self._is_main_process(),
            )
        self._model, self.tokenizer, self.scales = loaded
        self._config = loaded.model.config
        self._forward = GraphedForward(loaded.model)

    def _main_process_first(self):
        accelerator = getattr(self, "accelerator", None)
        return accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()

    def _is_main_process(self) -> bool:
        accelerator = getattr(self, "accelerator", None)
        return accelerator is None or accelerator.is_main_process

    def _use_all_processes(self) -> None:
        """Split the requests over every launched process, on CPU too.

        HFLM takes rank and world size from accelerate only when there are several GPUs; with
        `torchrun --nproc_per_node 2` on CPU every process would evaluate everything and write.
        """
        accelerator = getattr(self, "accelerator", None)
        if accelerator is not None and accelerator.num_processes > 1:
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes

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

    def switch_mode(self, mode: str, divisor=None, rounding=None, clamp=None) -> None:
        """Re-quantize the loaded model in another mode with the same scales; the next evaluation is
        a new run (fresh recorder, its own dump file). None keeps the current value."""
        current = self.floatsim_args
        spec = QuantSpec(
            mode,
            current.divisor if divisor is None else divisor,
            current.rounding if rounding is None else rounding,
            current.clamp if clamp is None else clamp,
        )
        if spec.quantized and self.scales is None:
            self.scales = self._calibrated_scales()
        self.model.quantize(spec, self.scales.layers if self.scales is not None else None)
        self.floatsim_args = dataclasses.replace(
            current, mode=spec.mode, divisor=spec.divisor, rounding=spec.rounding, clamp=spec.clamp
        )
        self._start_run()

    def _calibrated_scales(self) -> Scales:
        """The scales load_model would have used for a quantized mode (the model was loaded in fp)."""
        args = self.floatsim_args
        chosen = dict(
            calib_data=args.calib_data,
            calib_samples=args.calib_samples,
            calib_seqlen=args.calib_seqlen,
            percentile=args.percentile,
        )
        settings = CalibrationSettings(**{name: value for name, value in chosen.items() if value is not None})
        with self._main_process_first():
            return cached_scales(args.model_id, self.model, self.tokenizer, settings, progress=self._is_main_process())

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
        code_range = spec.code_range()
        return {
            "model": args.model_id,
            "tokenizer": getattr(self.tokenizer, "name_or_path", None),
            "dtype": str(self.model.dtype).removeprefix("torch."),
            "mode": spec.mode,
            "divisor": spec.divisor if spec.mode == "better" else None,
            "rounding": spec.output_rounding if spec.quantized else None,
            "code_range": list(code_range) if code_range is not None else None,
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
        """Run each distinct request once, on this rank alone.

        In data-parallel runs lm-eval pads every rank's request list with copies of its last
        request, and loglikelihood_rolling pads its windows across ranks, so that DDP/FSDP
        forwards stay in lockstep. The model here has no collective operation; those copies would
        only cost time and count positions twice in the statistics. They get the result of the
        request they copy; inside the method the rank sees itself as a single process.
        """
        self._start_run_if_finished()
        distinct, positions = _without_copies(requests)
        world_size, self._world_size = self._world_size, 1
        try:
            results = method(distinct, disable_tqdm=disable_tqdm)
        finally:
            self._world_size = world_size
        return [results[position] for position in positions]

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
        with self._capturing_padding():
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)

    @contextlib.contextmanager
    def _capturing_padding(self):
        """Learn which positions of a right-padded loglikelihood batch are real.

        HFLM builds the batch with `pad_and_concat(length, rows, "right")` and calls `_model_call`
        with the result and no mask; padding is the token 0, which is also a real token. While
        HFLM's `_loglikelihood_tokens` runs, its `pad_and_concat` is wrapped to note the row
        lengths; `_model_call` takes the mask they imply.
        """
        module = sys.modules[HFLM.__module__]
        original = getattr(module, "pad_and_concat", None)
        if original is None:
            _warn_once("this lm-eval has no pad_and_concat in HFLM's module: loglikelihood statistics include padding")
            yield
            return

        def pad_and_note_lengths(max_length, tensors, padding_side="right"):
            lengths = [tensor.shape[-1] for tensor in tensors]  # before pad_and_concat pads them in place
            batch = original(max_length, tensors, padding_side)
            self._padding_mask = padding_mask(lengths, max_length, padding_side, batch.device)
            return batch

        module.pad_and_concat = pad_and_note_lengths
        try:
            yield
        finally:
            module.pad_and_concat = original
            self._padding_mask = None

    def _take_padding_mask(self, input_ids: torch.Tensor) -> Optional[torch.Tensor]:
        mask, self._padding_mask = self._padding_mask, None
        if mask is not None and mask.shape != input_ids.shape:
            _warn_once(f"padding mask {tuple(mask.shape)} does not fit the batch {tuple(input_ids.shape)}: ignored")
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
            torch.distributed.all_reduce(self.recorder.partial_sums, op=torch.distributed.ReduceOp.SUM)
            torch.distributed.all_reduce(self.recorder.partial_maxes, op=torch.distributed.ReduceOp.MAX)
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
            _warn_once("lm-eval did not gather results across ranks: the statistics are rank 0's only")
        self._statistics_closed = True
        args, scales = self.floatsim_args, self.scales
        meta = {
            "model": args.model_id,
            "scales_sha256": scales.sha256 if scales is not None else None,
            "calibration": scales.settings if scales is not None else None,
        }
        dump = dumps.build_dump(self.recorder, self.spec, scales.layers if scales is not None else None, meta)
        text = json_text(dump)
        path = write_text_atomic(Path(args.dump_dir) / dumps.dump_filename(self.spec.mode, self.spec.divisor), text)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        _written_dumps[digest] = text
        logger.info("mamba_floatsim: wrote %s", path)
        _plugin_hooks().floatsim_dump_written(path=str(path), dump=dump)
        return {**results_section(dump, path, scales, digest), "use_cache": self._response_cache}


def _launched_data_parallel() -> bool:
    """Started by torchrun or accelerate launch with several processes (they set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _start_cpu_process_group() -> None:
    """Initialize accelerate's (process-wide) state for a multi-process CPU run, with gloo.

    accelerate sets up CPU processes only when told the run is on CPU (`cpu=True`), which HFLM's
    `Accelerator()` does not say: under torchrun on a machine without GPUs every process would
    believe it is alone. The Accelerator that HFLM creates next shares this state. The timeout is
    HFLM's: a long evaluation on one rank must not time the others out.
    """
    from accelerate import Accelerator, InitProcessGroupKwargs

    Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(weeks=52))])


def results_section(dump: dict, dump_path: Path, scales: Optional[Scales], dump_sha256: Optional[str] = None) -> dict:
    """`results["config"]["floatsim"]`: the run's settings, files and per-layer statistics."""
    config = dump["config"]
    return {
        "mode": config["mode"],
        "divisor": config["divisor"],
        "rounding": config["rounding"],
        "clamp": config["clamp"],
        "model": config["model"],
        "scales_file": str(scales.path) if scales is not None and scales.path is not None else None,
        "scales_sha256": config["scales_sha256"],
        "dump_file": str(dump_path),
        "dump_sha256": dump_sha256,
        "layers": [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]],
    }


def padding_mask(lengths: list[int], max_length: int, padding_side: str, device) -> Optional[torch.Tensor]:
    """(batch, max_length) with 1 on real tokens; None when no row is padded."""
    if all(length == max_length for length in lengths):
        return None
    positions = torch.arange(max_length)
    real = torch.tensor(lengths)[:, None]
    mask = positions < real if padding_side == "right" else positions >= max_length - real
    return mask.to(device=device, dtype=torch.long)


def _without_copies(requests: list) -> tuple[list, list[int]]:
    """The requests without lm-eval's padding copies, and for each original position its result's index.

    lm-eval lists a request `repeats` times; data-parallel padding appends the same object again.
    """
    distinct: list = []
    positions: list[int] = []
    seen: dict[int, tuple[int, int]] = {}  # id -> (occurrences kept, index of the first)
    for request in requests:
        kept, first = seen.get(id(request), (0, len(distinct)))
        if kept < getattr(request, "repeats", 1):
            positions.append(len(distinct))
            distinct.append(request)
            seen[id(request)] = (kept + 1, first)
        else:
            positions.append(first)
    return distinct, positions


def _warn_if_not_greedy(generation_kwargs: dict) -> None:
    sampling = bool(generation_kwargs.get("do_sample")) or float(generation_kwargs.get("temperature") or 0) > 0
    ignored = sorted(key for key in generation_kwargs if key not in ("do_sample", "temperature"))
    if sampling or ignored:
        shown = {key: generation_kwargs[key] for key in sorted(generation_kwargs)}
        _warn_once(f"mamba_floatsim decodes greedily; ignoring generation settings {shown}")


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)


def _plugin_hooks():
    from .plugins import plugin_manager

    return plugin_manager().hook


def _one_line_user_errors(previous):
    def excepthook(kind, error, traceback):
        if isinstance(error, FloatSimError):
            print(f"{MODEL_NAME}: error: {error}", file=sys.stderr)
        else:
            previous(kind, error, traceback)

    excepthook.floatsim_one_line = True
    return excepthook


if not getattr(sys.excepthook, "floatsim_one_line", False):
    sys.excepthook = _one_line_user_errors(sys.excepthook)


# --- after lm-eval has saved its results ------------------------------------------------------


def publish_run(results: dict, output_dir=None) -> Path:
    """Copy the run's dump and scales into `output_dir` (when given) and call `floatsim_run_finished`.

    `results` is lm-eval's results dict with `config.floatsim`. Without `output_dir`, the run's
    files stay where they are and the hook is told the dump folder. Returns the folder used.
    """
    section = results["config"]["floatsim"]
    dump_path = Path(section["dump_file"])
    dump_text = _written_dumps.get(section.get("dump_sha256")) or dump_path.read_text(encoding="utf-8")
    scales_path = Path(section["scales_file"]) if section["scales_file"] else None
    if output_dir is not None:
        dump_path = write_text_atomic(Path(output_dir) / dump_path.name, dump_text)
        scales_path = _copy_into(scales_path, Path(output_dir)) if scales_path is not None else None
    run = {
        "results": results,
        "dump": json.loads(dump_text),
        "dump_path": str(dump_path),
        "scales": json.loads(scales_path.read_text(encoding="utf-8")) if scales_path is not None else None,
    }
    folder = dump_path.parent
    _plugin_hooks().floatsim_run_finished(run=run, output_dir=str(folder))
    return folder


def _copy_into(path: Path, folder: Path) -> Path:
    return write_text_atomic(folder / path.name, path.read_text(encoding="utf-8"))


def results_file_of(tracker) -> Optional[Path]:
    """The results file EvaluationTracker.save_results_aggregated just wrote (its naming rule), or None."""
    output_path, date_id = getattr(tracker, "output_path", None), getattr(tracker, "date_id", None)
    if not output_path or not date_id:
        return None
    path = Path(output_path)
    if path.suffix == ".json":
        written = path.with_name(f"{path.stem}_{date_id}.json")
    else:
        model_folder = getattr(getattr(tracker, "general_config_tracker", None), "model_name_sanitized", None)
        written = path / str(model_folder) / f"results_{date_id}.json"
    return written if written.is_file() else None


def _after_results_saved(tracker, results) -> None:
    if not isinstance(results, dict) or "floatsim" not in results.get("config", {}):
        return
    results_file = results_file_of(tracker)
    if getattr(tracker, "output_path", None) and results_file is None:
        _warn_once("could not find lm-eval's results file: the dump stays in dump_dir only")
    output_dir = results_file.parent / f"floatsim_{tracker.date_id}" if results_file is not None else None
    try:
        folder = publish_run(results, output_dir)
    except (FloatSimError, OSError) as error:  # the results are saved already; say what is missing
        logger.error("mamba_floatsim: could not publish the run's files: %s", error)
        return
    logger.info("mamba_floatsim: run files in %s", folder)


def _install_results_hook() -> None:
    """Wrap EvaluationTracker.save_results_aggregated (once per process) to publish the run after it."""
    try:
        from lm_eval.loggers.evaluation_tracker import EvaluationTracker
    except ImportError:
        EvaluationTracker = None
    original = getattr(EvaluationTracker, "save_results_aggregated", None)
    if original is None:
        _warn_once("this lm-eval has no EvaluationTracker.save_results_aggregated: dumps are written to dump_dir only")
        return
    if getattr(original, "floatsim_wrapped", False):
        return

    @functools.wraps(original)
    def save_results_aggregated(tracker, results, *args, **kwargs):
        saved = original(tracker, results, *args, **kwargs)
        _after_results_saved(tracker, results)
        return saved

    save_results_aggregated.floatsim_wrapped = True
    EvaluationTracker.save_results_aggregated = save_results_aggregated
