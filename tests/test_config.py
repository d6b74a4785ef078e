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
        ('[storage]\nbackend = "zfs"\n', "key 'storage.backend' is 'zfs', expected one of: auto, btrfs, reflink, copy"),
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
