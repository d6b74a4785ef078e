from __future__ import annotations

from pathlib import Path

import pytest

from dispo import config
from dispo.config import StorageBackend
from dispo.errors import ConfigError, InvalidInput
from dispo.names import check_name, check_session_id, new_session_id, parse_size


def test_defaults_without_a_file(tmp_path: Path) -> None:
    cfg = config.load(None, env={"DISPO_CONFIG": ""})
    assert cfg.workspace == Path("/var/lib/dispo")
    assert cfg.state_dir == Path("/run/dispo")
    assert cfg.storage.backend is StorageBackend.AUTO


def test_file_and_env_overrides(tmp_path: Path) -> None:
    f = tmp_path / "d.toml"
    f.write_text('workspace = "/srv/w"\nstate_dir = "/srv/s"\n[storage]\nbackend = "copy"\n')
    cfg = config.load(f, env={})
    assert (cfg.workspace, cfg.state_dir, cfg.storage.backend) == (Path("/srv/w"), Path("/srv/s"), StorageBackend.COPY)
    cfg = config.load(f, env={"DISPO_WORKSPACE": "/x/w", "DISPO_STATE_DIR": "/x/s"})
    assert (cfg.workspace, cfg.state_dir) == (Path("/x/w"), Path("/x/s"))
    cfg = config.load(None, env={"DISPO_CONFIG": str(f)})
    assert cfg.workspace == Path("/srv/w") and cfg.source == str(f)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('workspce = "/x"\n', "unknown key 'workspce'"),
        ('[storage]\nbackend = "zfs"\n', "storage.backend' is \"zfs\", expected one of: auto, btrfs, reflink, copy"),
        ('[storage]\nspeed = 1\n', "unknown key 'storage.speed'"),
        ('workspace = "relative/path"\n', "key 'workspace' must be an absolute path"),
        ("workspace = 3\n", "key 'workspace' must be an absolute path"),
        ('storage = "btrfs"\n', "[storage] must be a table"),
        ("workspace = \n", "not valid TOML"),
    ],
)
def test_bad_config_names_key_and_file(tmp_path: Path, text: str, needle: str) -> None:
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(f, env={})
    assert needle in str(e.value)
    assert str(f) in str(e.value)


def test_explicit_missing_config_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml", env={})
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(None, env={"DISPO_CONFIG": str(tmp_path / "nope.toml")})


def test_env_override_must_be_absolute() -> None:
    with pytest.raises(ConfigError, match=r"\$DISPO_WORKSPACE"):
        config.load(None, env={"DISPO_CONFIG": "", "DISPO_WORKSPACE": "rel"})


@pytest.mark.parametrize("bad", ["", "a/b", "../x", "..", "a b", "x;rm -rf /", "$(id)", "`id`", "A" * 33, "-x", "Up",
                                 "a\nb", "é"])
def test_bad_names_rejected(bad: str) -> None:
    with pytest.raises(InvalidInput) as e:
        check_name(bad, what="image name")
    assert "hint" in e.value.one_line()


@pytest.mark.parametrize("good", ["a", "firefox", "my-image_2", "0abc"])
def test_good_names(good: str) -> None:
    assert check_name(good) == good


def test_session_ids() -> None:
    ids = {new_session_id() for _ in range(200)}
    assert len(ids) == 200
    for sid in ids:
        assert check_session_id(sid) == sid
    with pytest.raises(InvalidInput):
        check_session_id("../../etc")


@pytest.mark.parametrize(("text", "n"), [("6G", 6 << 30), ("512M", 512 << 20), ("1GiB", 1 << 30), ("4096", 4096),
                                         ("2k", 2048)])
def test_parse_size(text: str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("bad", ["", "G", "-1G", "1.5G", "0", "6X", "6 GB GB"])
def test_parse_size_bad(bad: str) -> None:
    with pytest.raises(InvalidInput):
        parse_size(bad)


def test_every_error_class_is_listed_in_the_exception_tree() -> None:
    """errors.py documents the whole tree (name and HTTP status); a new subclass anywhere must be added there."""
    import importlib
    import pkgutil

    import dispo
    from dispo import errors

    for mod in pkgutil.walk_packages(dispo.__path__, "dispo."):
        if mod.name not in ("dispo.__main__",):
            importlib.import_module(mod.name)
    seen: set[type[errors.DispoError]] = set()
    todo: list[type[errors.DispoError]] = [errors.DispoError]
    while todo:
        cls = todo.pop()
        seen.add(cls)
        todo += [c for c in cls.__subclasses__() if c not in seen and c.__module__.startswith("dispo.")]
    doc = errors.__doc__ or ""
    missing = sorted(c.__name__ for c in seen if f"{c.__name__} " not in doc)
    assert missing == []
    for cls in seen:
        line = next(ln for ln in doc.splitlines() if f" {cls.__name__} " in ln or ln.startswith(cls.__name__))
        assert str(cls.http_status) in line, (cls.__name__, cls.http_status, line)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[net]\nupstream = "lo"\n', 'net.upstream = "lo" is not allowed; allowed: the interface that leads out'),
        ('[net]\nupstream = "eth0; reboot"\n', 'net.upstream = "eth0; reboot" is not allowed'),
        ("[firecracker]\njail_uid = -5\n", "firecracker.jail_uid = -5 is not allowed; allowed: 0 (a uid/gid"),
        ("[firecracker]\njail_gid = 4294967295\n", "firecracker.jail_gid = 4294967295 is not allowed"),
        ('[firecracker]\nbinary = "firecracker"\n', 'firecracker.binary = "firecracker" is not allowed'),
        ('[firecracker]\nrelease_url = "https://x/{vers}"\n', "may use {version}, {arch}"),
        ('[firecracker]\nartifacts_url = "ftp://x"\n', "an http:// or https:// URL"),
        ("[service]\nmax_sessions = -1\n", "service.max_sessions = -1 is not allowed; allowed: a whole number from 1"),
        ("[service]\nmax_connections = 0\n", "service.max_connections = 0 is not allowed"),
        ("[service]\nheader_timeout_s = 0\n", "service.header_timeout_s = 0 is not allowed"),
        ("[service]\nbody_timeout_s = 0\n", "service.body_timeout_s = 0 is not allowed"),
        ("[service]\nbody_min_kib_s = -1\n", "service.body_min_kib_s = -1 is not allowed"),
        ('[service]\nlisten = "0.0.0.0"\n', 'service.listen = "0.0.0.0" is not allowed; allowed: "" (the unix'),
        ('[service]\nlisten = "0.0.0.0:8686"\n', "(not a wildcard)"),
        ('[service]\nlisten = "[::]:8686"\n', "(not a wildcard)"),
        ('[service]\npool = "chromium"\n', 'service.pool = "chromium" is not allowed; allowed: "" or NAME=COUNT'),
        ("[service]\npool_memory_mib = -1\n", "service.pool_memory_mib = -1 is not allowed"),
        ('[net]\npool = "172.20.0.1/16"\n', "net.pool = \"172.20.0.1/16\" is not allowed; allowed: an IPv4 network"),
        ("[net]\nprefix = 31\n", "net.prefix = 31 is not allowed; allowed: a per-session subnet size from 24 to 30"),
        ('[net]\npool = "10.0.0.0/28"\nprefix = 24\n', "net.pool = \"10.0.0.0/28\" is not allowed; allowed: a "
                                                   "network of /24 or larger (this one is too small"),
        ('[net]\ndns = "127.0.0.53"\n', 'net.dns = "127.0.0.53" is not allowed; allowed: "auto", "none"'),
        ('[net]\ndns = "1.1.1.1,nope"\n', 'net.dns = "1.1.1.1,nope" is not allowed'),
    ],
)
def test_bad_values_are_refused_at_load(tmp_path: Path, text: str, needle: str) -> None:
    """Every value is checked once when the config is loaded (every command loads it), with a one-line error
    naming the file, the key, the value and what is allowed."""
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError) as e:
        config.load(f, env={})
    line = e.value.one_line()
    assert needle in line and str(f) in line and "\n" not in line


@pytest.mark.parametrize("text", [
    '[net]\nupstream = "eth0"\ndns = "none"\npool = "10.9.0.0/24"\nprefix = 30\n',
    '[net]\ndns = " 1.1.1.1, 9.9.9.9"\n',
    '[service]\nlisten = "127.0.0.1:0"\nmax_sessions = 1\npool = "chromium=1,minimal=0"\n',
    '[service]\nlisten = "[::1]:8686"\n',
    '[service]\nlisten = "localhost:8686"\n',
    '[firecracker]\njail_uid = 4294967294\nbinary = "/usr/local/bin/firecracker"\n'
    'release_url = "https://example.org/v{version}/fc-{arch}.tgz"\n',
])
def test_good_values_load(tmp_path: Path, text: str) -> None:
    f = tmp_path / "good.toml"
    f.write_text(text)
    config.load(f, env={})


def test_every_command_refuses_a_bad_value_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`dispo ls` (an observer) used to accept what dispod refused."""
    from dispo.cli.main import main

    f = tmp_path / "bad.toml"
    f.write_text('[service]\nmax_sessions = -1\nlisten = "0.0.0.0"\n')
    assert main(["--config", str(f), "ls"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("dispo: error: ") and "service.max_sessions = -1" in err


def test_values_are_shown_as_written_not_as_python_reprs(tmp_path: Path) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("[service]\nmax_sessions = true\n")
    with pytest.raises(ConfigError) as e:
        config.load(f, env={})
    assert "must be an integer, got true" in e.value.one_line()
