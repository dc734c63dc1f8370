"""Fuzzed readers: dumps, scales and results files from other machines, damaged in every way.

Each reader (dumps.read_dump, calibration.Scales.load, runs.load_run) and the `check` and `compare`
commands (through cli.main, in-process) are fed valid documents mutated by hypothesis: values
replaced by others of any type, keys deleted, huge numbers (1e308, 1e309 which parses as inf,
integers of hundreds of digits), deep nesting, truncated or non-UTF-8 text. The contract: the file
is read, or the reader raises InputError with one line (the commands: exit 2 with one line on
stderr), never another exception and never a hang (each example runs under a time limit).

The examples are derandomized (the same every run, no example database written into the tree) and
few, so that the file takes seconds; `@example`s pin the inputs that once broke a reader.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import re
import signal
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from helpers_runs import make_dump, make_results, make_scales
from lm_eval_floatsim import cli
from lm_eval_floatsim.calibration import Scales
from lm_eval_floatsim.dumps import read_dump
from lm_eval_floatsim.errors import InputError
from lm_eval_floatsim.runs import load_run

SECONDS_PER_EXAMPLE = 20  # a hang, not a slow machine: one example takes ~0.1 s here
FUZZ = settings(
    max_examples=40,
    deadline=None,  # the time limit below interrupts a hang; a deadline would only flag slow examples
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Values that have broken JSON readers: floats at and beyond the double range (1e309 parses as
# inf), integers no float holds, denormals, and types where numbers belong.
AWKWARD = [0, -1, 1.5, 2025, 10**30, 10**400, 1e308, -1e308, 5e-324, "", "0.5", [], {}, True, None]
KNOWN_KEYS = ["config", "layers", "layer_idx", "effective_scale", "output_scale", "before_quant", "after_quant",
              "codes", "stats", "n_layer", "dump_n", "mode", "divisor", "code_range", "format", "model", "settings",
              "sha256", "results", "floatsim", "dump_file", "scales_file", "nonfinite", "count"]
# Textual substitutions for a number of a valid document: what a JSON parser sees, not a Python value.
NUMBER_SUBSTITUTES = ["1e309", "-1e309", "1e99999", "NaN", "-Infinity", "1" * 5000, "1" * 4000, "[" * 50000 + "]" * 50000,
                      "[" * 500 + "]" * 500, '"\\ud800"', "null", "true", '{"a": 1}']

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6) | st.sampled_from(AWKWARD),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(KNOWN_KEYS) | st.text(max_size=5), inner, max_size=4),
    max_leaves=10,
)


@st.composite
def mutated(draw, document):
    """`document` with one to three changes: a value replaced, a key or item deleted, a key added."""
    document = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        document = _mutate_once(draw, document)
    return document


def _mutate_once(draw, root):
    parent, key, node = None, None, root
    while isinstance(node, (dict, list)) and node and draw(st.integers(0, 3)) > 0:  # descend, mostly
        parent, key = node, draw(st.sampled_from(sorted(node) if isinstance(node, dict) else range(len(node))))
        node = parent[key]
    action = draw(st.sampled_from(["replace", "delete", "add"]))
    if parent is None:
        return draw(json_values) if action == "replace" else root
    if action == "delete":
        del parent[key]
    elif action == "add" and isinstance(node, dict):
        node[draw(st.sampled_from(KNOWN_KEYS))] = draw(json_values)
    else:
        parent[key] = draw(json_values)
    return root


@st.composite
def damaged_text(draw, document):
    """The document's JSON text, truncated or with one number replaced by NUMBER_SUBSTITUTES text."""
    text = json.dumps(document, indent=1)
    if draw(st.booleans()):
        return text[: draw(st.integers(0, len(text) - 1))]
    numbers = [match.span() for match in re.finditer(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text)]
    start, end = draw(st.sampled_from(numbers))
    return text[:start] + draw(st.sampled_from(NUMBER_SUBSTITUTES)) + text[end:]


def contents(document):
    """File contents made from a valid document: mutated JSON, damaged text, or arbitrary bytes."""
    return (
        mutated(document).map(lambda doc: json.dumps(doc).encode())
        | damaged_text(document).map(str.encode)
        | st.binary(max_size=64)
    )


# --- valid documents, built independently of the readers ------------------------------------------


def scales_document() -> dict:
    """A scales file as documented (calibration's format; sha256 of the canonical JSON without it)."""
    content = {key: value for key, value in make_scales().items() if key != "sha256"}
    content["sha256"] = canonical_sha256(content)
    return content


def canonical_sha256(content: dict) -> str:
    canonical = json.dumps({k: v for k, v in content.items() if k != "sha256"}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


SCALES = scales_document()
DUMPS = {"int8_baseline.json": make_dump("int8", None, SCALES), "floatsim_samescale.json": make_dump("same", None, SCALES),
         "floatsim_betterscale_2025.json": make_dump("better", 2025, SCALES)}
SAME_DUMP = DUMPS["floatsim_samescale.json"]
RESULTS = make_results("same", None, {"lambada_openai": {"acc": (0.6, 0.01)}}, SCALES, SAME_DUMP,
                       "/gone/floatsim_samescale.json", 1.8e9)
RESULTS_NAME = "results_2027-01-15T10-00-00.000000.json"


# --- the contract ------------------------------------------------------------------------------------


@contextlib.contextmanager
def time_limit(seconds: float = SECONDS_PER_EXAMPLE):
    """Raise in the test, not hang the suite, when a reader takes far longer than it should."""

    def hung(signum, frame):
        raise TimeoutError(f"no answer within {seconds} s: a reader hangs on this input")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def read_or_one_line_error(read, path: Path):
    """What `read(path)` returns, or None when it raised InputError with one line naming the file."""
    with time_limit():
        try:
            return read(path)
        except InputError as error:
            message = str(error)
            assert message.strip() and "\n" not in message and len(message) < 2000, message
            assert str(path) in message or path.name in message, message
            return None


def run_command(*argv) -> tuple[int, str]:
    """cli.main in-process: (exit code, stderr); any exception that escapes fails the test."""
    out, err = io.StringIO(), io.StringIO()
    with time_limit(), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main([str(arg) for arg in argv])
    return code, err.getvalue()


def assert_exit_code_and_one_line(code: int, err: str, command: str) -> None:
    assert code in (0, 1, 2)
    if code == 2:
        assert err.count("\n") == 1 and err.startswith(f"lm-eval-floatsim {command}: error: "), err
    assert "Traceback" not in err


def written(folder: Path, name: str, content: bytes) -> Path:
    path = folder / name
    path.write_bytes(content)
    return path


# --- the readers ---------------------------------------------------------------------------------------


@FUZZ
@given(content=contents(SAME_DUMP))
@example(content=b"[" * 100000)
@example(content=json.dumps({**SAME_DUMP, "config": {**SAME_DUMP["config"], "n_layer": 10**18}}).encode())
def test_read_dump(content):
    with tempfile.TemporaryDirectory() as folder:
        dump = read_or_one_line_error(read_dump, written(Path(folder), "floatsim_samescale.json", content))
    assert dump is None or isinstance(dump, dict) and isinstance(dump["layers"], list)


@FUZZ
@given(content=contents(SCALES), rehash=st.booleans())
@example(content=json.dumps({**SCALES, "settings": {"percentile": 1e308 * 10}}).encode(), rehash=False)
@example(content=b'{"format": "lm_eval_floatsim.scales/1", "settings": {"a": 1e999}}', rehash=False)
@example(content=json.dumps({**SCALES, "layers": [{**SCALES["layers"][0], "input_scale": 10**400}]}).encode(), rehash=True)
def test_scales_load(content, rehash):
    """rehash: a consistent sha256 after the damage, so that the content checks must catch it."""
    if rehash:
        with contextlib.suppress(ValueError, RecursionError):  # only JSON objects with JSON numbers get a hash
            document = json.loads(content)
            if isinstance(document, dict):
                content = json.dumps({**document, "sha256": canonical_sha256(document)}, allow_nan=False).encode()
    with tempfile.TemporaryDirectory() as folder:
        scales = read_or_one_line_error(Scales.load, written(Path(folder), "scales.json", content))
    assert scales is None or all(min(layer.input, layer.output, layer.weight, layer.bias) > 0 for layer in scales.layers)


@FUZZ
@given(content=contents(RESULTS))
@example(content=json.dumps({**RESULTS, "config": {"floatsim": {**RESULTS["config"]["floatsim"], "dump_file": 3}}}).encode())
@example(content=b"1" * 5000)
def test_results_reader(content):
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "floatsim_samescale.json").write_text(json.dumps(SAME_DUMP))
        run = read_or_one_line_error(load_run, written(Path(folder), RESULTS_NAME, content))
    assert run is None or set(run) >= {"results", "dump", "dump_path", "scales", "source"}


# --- the commands ----------------------------------------------------------------------------------------


HUGE_N_LAYER = {"config": {"float_sim_asic": True, "float_sim_better_scale": False, "n_layer": 10**12}, "layers": []}


@FUZZ
@given(case=st.sampled_from(sorted(DUMPS)).flatmap(lambda name: st.tuples(st.just(name), contents(DUMPS[name]))))
@example(case=("floatsim_samescale.json", json.dumps(HUGE_N_LAYER).encode()))
@example(case=("int8_baseline.json", json.dumps({**DUMPS["int8_baseline.json"], "layers": [
    {**layer, "codes": None, "after_quant": [1e308] * 10, "effective_scale": 5e-324}
    for layer in DUMPS["int8_baseline.json"]["layers"]]}).encode()))
def test_check_command(case):
    """One of three good dumps damaged: `check` reads the folder, runs its checks, or says why not."""
    name, damaged = case
    with tempfile.TemporaryDirectory() as folder:
        for other, dump in DUMPS.items():
            (Path(folder) / other).write_text(json.dumps(dump))
        written(Path(folder), name, damaged)
        code, err = run_command("check", folder)
    assert_exit_code_and_one_line(code, err, "check")


RUN_FOLDER = "floatsim_2027-01-15T10-00-00.000000"
DAMAGED_FILES = {RESULTS_NAME: RESULTS, f"{RUN_FOLDER}/floatsim_samescale.json": SAME_DUMP}


@FUZZ
@given(case=st.sampled_from(sorted(DAMAGED_FILES)).flatmap(lambda name: st.tuples(st.just(name), contents(DAMAGED_FILES[name]))))
@example(case=(RESULTS_NAME, json.dumps({**RESULTS, "results": []}).encode()))
@example(case=(RESULTS_NAME, json.dumps({**RESULTS, "group_subtasks": {"lambada": True}}).encode()))
@example(case=(f"{RUN_FOLDER}/floatsim_samescale.json", json.dumps({**SAME_DUMP, "layers": [
    {**layer, "stats": {**layer["stats"], "max_abs_err": 10**400}} for layer in SAME_DUMP["layers"]]}).encode()))
def test_compare_command(case):
    """A run laid out as lm-eval and the model leave it, with its results file or its dump damaged."""
    target, damaged = case
    with tempfile.TemporaryDirectory() as folder:
        run_folder = Path(folder) / "tiny__mamba-demo"
        (run_folder / RUN_FOLDER).mkdir(parents=True)
        for name, document in DAMAGED_FILES.items():
            (run_folder / name).write_text(json.dumps(document))
        written(run_folder, target, damaged)
        code, err = run_command("compare", folder)
    assert_exit_code_and_one_line(code, err, "compare")


def test_the_valid_documents_are_read():
    """The fuzzing starts from documents the readers accept: the rejections above are the damage's."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        assert read_dump(written(folder, "floatsim_samescale.json", json.dumps(SAME_DUMP).encode())) == SAME_DUMP
        assert Scales.load(written(folder, "scales.json", json.dumps(SCALES).encode())).model_id == SCALES["model"]
        assert load_run(written(folder, RESULTS_NAME, json.dumps(RESULTS).encode()))["dump"] == SAME_DUMP
        for name, dump in DUMPS.items():
            written(folder, name, json.dumps(dump).encode())
        assert run_command("check", folder)[0] == 0
