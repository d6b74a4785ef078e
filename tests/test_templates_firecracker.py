"""A Firecracker template and a restore from it, through the runtime's own steps, with the real binary and its
jailer. A Linux guest does not boot under this machine's KVM, so the guest is the tiny hand-made ELF: the
network (tap, nftables), the jailed firecracker, the snapshot files, the template's seal, the restore into a
second jail and every teardown are real. What needs a Linux guest stands in (named as such): readiness is the
tiny guest's serial line instead of SSH, and the agent's check and identity hand-over are recorded, not run.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dispo.config import Config, FirecrackerConfig, JailMode, StorageBackend, StorageConfig, StoragePool
from dispo.infra.txn import Transaction
from dispo.net import GuestNetwork
from dispo.runtime import Runtime, build, warm
from dispo.runtime import plan as planning
from dispo.runtime.machinery import REAL, Identity, Machinery
from dispo.storage.images import ImageStore
from dispo.storage.templates import TemplateKind, TemplateStore
from dispo.vmm.base import Vmm
from dispo.vmm.firecracker.probe import GUEST_LINE, tiny_elf
from tests.fakes import FakeIdentity
from tests.fcworld import (
    add_upstream,
    firecracker_or_skip_reason,
    inside_new_netns,
    jailer_pair_or_skip_reason,
    links,
    processes_mentioning,
)
from tests.worlds import host_objects, make_ext4

FC, WHY = firecracker_or_skip_reason()
PAIR, PAIR_WHY = jailer_pair_or_skip_reason()
pytestmark = [pytest.mark.firecracker, pytest.mark.root, pytest.mark.vm, pytest.mark.skipif(FC is None, reason=WHY)]


class TinyGuest:
    """Stand-ins for what only a Linux guest can do; what they saw is kept for the assertions."""

    def __init__(self) -> None:
        self.checked: list[str] = []
        self.renewed: list[tuple[str, str]] = []

    def identity(self, tx: Transaction, disk: Path) -> Identity:
        return _TinyIdentity(tx.state_path)

    def agent_check(self, vmm: Vmm, timeout: float, alive: Callable[[], bool]) -> None:
        self.checked.append(vmm.spec.session_id)

    def renew(self, tx: Transaction, vmm: Vmm, net: GuestNetwork, timeout: float,
              alive: Callable[[], bool]) -> tuple[Identity, None]:
        state = vmm.api.describe_instance().get("state") if hasattr(vmm, "api") and vmm.api else "?"
        vmm.resume()
        after = vmm.api.describe_instance().get("state") if hasattr(vmm, "api") and vmm.api else "?"
        self.renewed.append((str(state), str(after)))
        # The restored ELF prints nothing again: "ready" is that firecracker reports it running.
        said = tx.state_path / "restored.log"
        said.write_text(GUEST_LINE.decode() if after == "Running" else "")
        return _TinyIdentity(tx.state_path, said), None


class _TinyIdentity(FakeIdentity):
    """The fake channel (commands run on the host in a scratch dir) whose readiness is the ELF's line."""

    def __init__(self, state: Path, console: Path | None = None) -> None:
        home = state / "guest-home"
        home.mkdir(mode=0o700, exist_ok=True)
        super().__init__(home, console or state / "console.log")


def _world(root: Path, firecracker: FirecrackerConfig) -> tuple[Config, Machinery, TinyGuest]:
    cfg = Config(workspace=root / "ws", state_dir=root / "st",
                 storage=StorageConfig(backend=StorageBackend.AUTO, pool=StoragePool.NONE),
                 firecracker=firecracker)
    kernel = tiny_elf(root / "vmlinux")
    disk = make_ext4(root / "root.ext4", "32M", {"home/user/.ssh/.keep": "", "etc/ssh/.keep": ""})
    ImageStore(cfg).import_(disk, "fcprobe", quiet=True, extra_files={"vmlinux": kernel},
                            extra_meta={"kernel": "vmlinux", "vmms": ["firecracker"], "cmdline": ["console=ttyS0"]})
    guest = TinyGuest()
    machinery = Machinery(attach_network=REAL.attach_network, create_vmm=REAL.create_vmm, identity=guest.identity,
                          network_missing=REAL.network_missing, renew_identity=guest.renew,
                          agent_check=guest.agent_check, agent_link=lambda vmm, timeout, alive: None,
                          name="real VMM and network, tiny guest")
    return cfg, machinery, guest


def test_firecracker_template_then_restore_through_the_runtime(chroot_base: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    assert FC is not None
    cfg, machinery, guest = _world(chroot_base, FirecrackerConfig(binary=str(FC), jail=JailMode.OFF))
    ws, state = cfg.workspace, cfg.state_dir
    # The fake channel waits for this line on the console: the tiny guest prints its own.
    monkeypatch.setattr("tests.fakes.READY_LINE", GUEST_LINE.decode().strip())
    with inside_new_netns():
        add_upstream()
        before = (host_objects(ws, state), links())
        rt = Runtime(cfg, machinery=machinery)
        req = build(cfg, image="fcprobe", backend="firecracker", command=["true"], memory_mib=128,
                    ready_timeout_s=20)

        made = rt.start(req, steps=warm.template_steps(TemplateKind.IMAGE, "fcprobe"))
        assert made.wait(120)
        assert made.error is None, made.error
        assert made.end_reason == "template image-fcprobe saved"
        t = TemplateStore(cfg).find(TemplateKind.IMAGE, "fcprobe")
        assert t is not None and t.backend == "firecracker" and guest.checked == [made.id]
        assert {"rootfs.ext4", "snapshot.state", "snapshot.mem.full", "firecracker.json"} <= set(t.files)
        assert t.stale_reason(ImageStore(cfg).get("fcprobe")) is None
        assert made.receipt is not None and made.receipt.clean

        plan = planning.plan(cfg, req)
        assert plan.template is not None and plan.why.startswith("restoring from template image-fcprobe")
        for _ in range(2):  # the template is only read: it restores again
            events: list[str] = []
            live = rt.start(req, sink=lambda e, seen=events: seen.append(  # type: ignore[misc]
                f"{e.kind.value}:{e.message}"))
            assert live.wait(120)
            assert live.error is None, live.error
            assert live.warm and live.exit_status == 0
            assert "step:vmm.restore" in events and "step:vmm.start" not in events
            assert live.receipt is not None and live.receipt.clean
        # Restored paused, running once the identity step resumed it.
        assert guest.renewed == [("Paused", "Running")] * 2
        assert (host_objects(ws, state), links()) == before
        assert processes_mentioning(str(chroot_base)) == []


@pytest.mark.skipif(PAIR is None, reason=PAIR_WHY)
def test_a_firecracker_without_network_overrides_refuses_to_restore_in_one_line(
        chroot_base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The jailer pair here is v1.7.0, whose snapshot load cannot put a clone on its own tap: the template is
    made in its jail, the restore fails with one line that says why, and nothing is left."""
    assert PAIR is not None
    jailer, fc = PAIR
    cfg, machinery, _ = _world(chroot_base, FirecrackerConfig(binary=str(fc), jailer=str(jailer),
                                                             jailer_firecracker=str(fc), jail=JailMode.ON))
    monkeypatch.setattr("tests.fakes.READY_LINE", GUEST_LINE.decode().strip())
    with inside_new_netns():
        add_upstream()
        before = (host_objects(cfg.workspace, cfg.state_dir), links())
        rt = Runtime(cfg, machinery=machinery)
        req = build(cfg, image="fcprobe", backend="firecracker", command=["true"], memory_mib=128,
                    ready_timeout_s=20)
        made = rt.start(req, steps=warm.template_steps(TemplateKind.IMAGE, "fcprobe"))
        assert made.wait(120) and made.error is None, made.error
        live = rt.start(req)
        assert live.wait(120)
        assert live.error is not None and "cannot attach a restored guest to its own tap" in live.error.message
        assert "\n" not in live.error.one_line()
        assert (host_objects(cfg.workspace, cfg.state_dir), links()) == before
        assert processes_mentioning(str(chroot_base)) == []
