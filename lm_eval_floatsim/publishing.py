"""A run's files: its dump in dump_dir, `results["config"]["floatsim"]`, and their copies beside lm-eval's results.

`write_dump` writes the dump once the evaluation is done and announces it (`floatsim_dump_written`);
`results_section` is what lm-eval's results record of it. Once lm-eval has saved its results
(`after_results_saved`, called by `lm_eval_patches.install_results_hook`), `publish_run` copies the
dump and scales beside them and runs `floatsim_run_finished`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

from . import dumps
from .calibration import Scales
from .errors import FloatSimError
from .files import json_text, write_text_atomic
from .lm_eval_patches import logger, warn_once
from .modes import INT8_KERNEL, KERNEL_ROUNDING, QuantSpec, get_mode

# The dumps this process wrote, by the sha256 of their text: a run publishes the dump it wrote, even
# when another run of its mode (another process, or another model here) has replaced the file in
# the shared dump_dir since.
_written_dumps: dict[str, str] = {}


def write_dump(recorder, spec: QuantSpec, scales: Optional[Scales], model_id: str, dump_dir) -> dict:
    """Write the run's dump to dump_dir, announce it, and return results' `floatsim` section."""
    dump = dumps.build_dump(recorder, spec, scales.layers if scales is not None else None, _dump_meta(model_id, scales))
    text = json_text(dump)
    path = write_text_atomic(Path(dump_dir) / dumps.dump_filename(spec.mode, spec.divisor), text)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    _written_dumps[digest] = text
    logger.info("mamba_floatsim: wrote %s", path)
    _plugin_hooks().floatsim_dump_written(path=str(path), dump=dump)
    return results_section(dump, path, scales, digest)


def _dump_meta(model_id: str, scales: Optional[Scales]) -> dict:
    """What the dump's config records besides the mode: the model and where its scales came from."""
    return {
        "model": model_id,
        "scales_sha256": scales.sha256 if scales is not None else None,
        "calibration": scales.settings if scales is not None else None,
    }


def results_section(dump: dict, dump_path: Path, scales: Optional[Scales], dump_sha256: Optional[str] = None) -> dict:
    """`results["config"]["floatsim"]`: the run's settings, files and per-layer statistics."""
    config = dump["config"]
    kind = get_mode(config["mode"])
    return {
        "mode": config["mode"],
        "divisor": config["divisor"],
        "rounding": config["rounding"],
        "clamp": config["clamp"],
        "quantized_layers": config.get("layers"),  # None: every block
        "asic_dtype": config.get("asic_dtype", "float32"),
        "kernel_math": config.get("kernel_math", "exact") if kind.arithmetic == INT8_KERNEL else None,
        "operand_rounding": config.get("operand_rounding", KERNEL_ROUNDING) if kind.quantized else None,
        "model": config["model"],
        "scales_file": str(scales.path) if scales is not None and scales.path is not None else None,
        "scales_sha256": config["scales_sha256"],
        "dump_file": str(dump_path),
        "dump_sha256": dump_sha256,
        "layers": [{"layer_idx": layer["layer_idx"], **layer["stats"]} for layer in dump["layers"]],
    }


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


def after_results_saved(tracker, results) -> None:
    """Publish a floatsim run into `floatsim_<date_id>/` beside the results file lm-eval just saved."""
    if not isinstance(results, dict) or "floatsim" not in results.get("config", {}):
        return
    results_file = results_file_of(tracker)
    if getattr(tracker, "output_path", None) and results_file is None:
        warn_once("could not find lm-eval's results file: the dump stays in dump_dir only")
    output_dir = results_file.parent / f"floatsim_{tracker.date_id}" if results_file is not None else None
    try:
        folder = publish_run(results, output_dir)
    except (FloatSimError, OSError) as error:  # the results are saved already; say what is missing
        logger.error("mamba_floatsim: could not publish the run's files: %s", error)
        return
    logger.info("mamba_floatsim: run files in %s", folder)


def _plugin_hooks():
    from .plugins import plugin_manager

    return plugin_manager().hook
