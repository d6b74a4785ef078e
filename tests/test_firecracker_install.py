"""`dispo firecracker install` against a local server holding a release tarball in the official layout
(built in the test from the installed real binaries), and `dispo doctor`."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.config import Config
from dispo.errors import InstallError, InvalidInput
from dispo.vmm.firecracker.binaries import find_firecracker, version_of
from dispo.vmm.firecracker.install import install
from tests.fcworld import firecracker_or_skip_reason, jailer_pair_or_skip_reason
from tests.s3world import Bucket, serve
from tests.worlds import dispo_env, make_config

PAIR, WHY = jailer_pair_or_skip_reason()
FC, FC_WHY = firecracker_or_skip_reason()
DISPO = [sys.executable, "-m", "dispo"]


def release_tgz(version: str, fc: Path, jailer: Path | None, *, break_sum: bool = False) -> bytes:
    stem = f"release-v{version}-x86_64"
    files = {f"firecracker-v{version}-x86_64": fc.read_bytes()}
    if jailer is not None:
        files[f"jailer-v{version}-x86_64"] = jailer.read_bytes()
    sums = "".join(f"{hashlib.sha256(b'x' if break_sum else d).hexdigest()}  {n}\n" for n, d in files.items())
    files["SHA256SUMS"] = sums.encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"{stem}/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Bucket, str]]:
    bucket = Bucket(tmp_path / "releases")
    bucket.root.mkdir()
    with serve(bucket) as url:
        yield bucket, url


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path / "ws", tmp_path / "st")


def publish(bucket: Bucket, version: str, tgz: bytes, *, outer_sum: bool = True) -> None:
    d = bucket.root / f"v{version}"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"firecracker-v{version}-x86_64.tgz").write_bytes(tgz)
    if outer_sum:
        (d / f"firecracker-v{version}-x86_64.tgz.sha256.txt").write_text(
            f"{hashlib.sha256(tgz).hexdigest()}  firecracker-v{version}-x86_64.tgz\n")


TEMPLATE = "/v{version}/firecracker-v{version}-{arch}.tgz"


@pytest.mark.skipif(PAIR is None, reason=WHY)
def test_install_a_release_with_its_jailer(cfg: Config, server: tuple[Bucket, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    assert PAIR is not None
    bucket, base = server
    publish(bucket, "1.7.0", release_tgz("1.7.0", PAIR[1], PAIR[0]))
    done = install(cfg, "1.7.0", url=base + TEMPLATE, arch="x86_64", quiet=True)
    assert done.firecracker == cfg.workspace / "bin" / "firecracker" and done.jailer is not None
    assert version_of(done.firecracker) == "1.7.0" and version_of(done.jailer) == "1.7.0"
    assert os.access(done.firecracker, os.X_OK)
    assert [p.name for p in (cfg.workspace / "bin").iterdir() if p.name.startswith(".")] == []
    # The lookup finds the installed binary when nothing else is configured.
    monkeypatch.delenv("DISPO_FIRECRACKER", raising=False)
    assert find_firecracker(cfg) == done.firecracker
    assert any(q.endswith(".sha256.txt") for q, _ in bucket.log), "the outer checksum was fetched"


@pytest.mark.skipif(FC is None, reason=FC_WHY)
@pytest.mark.parametrize("fault", ["inner sum", "outer sum", "wrong version", "not a tarball", "missing"])
def test_bad_releases_are_refused_and_nothing_is_installed(cfg: Config, server: tuple[Bucket, str],
                                                          fault: str) -> None:
    assert FC is not None
    bucket, base = server
    real = version_of(FC)
    if fault == "inner sum":
        publish(bucket, real, release_tgz(real, FC, None, break_sum=True))
    elif fault == "outer sum":
        publish(bucket, real, release_tgz(real, FC, None), outer_sum=False)
        (bucket.root / f"v{real}" / f"firecracker-v{real}-x86_64.tgz.sha256.txt").write_text("0" * 64 + "  x\n")
    elif fault == "wrong version":
        publish(bucket, "9.9.9", release_tgz("9.9.9", FC, None))
        real = "9.9.9"
    elif fault == "not a tarball":
        publish(bucket, real, b"<html>not found</html>")
    with pytest.raises(InstallError) as e:
        install(cfg, real, url=base + TEMPLATE, arch="x86_64", quiet=True)
    assert "\n" not in e.value.one_line()
    assert not (cfg.workspace / "bin").exists() or list((cfg.workspace / "bin").iterdir()) == []


def test_invalid_version(cfg: Config) -> None:
    with pytest.raises(InvalidInput):
        install(cfg, "latest; rm -rf /", url="http://127.0.0.1:9/x.tgz")


@pytest.mark.skipif(FC is None, reason=FC_WHY)
def test_cli_install_and_doctor(cfg: Config, server: tuple[Bucket, str], tmp_path: Path) -> None:
    assert FC is not None
    bucket, base = server
    version = version_of(FC)
    publish(bucket, version, release_tgz(version, FC, None))
    env = dispo_env(cfg.workspace, cfg.state_dir)
    env.pop("DISPO_FIRECRACKER", None)
    env["PATH"] = "/usr/bin:/bin"  # so only the installed binary can be found
    cfgfile = tmp_path / "dispo.toml"
    cfgfile.write_text(f'[firecracker]\nrelease_url = "{base}{TEMPLATE}"\njail = "off"\n')
    env["DISPO_CONFIG"] = str(cfgfile)
    doc = subprocess.run([*DISPO, "doctor"], env=env, capture_output=True, text=True)
    assert doc.returncode == 1 and "FAIL  firecracker" in doc.stdout, doc.stdout + doc.stderr
    out = subprocess.run([*DISPO, "firecracker", "install", "--version", version, "--quiet"], env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert f"installed firecracker v{version}" in out.stdout
    doc = subprocess.run([*DISPO, "doctor"], env=env, capture_output=True, text=True)
    assert doc.returncode == 0, doc.stdout + doc.stderr
    lines = {ln.split()[1]: ln for ln in doc.stdout.splitlines() if ln.strip()}
    assert lines["firecracker"].startswith("ok") and f"(v{version})" in lines["firecracker"]
    assert lines["/dev/kvm"].startswith("ok")
    assert "probe guest printed" in doc.stdout, doc.stdout
    assert not (cfg.state_dir / "sessions").exists() or list((cfg.state_dir / "sessions").iterdir()) == []
