"""An example lm-eval-floatsim plugin: every quantized run must keep each layer above an SQNR floor.

It adds one section to `lm-eval-floatsim compare`: per run, its weakest layer, and a check that
fails (making `compare` exit 1) when a layer's SQNR falls below SQNR_FLOOR_DB.
"""

from lm_eval_floatsim import hookimpl

SQNR_FLOOR_DB = 20.0


def run_label(run):
    section = run["results"]["config"]["floatsim"]
    return section["mode"] if section["mode"] != "better" else f"better/{section['divisor']:g}"


def weakest_layer(run):
    """(sqnr_db, layer_idx) of the run's lowest-SQNR layer, or None when no layer has an SQNR (fp)."""
    found = [(layer["stats"]["sqnr_db"], layer["layer_idx"]) for layer in run["dump"]["layers"]
             if layer.get("stats", {}).get("sqnr_db") is not None]
    return min(found) if found else None


@hookimpl
def floatsim_compare_sections(runs):
    rows, checks = [], []
    for run in runs:
        weakest = weakest_layer(run)
        if weakest is None:
            continue
        sqnr, layer_idx = weakest
        rows.append(f"| {run_label(run)} | {layer_idx} | {sqnr:.2f} |")
        checks.append({
            "name": f"{run_label(run)}: every layer's SQNR >= {SQNR_FLOOR_DB:g} dB",
            "ok": sqnr >= SQNR_FLOOR_DB,
            "detail": f"weakest layer {layer_idx} at {sqnr:.2f} dB",
        })
    table = "\n".join(["| run | weakest layer | SQNR (dB) |", "| --- | ---: | ---: |", *rows])
    return [{"title": "Example plugin: SQNR floor", "markdown": table, "checks": checks}]
