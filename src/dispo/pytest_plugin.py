"""The pytest plugin (entry point `pytest11: dispo`): the fixture `dispo_browser`, a fresh disposable session
for each test that asks for it, ended after the test (docs/sdk.md).

    def test_title(dispo_browser):
        assert dispo_browser.state == "running"

    @pytest.mark.dispo(profile="firefox", url="https://example.org/")   # per test
    def test_other(dispo_browser): ...

    pytest --dispo-profile chromium --dispo-url http://127.0.0.1:8686   # token from $DISPO_TOKEN
    [pytest] dispo_profile = chromium / dispo_url = ...                  # or in the ini file

Installed with dispo, so it loads in every pytest run: it adds options and fixtures only, imports nothing
heavy, and connects to dispod only when a test uses one of its fixtures (`-p no:dispo` turns it off).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from dispo.sdk import Client, Session

DEFAULT_PROFILE = "chromium"
# Not an option: a token on a command line is visible to every user in ps.
TOKEN_ENV = "DISPO_TOKEN"  # noqa: S105 (the name of a variable, not a secret)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("dispo", "disposable sessions (dispo_browser fixture)")
    group.addoption("--dispo-profile", default=None, metavar="NAME",
                    help=f"the profile of dispo_browser's sessions (default: ini dispo_profile, else "
                         f"{DEFAULT_PROFILE})")
    group.addoption("--dispo-url", default=None, metavar="URL",
                    help=f"dispod's address: http://HOST:PORT (token in ${TOKEN_ENV}) or unix:PATH (default: ini "
                         "dispo_url, else this host's dispod socket)")
    parser.addini("dispo_profile", f"the profile of dispo_browser's sessions (default {DEFAULT_PROFILE})",
                  default=DEFAULT_PROFILE)
    parser.addini("dispo_url", "dispod's address for dispo_browser (default: this host's dispod socket)", default="")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "dispo(profile=None, **options): the session dispo_browser starts for this "
                                       "test (any key of POST /v1/sessions, e.g. url=...)")


@pytest.fixture(scope="session")
def dispo_client(pytestconfig: pytest.Config) -> Iterator[Client]:
    """One connection to dispod for the whole run; it ends whatever sessions it started and left running."""
    from dispo import sdk

    url = pytestconfig.getoption("dispo_url") or str(pytestconfig.getini("dispo_url")) or None
    with sdk.connect(url, token=os.environ.get(TOKEN_ENV) or None) as client:
        yield client


@pytest.fixture
def dispo_browser(dispo_client: Client, request: pytest.FixtureRequest) -> Iterator[Session]:
    """A fresh disposable session, ready (its display up), ended after the test whatever the test did."""
    marker = request.node.get_closest_marker("dispo")
    options = dict(marker.kwargs) if marker is not None else {}
    profile = (options.pop("profile", None) or request.config.getoption("dispo_profile")
               or str(request.config.getini("dispo_profile")) or DEFAULT_PROFILE)
    with dispo_client.session(profile, **options) as session:
        session.wait_ready()
        yield session
