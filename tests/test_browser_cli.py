"""`dispo run PROFILE [URL]` argument handling and the browser recipes, without booting anything."""

from __future__ import annotations

import argparse

import pytest

from dispo import guest
from dispo.cli import run
from dispo.errors import InvalidInput
from dispo.imagebuild import recipes
from dispo.runtime.machinery import SshChannel
from dispo.ssh import SessionKeys


def _parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers()
    run.register(sub)
    return p.parse_args(["run", *argv])


def test_options_before_and_after_the_profile() -> None:
    given, name, url = run._profile_args(_parse("--memory", "3072", "chromium", "--display", "x11",
                                                "http://example.test/", "--vcpus", "3"))
    assert (name, url) == ("chromium", "http://example.test/")
    assert given == {"memory": 3072, "display": "x11", "vcpus": 3}  # only what was given: the profile fills in
    given, _, url = run._profile_args(_parse("firefox"))
    assert given == {} and url is None


@pytest.mark.parametrize(("argv", "text"), [
    (("chromium", "http://a/", "http://b/"), "one URL at most"),
    (("chromium", "--bogus"), "unknown option"),
    (("chromium", "--display", "vnc"), "invalid choice"),
    (("chromium", "--memory", "lots"), "invalid int value"),
])
def test_bad_profile_arguments(argv: tuple[str, ...], text: str) -> None:
    with pytest.raises(InvalidInput, match=text):
        run._profile_args(_parse(*argv))


def test_ssh_options_go_before_the_destination(tmp_path) -> None:
    ch = SshChannel(SessionKeys(tmp_path, "dispo-12345678"), "172.20.0.2")
    x11 = ch.display(["chromium", "about:blank"], vnc_socket=None, geometry="1280x800")
    web = ch.display(["chromium"], vnc_socket=tmp_path / "vnc.sock", geometry="1280x800")
    for argv, option in ((x11, "-X"), (web, "-L")):
        dest = argv.index("172.20.0.2")
        assert argv.index(option) < dest and argv[-1].startswith(guest.APP_PATH), argv
    assert f"{tmp_path / 'vnc.sock'}:127.0.0.1:5900" in web


def test_browser_recipes() -> None:
    for name, package in (("chromium", "chromium"), ("firefox", "firefox-esr")):
        r = recipes.get(name)
        assert package in r.packages and "tigervnc-standalone-server" in r.packages and "xauth" in r.packages
        assert r.vmlinux and r.vmms == ("qemu", "firecracker")
        assert (guest.APP_PATH, "app.sh") in r.files and "X11Forwarding yes" in r.sshd_extra
        assert (guest.OPEN_PATH, "open.pl") in r.files and (guest.AGENT_PATH, "agent.pl") in r.files
        assert (guest.SETUP_PATH, "browser-setup.sh") in r.files and r.configs  # the quiet browser (docs/quiet.md)
    # The launcher is part of a browser image's cache key; the minimal image carries only the identity agent.
    assert recipes.CHROMIUM.key("sources") != recipes.FIREFOX.key("sources")
    assert recipes.MINIMAL.files == ((guest.AGENT_PATH, "agent.pl"),) and not recipes.MINIMAL.vmlinux
    # --from installs only the app and its display stack: the source image brings kernel and sshd.
    assert recipes.CHROMIUM.app_packages() == (
        "tigervnc-standalone-server", "matchbox-window-manager", "xauth", "fonts-dejavu-core", "fonts-liberation2",
        "tzdata", "xclip", "pulseaudio", "xdotool", "chromium")
