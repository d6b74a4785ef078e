from __future__ import annotations

from pathlib import Path

import pytest

from dispo import profiles
from dispo.errors import InvalidInput, NotFound
from dispo.profiles import DisplayMode


def test_builtin_profiles_are_valid() -> None:
    for name in ("firefox", "chromium"):
        p = profiles.find(name, Path("/nonexistent"))
        assert p.image == name and p.memory_mib >= 1024 and p.display is DisplayMode.WEB
        assert p.network.internet and p.shm_mib >= 256
    ff = profiles.find("firefox", Path("/nonexistent"))
    assert ff.argv("https://example.test/a b") == (*ff.command, "https://example.test/a b")
    assert ff.argv() == (*ff.command, "about:blank")


def test_user_profile_overrides_builtin(tmp_path: Path) -> None:
    (tmp_path / "firefox.toml").write_text('image = "my-ff"\ncommand = ["firefox-esr"]\nmemory_mib = 4096\n'
                                          '[network]\ninternet = false\nallow = ["192.168.1.0/24"]\n')
    p = profiles.find("firefox", tmp_path)
    assert (p.image, p.memory_mib, p.network.internet) == ("my-ff", 4096, False)
    assert str(p.network.allow[0]) == "192.168.1.0/24"
    assert p.source == str(tmp_path / "firefox.toml")
    assert "firefox" in profiles.list_names(tmp_path)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('image = "x"\nmemroy_mib = 1\n', "unknown key 'memroy_mib'"),
        ("memory_mib = 1024\n", "key 'image' must name an image"),
        ('image = "../etc"\n', "invalid image name"),
        ('image = "x"\nmemory_mib = 12\n', "key 'memory_mib' must be an integer from 64"),
        ('image = "x"\nvcpus = "2"\n', "key 'vcpus' must be an integer"),
        ('image = "x"\nvcpus = true\n', "key 'vcpus' must be an integer from 1 to 64, got true"),
        ('image = "x"\ncommand = "firefox --new"\n', "key 'command' must be a non-empty list"),
        ('image = "x"\ndisplay = "vnc"\n', "key 'display' is 'vnc', expected one of: web, x11, none"),
        ('image = "x"\nbackend = "kvmtool"\n', "key 'backend' is 'kvmtool'"),
        ('image = "x"\n[network]\nallow = ["10.0.0.0/33"]\n', "invalid network '10.0.0.0/33'"),
        ('image = "x"\n[network]\nallow = ["10.0.0.1/8"]\n', "invalid network"),
        ('image = "x"\n[network]\nproxy = "y"\n', "unknown key 'proxy'"),
        ('image = "x"\nready_timeout_s = -1\n', "must be a number of seconds from 1"),
        ("image = \n", "not valid TOML"),
    ],
)
def test_broken_profiles_are_one_line_errors(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "broken.toml"
    f.write_text(text)
    with pytest.raises(InvalidInput) as e:
        profiles.find("broken", tmp_path)
    assert needle in str(e.value)
    assert str(f) in str(e.value)
    assert "\n" not in e.value.one_line()


def test_unknown_profile(tmp_path: Path) -> None:
    with pytest.raises(NotFound) as e:
        profiles.find("opera", tmp_path)
    assert "chromium, firefox" in e.value.one_line()
    with pytest.raises(InvalidInput):
        profiles.find("../firefox", tmp_path)
