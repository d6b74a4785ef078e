"""Warm starts with fake machinery (tests/fakes.py): which requests restore and why, stale templates, the
restore as swapped steps, and the agent protocol on both sides. Fast and without root; the real path is
tests/test_templates.py (QEMU/TCG) and tests/test_templates_firecracker.py."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from dispo.config import Config
from dispo.errors import AgentError, Conflict
from dispo.guest import agent
from dispo.runtime import Event, EventKind, Runtime, build, warm
from dispo.runtime.plan import plan
from dispo.storage import templates
from dispo.storage.images import ImageStore
from dispo.storage.templates import TemplateKind, TemplateStore
from tests.fakeworld import cfg, leftovers, make_template, rt

__all__ = ["cfg", "rt"]  # the fixtures from tests/fakeworld.py (pytest finds them by name)


def test_no_template_boots_cold_and_says_why(cfg: Config) -> None:
    req = build(cfg, image="minimal", command=["true"])
    chosen = plan(cfg, req)
    assert chosen.template is None and chosen.why.startswith("booting cold: no template of image 'minimal'")
    with pytest.raises(Conflict, match="cannot start warm: no template"):
        plan(cfg, build(cfg, image="minimal", command=["true"], start="warm"))


def test_a_template_is_restored_by_default_and_never_by_cold(rt: Runtime, cfg: Config) -> None:
    before = leftovers(cfg)
    make_template(rt)
    t = TemplateStore(cfg).find(TemplateKind.IMAGE, "minimal")
    assert t is not None and {"rootfs.ext4", "memory.fake", "template.json"} <= {p.name for p in t.path.iterdir()}
    assert not os.access(t.path / "memory.fake", os.W_OK) or os.geteuid() == 0  # sealed (root writes anyway)
    assert oct(os.stat(t.path / "memory.fake").st_mode & 0o222) == "0o0"
    assert leftovers(cfg) == before  # the building session is gone

    seen: list[Event] = []
    live = rt.start(build(cfg, image="minimal", command=["sh", "-c", "echo warm"]), sink=seen.append)
    assert live.wait(30) and live.error is None and live.exit_status == 0, live.error
    assert live.warm and live.status()["start"] == "restore"
    assert live.receipt is not None and live.receipt.clean and live.receipt.summary()["image_unchanged"] is True
    steps = [e.fields["step"] for e in seen if e.kind is EventKind.STEP]
    assert steps == ["template.validate", "template.disk", "network", "vmm.restore", "guest.identity",
                     "guest.ready", "app"]
    assert any(e.kind is EventKind.NOTICE and e.message.startswith("restoring from template image-minimal")
               for e in seen)
    # The session disk was the template's disk alone: the memory file is read, never copied per session.
    cold = rt.start(build(cfg, image="minimal", command=["true"], start="cold"))
    assert cold.wait(30) and cold.error is None and not cold.warm
    assert leftovers(cfg) == before


def test_what_does_not_fit_or_changed_boots_cold_with_the_reason(rt: Runtime, cfg: Config,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    make_template(rt)
    req = build(cfg, image="minimal", command=["true"])
    assert plan(cfg, req).template is not None
    bigger = build(cfg, image="minimal", command=["true"], memory_mib=1024)
    assert "does not fit: memory_mib 1024 (template: 512)" in plan(cfg, bigger).why
    more_shm = build(cfg, image="minimal", command=["true"], shm_mib=256)  # booted with it: a clone cannot change it
    assert "does not fit: shm_mib 256 (template: 0)" in plan(cfg, more_shm).why
    # The time zone and language the guest took at boot (docs/quiet.md) stay with its clones.
    monkeypatch.setenv("TZ", "Pacific/Auckland")
    elsewhere = build(cfg, image="minimal", command=["true"])
    assert "guest settings dispo.tz=Pacific/Auckland" in plan(cfg, elsewhere).why
    monkeypatch.undo()

    monkeypatch.setattr(templates, "agent_hash", lambda: "another-agent")
    assert "carries another version of dispo's guest agent" in plan(cfg, req).why
    monkeypatch.undo()
    t = TemplateStore(cfg).find(TemplateKind.IMAGE, "minimal")
    assert t is not None and t.vmm_version.startswith("qemu QEMU emulator version")  # recorded at the save
    monkeypatch.setattr(warm, "vmm_version", lambda cfg, kind: "qemu QEMU emulator version 99.0")
    assert f"it was saved by {t.vmm_version}, this host has qemu QEMU emulator version 99.0" in plan(cfg, req).why
    monkeypatch.undo()

    t = TemplateStore(cfg).find(TemplateKind.IMAGE, "minimal")
    assert t is not None
    mem = t.path / "memory.fake"
    os.chmod(mem, 0o600)
    with open(mem, "a") as f:  # someone wrote into a sealed template
        f.write("tampered\n")
    assert "its file memory.fake changed after it was sealed" in plan(cfg, req).why

    make_template(rt)  # a rebuild replaces it
    assert plan(cfg, req).template is not None
    store = ImageStore(cfg)
    image = store.get("minimal")
    store.remove("minimal")
    store.import_(image.path.parent.parent.parent / "minimal.ext4", "minimal", quiet=True)
    why = plan(cfg, req).why
    assert why.startswith("booting cold: template image-minimal is stale: its image 'minimal' changed"), why
    with pytest.raises(Conflict, match="cannot start warm: template image-minimal is stale"):
        plan(cfg, build(cfg, image="minimal", command=["true"], start="warm"))


def test_a_qemu_template_of_the_old_format_is_stale_with_a_hint_to_rebuild(rt: Runtime, cfg: Config) -> None:
    """Format 1 kept a QEMU template's RAM inside the migration stream, which no clone can share."""
    make_template(rt)
    t = TemplateStore(cfg).find(TemplateKind.IMAGE, "minimal")
    assert t is not None and t.format == templates.FORMAT == 2 and t.backend == "qemu"
    meta = t.path / templates.META
    doc = json.loads(meta.read_text())
    doc["format"] = 1
    mode = os.stat(t.path).st_mode
    os.chmod(t.path, 0o700)
    meta.unlink()
    meta.write_text(json.dumps(doc))
    os.chmod(t.path, mode)
    req = build(cfg, image="minimal", command=["true"])
    why = plan(cfg, req).why
    assert why == ("booting cold: template image-minimal is stale: it was made by an older dispo (its clones could "
                   "not share its memory) (rebuild it with 'dispo template build minimal')"), why


def test_profile_templates_take_the_profile_and_image_ones_the_image(rt: Runtime, cfg: Config) -> None:
    make_template(rt, "chromium")  # fakes.config's chromium profile: a fake browser on a fake display
    assert TemplateStore(cfg).find(TemplateKind.PROFILE, "chromium") is not None
    assert plan(cfg, build(cfg, profile="chromium")).template is not None
    assert plan(cfg, build(cfg, image="minimal", command=["true"])).template is None
    assert [t.key for t in TemplateStore(cfg).list()] == ["profile-chromium"]
    TemplateStore(cfg).remove("chromium")
    assert TemplateStore(cfg).list() == []


# -- the agent protocol ------------------------------------------------------------------------------


def _perl(*lines: str) -> list[str]:
    """The in-guest agent's replies to `lines`, from its own handle() (perl, without touching this host)."""
    script = Path(__file__).resolve().parents[1] / "src" / "dispo" / "guest" / "agent.pl"
    code = f'require "{script}"; while (my $l = <STDIN>) {{ chomp $l; print handle($l), "\\n"; }}'
    out = subprocess.run(["perl", "-e", code], input="\n".join(lines) + "\n", capture_output=True, text=True,
                         check=True, timeout=30).stdout
    return out.splitlines()


def test_the_agent_answers_hello_and_rejects_everything_else() -> None:
    replies = _perl("hello 2 0123abcd", "hello 1 0123abcd", "hello 2 XYZ", "rm -rf /", "hostname ../../etc",
                    "hostname a;b", "net 02:00:00:00:00:01 10.0.0.2/30 10.0.0.1 8.8.8.8;reboot",
                    "clock 12 x", "entropy 00", "user-key 41", "host-key zz", "", "hello 2 0123abcd extra")
    assert replies[0] == "ok dispo-agent 2 0123abcd"
    assert all(r.startswith("err ") for r in replies[1:]), replies


class _FakeAgent:
    """The guest side of a socket pair, answering as told."""

    def __init__(self, answer: bytes) -> None:
        self.host, self.guest = socket.socketpair()
        self.answer = answer
        self.got = b""
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        data = self.guest.recv(4096)
        self.got = data
        self.guest.sendall(self.answer.replace(b"TOKEN", data.split()[-1]) if b"TOKEN" in self.answer
                           else self.answer)


def test_the_host_side_caps_and_checks_what_the_guest_says() -> None:
    ok = _FakeAgent(b"ok dispo-agent 2 0000\nok dispo-agent 2 TOKEN\n")  # a stale answer first, then ours
    agent.AgentLink(ok.host).hello(5, lambda: True)
    for bad, why in ((b"x" * 2000, "over-long"), (b"ok \x1b[2Jboom\n", "not printable")):
        fake = _FakeAgent(bad)
        with pytest.raises(AgentError, match=why):
            agent.AgentLink(fake.host).hello(5, lambda: True)
    refused = _FakeAgent(b"err bad hostname\n")
    with pytest.raises(AgentError, match="refused 'hostname': err bad hostname"):
        agent.AgentLink(refused.host).request("hostname x")
