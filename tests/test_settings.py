"""settings.py's SETTINGS is the one home of each session setting's default and limits: `dispo run`'s options,
the API's request schema, profile files and the request built from any of them all say what the table says,
every key of the table is in all of them, and no other module writes a default of its own."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from dispo import profiles
from dispo.cli import run
from dispo.config import Config
from dispo.errors import InvalidInput
from dispo.runtime import Stdio, build
from dispo.runtime.request import API_KEYS
from dispo.settings import SETTINGS, limit_hi
from dispo.vmm.base import VmmKind
from dispo.web.openapi import document
from tests.fakeworld import cfg, run_parser

__all__ = ["cfg"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)

SRC = Path(__file__).resolve().parent.parent / "src" / "dispo"
NUMBERS = [k for k, s in SETTINGS.items() if s.number]


def shown(value: float | str) -> str:
    """How a value is written for people (120.0 as 120), said here again so the test does not trust settings.py's."""
    if isinstance(value, str):
        return value
    return str(int(value)) if float(value) == int(value) else str(value)


def run_options() -> dict[str, argparse.Action]:
    """`dispo run`'s options that give a session setting, by the setting's key."""
    return {run._FLAGS[a.dest]: a for a in run_parser()._actions if run._FLAGS.get(a.dest) in SETTINGS}


def create_schema() -> dict[str, Any]:
    props: dict[str, Any] = document()["components"]["schemas"]["SessionCreate"]["properties"]
    return props


def a_value(key: str) -> Any:
    """A value of the setting other than its default, within its limits."""
    s = SETTINGS[key]
    if s.choices:
        return next(c for c in s.choices if c != s.default)
    if not s.number:
        return "other"
    value = s.lo + 1 if s.lo + 1 != s.default else s.lo + 2
    return int(value) if s.integer else float(value)


def test_every_setting_is_a_run_option_an_api_key_and_a_profile_key() -> None:
    """A key added to the table is in all three, and none of them has a setting the table does not."""
    assert set(run_options()) == set(SETTINGS)
    assert {k for k, v in create_schema().items() if "default" in v} == set(SETTINGS)
    assert set(SETTINGS) <= set(API_KEYS)
    assert set(SETTINGS) <= set(profiles.Profile.__dataclass_fields__)


@pytest.mark.parametrize("key", SETTINGS)
def test_run_help_shows_the_tables_default_and_limits(key: str) -> None:
    s, option = SETTINGS[key], run_options()[key]
    text = option.help or ""
    assert f"(default {shown(s.default)}, or the profile's" in text, text
    if s.number:
        assert option.type is (int if s.integer else float)
        assert f"{shown(s.lo)} to {shown(limit_hi(key))}" in text, text
    if s.zero:
        assert f"0: {s.zero}" in text, text
    if s.choices:
        assert tuple(option.choices or ()) == s.choices
    assert s.help in text
    # The option reaches the request under the table's key.
    args = run_parser().parse_args([option.option_strings[0], str(a_value(key)), "--", "true"])
    body, _ = run._request(args)
    assert body[key] == a_value(key)


@pytest.mark.parametrize("key", SETTINGS)
def test_the_api_schema_states_the_tables_default_and_limits(key: str) -> None:
    s, schema = SETTINGS[key], create_schema()[key]
    assert schema["default"] == s.default and s.help in schema["description"]
    check = Draft202012Validator(schema)
    assert check.is_valid(s.default)
    if s.choices:
        assert tuple(schema["enum"]) == s.choices
    if not s.number:
        return
    assert schema["type"] == ("integer" if s.integer else "number")
    ranges = [schema] if "minimum" in schema else [b for b in schema["anyOf"] if "minimum" in b]
    assert [(r["minimum"], r["maximum"]) for r in ranges] == [(s.lo, limit_hi(key))]
    assert check.is_valid(s.lo) and check.is_valid(limit_hi(key)) and not check.is_valid(limit_hi(key) + 1)
    assert check.is_valid(0) is bool(s.lo <= 0 or s.zero)
    if s.lo > 1:
        assert not check.is_valid(s.lo - 1)


def test_a_profile_that_leaves_the_settings_out_gets_the_tables_defaults(tmp_path: Path) -> None:
    (tmp_path / "bare.toml").write_text('image = "minimal"\ncommand = ["true"]\n')
    p = profiles.find("bare", tmp_path)
    for key, s in SETTINGS.items():
        if key != "image":
            assert getattr(p, key) == s.default, key
    # The image is the one setting a profile must state: its default is for a plain `dispo run -- CMD`.
    (tmp_path / "noimage.toml").write_text('command = ["true"]\n')
    with pytest.raises(InvalidInput, match="key 'image' must name an image"):
        profiles.find("noimage", tmp_path)


@pytest.mark.parametrize("key", SETTINGS)
def test_a_profile_takes_each_setting_within_the_tables_limits(tmp_path: Path, key: str) -> None:
    s, value = SETTINGS[key], a_value(key)
    written = f'"{value}"' if isinstance(value, str) else shown(value)
    lines = {"image": '"minimal"', "command": '["true"]', key: written}
    (tmp_path / "p.toml").write_text("".join(f"{k} = {v}\n" for k, v in lines.items()))
    assert getattr(profiles.find("p", tmp_path), key) == value
    if not s.number:
        return
    for good in (s.lo, limit_hi(key)) + ((0,) if s.zero else ()):
        (tmp_path / "p.toml").write_text(f'image = "minimal"\ncommand = ["true"]\n{key} = {shown(good)}\n')
        assert getattr(profiles.find("p", tmp_path), key) == good
    bad = [limit_hi(key) + 1] + ([s.lo - 1] if s.lo > 1 else [])
    for number in bad:
        (tmp_path / "p.toml").write_text(f'image = "minimal"\ncommand = ["true"]\n{key} = {shown(number)}\n')
        with pytest.raises(InvalidInput, match=f"key '{key}' must be .* from {shown(s.lo)} to "
                                               f"{shown(limit_hi(key))}"):
            profiles.find("p", tmp_path)


def test_a_request_without_a_profile_gets_the_tables_defaults(cfg: Config) -> None:
    req = build(cfg, command=["true"])
    for key in NUMBERS:
        assert getattr(req, key) == SETTINGS[key].default, key
    assert req.image == SETTINGS["image"].default
    assert not [a for a in req.cmdline() if a.startswith("dispo.shm=")]  # 0: the guest's own /dev/shm


def test_a_request_from_a_bare_profile_gets_the_tables_defaults(cfg: Config) -> None:
    (cfg.profiles_dir / "bare.toml").write_text('image = "minimal"\ncommand = ["true"]\n')
    req = build(cfg, profile="bare", stdio=Stdio.CAPTURE)
    for key in NUMBERS:
        assert getattr(req, key) == SETTINGS[key].default, key


def test_the_backends_are_the_vmms() -> None:
    assert set(SETTINGS["backend"].choices) == {"auto", *(k.value for k in VmmKind)}


def _literal(node: ast.expr | None) -> bool:
    """A number or string written out (512, -1, "auto"), also as field(default=512)."""
    if isinstance(node, ast.UnaryOp):
        node = node.operand
    if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "field":
        return any(k.arg == "default" and _literal(k.value) for k in node.keywords)
    return isinstance(node, ast.Constant) and node.value is not None and not isinstance(node.value, bool)


def test_no_module_but_settings_writes_a_default_of_a_setting() -> None:
    """Class fields (dataclasses) and function parameters named like a setting take their default from the table
    (or have none, or None): a literal there would be a second home for the fact."""
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "settings.py" and path.parent == SRC:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            pairs: list[tuple[str, ast.expr | None]] = []
            if isinstance(node, ast.ClassDef):
                pairs += [(n.target.id, n.value) for n in node.body
                          if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
                pairs += [(t.id, n.value) for n in node.body if isinstance(n, ast.Assign)
                          for t in n.targets if isinstance(t, ast.Name)]
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                a = node.args
                positional = [*a.posonlyargs, *a.args]
                pairs += list(zip([x.arg for x in positional[len(positional) - len(a.defaults):]], a.defaults,
                                  strict=True))
                pairs += [(x.arg, d) for x, d in zip(a.kwonlyargs, a.kw_defaults, strict=True)]
            found += [f"{path.relative_to(SRC)}:{getattr(v, 'lineno', '?')}: {name}"
                      for name, v in pairs if name in SETTINGS and _literal(v)]
    assert not found, found
