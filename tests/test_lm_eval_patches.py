"""The patches of lm-eval that only make it faster: same results, each installed once per process."""

from __future__ import annotations

import jinja2
import pytest
from lm_eval import utils
from lm_eval.api import metrics

from lm_eval_floatsim import lm_eval_patches

TEMPLATES = [
    "{{text.split(' ')[:-1]|join(' ')}}",
    "{{' ' + text.split(' ')[-1]}}",
    "Question: {{question}}\nAnswer:{% if choices %} {{choices|join(', ')}}{% endif %}",
    "{{question|regex_replace('[0-9]+', '#')}}",
]
DOCS = [
    {"text": "she went to the harbour", "question": "why 12 ships?", "choices": ["a", "b"]},
    {"text": "one", "question": "", "choices": []},
    {"text": "  spaced   words ", "question": "7 8 9", "choices": ["x"]},
]


@pytest.fixture
def lm_evals_own(monkeypatch):
    """lm-eval's own apply_template and bootstrap_stderr in place for the test (an earlier test's
    model may have patched them for the process), and whatever was there put back after it."""
    template, bootstrap = utils.apply_template, metrics.bootstrap_stderr
    template = getattr(template, "floatsim_original", template)
    bootstrap = bootstrap.keywords["original"] if getattr(bootstrap, "floatsim_fast", False) else bootstrap
    monkeypatch.setattr(utils, "apply_template", template)
    monkeypatch.setattr(metrics, "bootstrap_stderr", bootstrap)
    return template, bootstrap


def test_templates_render_what_lm_eval_renders_and_compile_once(lm_evals_own, monkeypatch):
    original, _ = lm_evals_own
    expected = [[original(template, doc) for doc in DOCS] for template in TEMPLATES]
    compiled = []
    from_string = utils.env.from_string
    monkeypatch.setattr(utils.env, "from_string", lambda source: compiled.append(source) or from_string(source))

    lm_eval_patches.install_compiled_templates()
    lm_eval_patches.install_compiled_templates()  # a second model in the process: still one patch
    assert [[utils.apply_template(template, doc) for doc in DOCS] for template in TEMPLATES] == expected
    assert [[utils.apply_template(template, doc) for doc in DOCS] for template in TEMPLATES] == expected
    assert compiled == TEMPLATES  # once each, in order of first use


def test_a_missing_field_fails_as_in_lm_eval(lm_evals_own):
    original, _ = lm_evals_own
    with pytest.raises(jinja2.UndefinedError) as expected:
        original("{{missing}}", DOCS[0])
    lm_eval_patches.install_compiled_templates()
    with pytest.raises(jinja2.UndefinedError) as got:
        utils.apply_template("{{missing}}", DOCS[0])
    assert str(got.value) == str(expected.value)


def test_fast_bootstrap_wraps_lm_evals_function_once(lm_evals_own):
    _, original = lm_evals_own
    lm_eval_patches.install_fast_bootstrap()
    installed = metrics.bootstrap_stderr
    lm_eval_patches.install_fast_bootstrap()
    assert metrics.bootstrap_stderr is installed and installed.keywords["original"] is original
    # what bootstrap.py cannot reproduce (a median) is lm-eval's own, through the patch
    xs = [0.5, 0.25, 0.125, 1.0]
    assert metrics.bootstrap_stderr(metrics.median, xs, 1000) == original(metrics.median, xs, 1000)


def test_another_lm_eval_keeps_its_own_bootstrap(lm_evals_own, monkeypatch, caplog):
    """bootstrap.py reproduces lm-eval 0.4.13's algorithm: on a release it was not checked against,
    lm-eval's own function computes the standard errors, and the run says so once."""
    _, original = lm_evals_own
    monkeypatch.setattr("importlib.metadata.version", lambda name: "0.4.99" if name == "lm_eval" else "0")
    lm_eval_patches.warn_once.cache_clear()
    with caplog.at_level("WARNING", logger=lm_eval_patches.logger.name):
        lm_eval_patches.install_fast_bootstrap()
    assert metrics.bootstrap_stderr is original
    assert "lm-eval 0.4.99 may bootstrap otherwise than 0.4.13" in caplog.text


def test_an_lm_eval_without_its_template_environment_keeps_its_templates(lm_evals_own, monkeypatch, caplog):
    original, _ = lm_evals_own
    monkeypatch.delattr(utils, "env")
    lm_eval_patches.warn_once.cache_clear()
    with caplog.at_level("WARNING", logger=lm_eval_patches.logger.name):
        lm_eval_patches.install_compiled_templates()
    assert utils.apply_template is original
    assert "compiled per document" in caplog.text
