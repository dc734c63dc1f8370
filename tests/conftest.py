"""Session fixtures shared by test modules: the Hugging Face Hub stand-in (tests/hub_standin.py).

`hub` serves, on 127.0.0.1, small seeded copies of every repository that the default
`lm_eval --model mamba_floatsim --tasks lambada` run downloads, so that hub ids can be tested
without a network; one server per session, started on first use and stopped at the end.
`hub_repos` gives those repositories and the transformers model whose weights they hold.
A session that uses neither starts nothing (pytest creates fixtures on demand).
"""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hub_repos(tmp_path_factory):
    import hub_standin

    return hub_standin.build_test_repos(tmp_path_factory.mktemp("hub-repos"))


@pytest.fixture(scope="session")
def hub(hub_repos):
    import hub_standin

    with hub_standin.HubStandIn(hub_repos.repos) as standin:
        yield standin
