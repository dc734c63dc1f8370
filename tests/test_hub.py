"""Hub ids end to end, against the hub stand-in (`hub` in conftest.py, tests/hub_standin.py): the
README's headline `lm_eval` command, both checkpoint layouts by hub id, revisions, and hub errors
reported as one line.

Everything that talks to the hub runs in a subprocess: huggingface_hub and datasets read
HF_ENDPOINT and the offline switches at import time, and `make test` switches offline mode on for
every other test. Each subprocess gets its own caches under its tmp_path (`hub_standin.client_env`)
and may reach nothing but 127.0.0.1, which every test checks (`assert_only_loopback`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hub_standin
from fixtures.floatsim_runs import console_script, subprocess_env
from hub_standin import DATASET, LAMBADA_OPENAI, LAMBADA_STANDARD, MAMBA, MAMBA_HF, MODEL, NEOX, PILE, HubStandIn

HEADLINE_ARGS = "mode=better,divisor=2025,calib_samples=4,calib_seqlen=64"
# As test_loading.py: fp32 in another order of operations differs by ~100 ulps at most over the
# layers, while a wrong, missing or swapped weight moves the logits by 1e-2 or more.
PARITY = 1e-5
TIMEOUT = 600


# --- running things against the stand-in --------------------------------------------------------


def hub_env(endpoint: str, work: Path) -> dict:
    return hub_standin.client_env(subprocess_env(work), endpoint, work / "home")


def run_lm_eval(model_args: str, env: dict, cwd: Path, *options: str) -> subprocess.CompletedProcess:
    command = [console_script("lm_eval"), "--model", "mamba_floatsim", "--model_args", model_args,
               "--tasks", "lambada", "--limit", "8", "--device", "cpu", *options]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def run_python(script: str, env: dict, cwd: Path, *args: str) -> None:
    command = [sys.executable, "-c", script, *args]
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stderr[-3000:]


def assert_only_loopback(hub: HubStandIn, since: int, work: Path) -> None:
    """Nothing left the machine: the only other host asked for is the dataset viewer (answered by
    the stand-in through the proxy settings), and no connection had to be refused."""
    assert hub.foreign_hosts(since) <= {hub.viewer_host}
    blocked = hub_standin.blocked_log(work / "home")
    assert not blocked.exists(), blocked.read_text()


def one_line_error(hub: HubStandIn, runs: dict, name: str) -> str:
    """The last stderr line of one of `error_runs`, after checking that it failed without a
    traceback and reached nothing but loopback."""
    process, work = runs[name]
    _, err = process.communicate(timeout=TIMEOUT)
    assert process.returncode != 0 and "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("mamba_floatsim: error: "), err[-3000:]
    assert_only_loopback(hub, 0, work)
    return last


# --- 1. the headline command -------------------------------------------------------------------------


def results_of(output_path: Path, mode: str) -> tuple[Path, dict]:
    """The results file lm-eval wrote for the run in `mode`, where the README says it lands: in a
    folder lm-eval names after `pretrained=`, here absent from --model_args (a random id)."""
    found = []
    for path in sorted(output_path.glob("*/results_*.json")):
        results = json.loads(path.read_text(encoding="utf-8"))
        if results["config"]["floatsim"]["mode"] == mode:
            found.append((path, results))
    assert len(found) == 1, sorted(p.name for p in output_path.rglob("*"))
    return found[0]


def run_folder(results_file: Path) -> Path:
    """floatsim_<date>/ beside results_<date>.json: the run's dump, scales and report."""
    return results_file.with_name("floatsim_" + results_file.stem.removeprefix("results_"))


def test_headline_command_downloads_everything_by_hub_id_and_reuses_the_cached_scales(hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path)
    output_path = tmp_path / "results"
    scales_cache = Path(env["XDG_CACHE_HOME"]) / "lm_eval_floatsim" / "scales"

    start = hub.mark()
    done = run_lm_eval(HEADLINE_ARGS, env, tmp_path, "--output_path", str(output_path))
    assert done.returncode == 0, done.stderr[-3000:]
    downloaded = hub.downloads(start)
    for repo_type, repo_id, filename in [
        (MODEL, MAMBA, "config.json"),
        (MODEL, MAMBA, "pytorch_model.bin"),
        (MODEL, NEOX, "tokenizer.json"),  # mamba-130m has no tokenizer of its own
        (DATASET, PILE, "val.jsonl.zst"),  # the default calibration data, streamed
    ]:
        assert (repo_type, repo_id, filename) in downloaded, sorted(downloaded)
    assert {repo for repo_type, repo, _ in downloaded if repo_type == DATASET} == {PILE, LAMBADA_OPENAI, LAMBADA_STANDARD}
    assert_only_loopback(hub, start, tmp_path)

    results_file, results = results_of(output_path, "better")
    floatsim = results["config"]["floatsim"]
    assert floatsim["divisor"] == 2025 and floatsim["model"] == MAMBA
    for task in ("lambada_openai", "lambada_standard"):
        assert 0 <= results["results"][task]["acc,none"] <= 1 and results["results"][task]["perplexity,none"] > 1
    folder = run_folder(results_file)
    assert {"floatsim_betterscale_2025.json", "report.md", "report.json"} <= {path.name for path in folder.iterdir()}
    assert (tmp_path / "yzCheckFloatSim" / "floatsim_betterscale_2025.json").is_file()

    scales_file = Path(floatsim["scales_file"])
    assert scales_file.parent == scales_cache and [path.name for path in scales_cache.iterdir()] == [scales_file.name]
    scales = json.loads((folder / scales_file.name).read_text(encoding="utf-8"))
    assert scales["sha256"] == floatsim["scales_sha256"] and scales["model"] == MAMBA
    assert scales["settings"]["calib_data"] == PILE and scales["settings"]["calib_samples"] == 4

    # Another mode with the same calibration settings: the cached scales, no calibration data.
    again = hub.mark()
    int8_args = HEADLINE_ARGS.replace("mode=better,divisor=2025", "mode=int8")
    done = run_lm_eval(int8_args, env, tmp_path, "--output_path", str(output_path))
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [request for request in hub.requests(again) if request.repo == (DATASET, PILE)]
    assert results_of(output_path, "int8")[1]["config"]["floatsim"]["scales_sha256"] == floatsim["scales_sha256"]
    assert_only_loopback(hub, again, tmp_path)

    check = subprocess.run([console_script("lm-eval-floatsim"), "check", "yzCheckFloatSim"], env=env, cwd=tmp_path,
                           capture_output=True, text=True, timeout=TIMEOUT)
    assert check.returncode == 0, check.stdout + check.stderr
    assert sorted(path.name for path in (tmp_path / "yzCheckFloatSim").glob("*.json")) == [
        "floatsim_betterscale_2025.json", "int8_baseline.json"]


# --- 2. both layouts by hub id ---------------------------------------------------------------------

LOGITS_BY_HUB_ID = """
import sys, torch
from lm_eval_floatsim.api import load_model
ids_file, out_file, *repos = sys.argv[1:]
ids, logits, tokenizers = torch.load(ids_file), {}, {}
for repo in repos:
    model, tokenizer, _ = load_model(repo, mode="fp", progress=False)
    with torch.no_grad():
        logits[repo] = model(ids)
    tokenizers[repo] = tokenizer.name_or_path
torch.save({"logits": logits, "tokenizers": tokenizers}, out_file)
"""


def token_ids(tmp_path: Path) -> tuple[torch.Tensor, Path]:
    """Random ids of the byte tokenizer (257 tokens), saved for a subprocess."""
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(1))
    torch.save(ids, tmp_path / "ids.pt")
    return ids, tmp_path / "ids.pt"


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).abs().max() / reference.double().abs().max()).item()


def test_both_layouts_by_hub_id_give_the_logits_of_transformers(hub, hub_repos, tmp_path):
    env = hub_env(hub.endpoint, tmp_path)
    ids, ids_file = token_ids(tmp_path)
    start = hub.mark()
    run_python(LOGITS_BY_HUB_ID, env, tmp_path, str(ids_file), str(tmp_path / "out.pt"), MAMBA_HF, MAMBA)
    out = torch.load(tmp_path / "out.pt")
    assert_only_loopback(hub, start, tmp_path)
    assert {(MODEL, MAMBA_HF, "model.safetensors"), (MODEL, MAMBA, "pytorch_model.bin")} <= hub.downloads(start)
    # mamba-130m has no tokenizer: gpt-neox-20b's, by hub id; mamba-130m-hf's own, from its snapshot.
    own = f"models--state-spaces--mamba-130m-hf/snapshots/{hub.repo(MODEL, MAMBA_HF).commit}"
    assert out["tokenizers"][MAMBA] == NEOX and out["tokenizers"][MAMBA_HF].endswith(own)

    with torch.no_grad():
        reference = hub_repos.reference_model(ids, use_cache=False).logits
    # The two layouts hold the same tensors and run the same code: identical, bit for bit.
    assert torch.equal(out["logits"][MAMBA], out["logits"][MAMBA_HF])
    assert relative_error(out["logits"][MAMBA_HF], reference) < PARITY


# --- 3. revisions -----------------------------------------------------------------------------------

LOGITS_AT_REVISIONS = """
import sys, torch
from huggingface_hub import constants
from lm_eval_floatsim.api import load_model
ids_file, out_file, repo, *revisions = sys.argv[1:]
ids, logits, cache = torch.load(ids_file), {}, constants.HF_HUB_CACHE
for n, revision in enumerate(revisions):
    constants.HF_HUB_CACHE = f"{cache}-{n}"  # a fresh cache per revision, so that each one downloads
    model, _, _ = load_model(repo, mode="fp", revision=revision, progress=False)
    with torch.no_grad():
        logits[revision] = model(ids)
torch.save(logits, out_file)
"""


def test_a_commit_sha_and_a_branch_both_download(hub, tmp_path):
    env = hub_env(hub.endpoint, tmp_path)
    ids, ids_file = token_ids(tmp_path)
    commit = hub.repo(MODEL, MAMBA_HF).commit
    start = hub.mark()
    run_python(LOGITS_AT_REVISIONS, env, tmp_path, str(ids_file), str(tmp_path / "out.pt"), MAMBA_HF, commit, "main")
    logits = torch.load(tmp_path / "out.pt")
    assert torch.equal(logits[commit], logits["main"])
    requests = hub.requests(start)
    # A commit sha needs no resolving; "main" is resolved to it; both then fetch the commit's files.
    assert {request.revision for request in requests if request.route == "info"} == {"main"}
    weights = [request for request in requests if request.filename == "model.safetensors"]
    assert [request.revision for request in weights if request.route == "resolve"] == [commit, commit]
    assert [request.status for request in weights if request.route == "cdn"] == [200, 200]
    assert_only_loopback(hub, start, tmp_path)


# --- 4. hub errors, and 3. an unknown revision, are one line -----------------------------------


@pytest.fixture(scope="module")
def error_runs(hub, tmp_path_factory):
    """`lm_eval` runs that must fail with one line, started together (they spend most of their time
    starting the interpreter): an unknown model repo, an unknown revision, an unknown calibration
    dataset, and the hub down (the endpoint of a stand-in that has been stopped: a closed port)."""
    with HubStandIn([]) as stopped:
        down = stopped.endpoint
    cases = {
        "missing_repo": (hub.endpoint, "pretrained=state-spaces/no-such-model"),
        "missing_revision": (hub.endpoint, f"pretrained={MAMBA_HF},revision=no-such-branch"),
        "missing_calibration_data": (hub.endpoint, "mode=better,calib_data=monology/no-such-dataset,calib_samples=4"),
        "hub_down": (down, f"pretrained={MAMBA}"),
    }
    runs = {}
    for name, (endpoint, model_args) in cases.items():
        work = tmp_path_factory.mktemp(name)
        command = [console_script("lm_eval"), "--model", "mamba_floatsim", "--model_args", model_args,
                   "--tasks", "lambada", "--limit", "8", "--device", "cpu"]
        process = subprocess.Popen(command, env=hub_env(endpoint, work), cwd=work,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        runs[name] = (process, work)
    yield runs
    for process, _ in runs.values():
        if process.poll() is None:  # a test failed before reading it
            process.kill()
            process.communicate()


def test_a_revision_that_does_not_exist_is_one_line(hub, error_runs):
    last = one_line_error(hub, error_runs, "missing_revision")
    assert MAMBA_HF in last and "no-such-branch" in last and "no such branch, tag or commit" in last


def test_a_model_repo_that_does_not_exist_is_one_line(hub, error_runs):
    last = one_line_error(hub, error_runs, "missing_repo")
    assert "state-spaces/no-such-model" in last and "RepositoryNotFoundError: no such repository" in last


def test_the_hub_down_is_one_line(hub, error_runs):
    last = one_line_error(hub, error_runs, "hub_down")
    assert MAMBA in last and "did not provide it" in last and "the hub could not be reached" in last


def test_calibration_data_that_does_not_exist_is_one_line(hub, error_runs):
    last = one_line_error(hub, error_runs, "missing_calibration_data")
    assert "calib_data='monology/no-such-dataset'" in last and "doesn't exist on the Hub" in last
