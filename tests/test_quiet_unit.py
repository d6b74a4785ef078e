"""The quiet-browser logic without a guest: the request log's parsing of guest frames, the host's time zone
and language, the profile's [privacy] table, and what reaches the guest's kernel command line."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
from pathlib import Path

import pytest

from dispo import privacy, profiles
from dispo.config import Config
from dispo.errors import InvalidInput
from dispo.guest import resource
from dispo.imagebuild.recipes import CHROMIUM, FIREFOX, MINIMAL
from dispo.net.capture import RequestLog, describe, dns_question
from dispo.runtime.request import SessionRequest, from_json

GUEST_MAC, HOST_MAC = bytes.fromhex("0600ac140002"), bytes.fromhex("fe0000000001")


def _ipv4(proto: int, dst: str, payload: bytes, *, frag: int = 0) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 1, frag, 64, proto, 0,
                         socket.inet_aton("172.20.0.2"), socket.inet_aton(dst))
    return HOST_MAC + GUEST_MAC + b"\x08\x00" + header + payload


def _tcp(dst: str, sport: int, dport: int, flags: int) -> bytes:
    return _ipv4(6, dst, struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, flags, 1024, 0, 0))


def _dns_query(qid: int, name: str, qtype: int = 1, *, response: bool = False) -> bytes:
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\x00" + struct.pack("!HH", qtype, 1)
    return struct.pack("!HHHHHH", qid, 0x8180 if response else 0x0100, 1, 0, 0, 0) + question


def _udp(dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    return _ipv4(17, dst, struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload)


def test_request_log_counts_what_the_guest_starts() -> None:
    log = RequestLog("unused")
    frames = [
        _udp("192.0.2.10", 40000, 53, _dns_query(7, "page.example", 1)),
        _udp("192.0.2.10", 40000, 53, _dns_query(7, "page.example", 1)),   # a retransmission: same query
        _udp("192.0.2.10", 40001, 53, _dns_query(8, "page.example", 1)),   # a second query
        _udp("192.0.2.10", 40002, 53, _dns_query(9, "page.example", 65)),
        _udp("192.0.2.10", 40003, 53, _dns_query(1, "x", 1, response=True)),  # not a query: a UDP flow
        _tcp("203.0.113.2", 50000, 8090, 0x02),   # SYN
        _tcp("203.0.113.2", 50000, 8090, 0x02),   # its retransmission
        _tcp("203.0.113.2", 50001, 8090, 0x02),
        _tcp("203.0.113.2", 50001, 8090, 0x10),   # an ACK: no new connection
        _tcp("198.51.100.1", 22, 41000, 0x12),    # SYN-ACK of a connection the host opened: not the guest's
        _udp("8.8.8.8", 123, 123, b"\x23" + b"\x00" * 47),
        _ipv4(1, "203.0.113.2", b"\x08\x00\x00\x00\x00\x01\x00\x01"),
        _ipv4(17, "203.0.113.2", b"later fragment", frag=100),
        HOST_MAC + GUEST_MAC + b"\x08\x06" + b"\x00" * 28,   # ARP
        b"\xff" * 6 + GUEST_MAC + b"\x80\x35" + b"\x00" * 28,  # RARP: QEMU's announce after a restore
        HOST_MAC + GUEST_MAC + b"\x86\xdd" + b"\x60" + b"\x00" * 23 + socket.inet_pton(socket.AF_INET6, "ff02::2"),
        HOST_MAC + GUEST_MAC + b"\x88\xcc" + b"\x00" * 10,  # LLDP
        b"\x00" * 5,
    ]
    for f in frames:
        log.note(f)
    got = {describe(r) for r in log.requests()}
    assert got == {
        "dns A page.example (asked 192.0.2.10) x2", "dns HTTPS page.example (asked 192.0.2.10)",
        "udp 192.0.2.10:53", "tcp 203.0.113.2:8090 x2", "udp 8.8.8.8:123", "icmp 203.0.113.2", "ipv6 ff02::2",
        "other ethertype 0x88cc"}, got


def test_guest_names_are_escaped_and_entries_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    hostile = _dns_query(1, "a", 1).replace(b"\x01a", b"\x05\x1b[2Jb")
    q = dns_question(hostile)
    assert q is not None and q[1] == "\\x1b[2Jb", q
    assert dns_question(b"\x00" * 11) is None
    assert dns_question(_dns_query(1, "a")[:-3]) is None  # truncated
    monkeypatch.setattr("dispo.net.capture.MAX_ENTRIES", 3)
    log = RequestLog("unused")
    for port in range(10):
        log.note(_tcp("203.0.113.2", 50000, 1000 + port, 0x02))
    assert len(log.requests()) == 3 and log.dropped == 7


def test_request_log_binds_to_a_real_interface() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: AF_PACKET")
    log = RequestLog("lo")
    log.start()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.sendto(_dns_query(3, "lo.example")[0:], ("127.0.0.1", 53))
        for _ in range(50):
            if log.requests():
                break
            subprocess.run(["sleep", "0.05"], check=True)
    finally:
        log.stop()
    assert any(r["name"] == "lo.example" for r in log.requests()), log.requests()
    with pytest.raises(OSError):
        RequestLog("no-such-if0").start()


def test_host_timezone_and_language(tmp_path: Path) -> None:
    etc = tmp_path / "etc"
    etc.mkdir()
    assert privacy.host_timezone({"TZ": "Europe/Berlin"}, tmp_path) == "Europe/Berlin"
    assert privacy.host_timezone({"TZ": ":America/Denver"}, tmp_path) == "America/Denver"
    assert privacy.host_timezone({"TZ": "/etc/../../x"}, tmp_path) == "UTC"
    (etc / "localtime").symlink_to("/usr/share/zoneinfo/Asia/Tokyo")
    assert privacy.host_timezone({}, tmp_path) == "Asia/Tokyo"
    (etc / "timezone").write_text("Europe/Paris\n")
    assert privacy.host_timezone({"TZ": "EST5EDT,M3.2.0"}, tmp_path) == "Europe/Paris"  # a rule is no name
    assert privacy.host_language({"LANG": "de_DE.UTF-8"}) == "de-DE"
    assert privacy.host_language({"LC_ALL": "", "LC_MESSAGES": "fr_CA.UTF-8", "LANG": "de_DE"}) == "fr-CA"
    assert privacy.host_language({"LANG": "pt"}) == "pt"
    assert privacy.host_language({"LANG": "C.UTF-8"}) == "en-US"
    assert privacy.host_language({}) == "en-US"


def test_privacy_table_in_a_profile(tmp_path: Path) -> None:
    p = profiles.parse("x", {"image": "chromium", "command": ["chromium"],
                             "privacy": {"timezone": "UTC", "language": "fr-FR", "safe_browsing": True}}, "x.toml")
    assert p.privacy.allowed() == ("safe-browsing",)
    assert privacy.resolve(p.privacy, {"TZ": "Asia/Tokyo"}) == ("UTC", "fr-FR")
    assert privacy.resolve(profiles.find("chromium").privacy, {"TZ": "Asia/Tokyo", "LANG": "ja_JP.UTF-8"}) \
        == ("Asia/Tokyo", "ja-JP")
    for table, text in (({"timezone": "../etc/passwd"}, "not a time zone name"),
                        ({"language": "de_DE; rm"}, "not a language tag"),
                        ({"quiet": "no"}, "must be true or false"),
                        ({"telemetry": True}, "unknown key 'telemetry'")):
        with pytest.raises(InvalidInput, match=text):
            profiles.parse("x", {"image": "chromium", "privacy": table}, "x.toml")


def test_log_requests_in_an_api_body(cfg: Config) -> None:
    with pytest.raises(InvalidInput, match="log_requests must be true or false"):
        from_json(cfg, {"image": "minimal", "command": ["true"], "log_requests": "yes"})


def test_guest_settings_reach_the_kernel_command_line() -> None:
    r = SessionRequest(image="chromium", timezone="America/Denver", language="de-DE", shm_mib=512)
    assert r.cmdline() == ("dispo.shm=512", "dispo.tz=America/Denver", "dispo.lang=de-DE")
    loud = SessionRequest(image="chromium", quiet=False, allow=("safe-browsing",))
    assert loud.cmdline() == ("dispo.quiet=0", "dispo.allow=safe-browsing")


def test_browser_images_carry_their_quiet_settings() -> None:
    assert not MINIMAL.configs
    for recipe in (CHROMIUM, FIREFOX):
        paths = {p for p, _ in recipe.configs}
        assert paths and all(p.startswith("/") for p in paths)
        for _, name in recipe.configs:
            if name.endswith(".json"):
                json.loads(resource(name))  # a policy file that does not parse would be ignored, silently
    policies = json.loads(resource("chromium-policies.json"))
    assert policies["BrowserSignin"] == 0 and policies["SafeBrowsingProtectionLevel"] == 0
    prefs = resource("firefox-prefs.js").decode()
    assert 'pref("datareporting.policy.firstRunURL", "", locked);' in prefs  # the privacy-notice tab
    # browser-setup.sh deletes the lines ending in the marker: each must be a whole pref; all are locked (an
    # unlocked default may lose to Firefox's own, read later).
    lines = [line for line in prefs.splitlines() if line.startswith("pref(")]
    marked = [line for line in lines if line.endswith("// dispo:safe-browsing")]
    assert marked and all(", locked);" in line for line in lines)


def _guest_tree(root: Path) -> Path:
    """The browser images' dispo files, laid out under `root` as in the guest."""
    for recipe in (CHROMIUM, FIREFOX):
        for path, name in recipe.configs:
            (root / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            (root / path.lstrip("/")).write_bytes(resource(name))
    script = root / "browser-setup"
    script.write_bytes(resource("browser-setup.sh"))
    script.chmod(0o755)
    return script


def _setup(root: Path, *args: str) -> None:
    subprocess.run([str(root / "browser-setup"), *args], env={"PATH": "/usr/bin:/bin", "DISPO_SETUP_ROOT": str(root)},
                   check=True, timeout=30)


def test_browser_setup_applies_the_session_settings(tmp_path: Path) -> None:
    _guest_tree(tmp_path)
    _setup(tmp_path, "de-DE", "", "")
    env = (tmp_path / "run/dispo/session.env").read_text().splitlines()
    assert env == ["LANG=de_DE.UTF-8", "LANGUAGE=de_DE:de", "MOZ_REMOTE_SETTINGS_DEVTOOLS=1"], env
    prefs = json.loads((tmp_path / "etc/chromium/master_preferences").read_text())
    assert prefs["intl"]["accept_languages"] == "de-DE,de"
    assert (tmp_path / "etc/firefox-esr/dispo-session.js").read_text() == \
        'pref("intl.accept_languages", "de-DE, de", locked);\n'
    policies = json.loads((tmp_path / "etc/chromium/policies/managed/dispo-quiet.json").read_text())
    assert policies["SafeBrowsingProtectionLevel"] == 0
    assert "dispo:safe-browsing" in (tmp_path / "etc/firefox-esr/dispo-quiet.js").read_text()

    _setup(tmp_path, "fr", "1", "safe-browsing")  # the profile's safe_browsing = true
    policies = json.loads((tmp_path / "etc/chromium/policies/managed/dispo-quiet.json").read_text())
    assert policies["SafeBrowsingProtectionLevel"] == 1 and policies["BrowserSignin"] == 0
    ff = (tmp_path / "etc/firefox-esr/dispo-quiet.js").read_text()
    assert "safebrowsing" not in ff and "datareporting.policy.firstRunURL" in ff
    assert json.loads((tmp_path / "etc/chromium/master_preferences").read_text())["intl"]["accept_languages"] == "fr"


def test_browser_setup_baseline_and_hostile_language(tmp_path: Path) -> None:
    _guest_tree(tmp_path)
    _setup(tmp_path, 'x",evil', "0", "")  # a language that is no tag never reaches a file as given
    assert "LANG=en_US.UTF-8" in (tmp_path / "run/dispo/session.env").read_text()
    assert "evil" not in (tmp_path / "etc/firefox-esr/dispo-session.js").read_text()
    # quiet = false: the browsers as Debian ships them (the benchmark's baseline)
    for gone in ("etc/chromium/policies/managed/dispo-quiet.json", "etc/chromium.d/dispo-quiet",
                 "etc/firefox-esr/dispo-quiet.js", "usr/share/firefox-esr/distribution/policies.json"):
        assert not (tmp_path / gone).exists(), gone
    assert "MOZ_REMOTE_SETTINGS_DEVTOOLS" not in (tmp_path / "run/dispo/session.env").read_text()
