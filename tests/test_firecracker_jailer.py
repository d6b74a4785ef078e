"""The same lifecycle through the real jailer: chroot, uid drop, cgroup limits, all removed at the end."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from dispo.config import Config, FirecrackerConfig, JailMode
from dispo.infra import journal as journal_mod
from dispo.infra.txn import transaction
from dispo.names import new_session_id
from dispo.net import attach_network
from dispo.vmm import sandbox
from dispo.vmm.base import MachineSpec, NetAttachment
from dispo.vmm.cgroups import PARENT_CGROUP
from dispo.vmm.firecracker import backend
from dispo.vmm.firecracker.jailer import CGROUP_ROOT, JailSpec, cgroup_version
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm
from tests.fcworld import (
    GUEST_BYE,
    GUEST_LINE,
    Contract,
    add_upstream,
    inside_new_netns,
    jailer_pair_or_skip_reason,
    links,
    processes_mentioning,
    tiny_elf,
    wait_for,
)
from tests.worlds import make_config, make_ext4

PAIR, WHY = jailer_pair_or_skip_reason()
pytestmark = [pytest.mark.firecracker, pytest.mark.root, pytest.mark.vm,
              pytest.mark.skipif(PAIR is None, reason=WHY)]


def jail_cgroups(sid: str) -> list[Path]:
    if cgroup_version() == 2:
        return list((CGROUP_ROOT / PARENT_CGROUP).glob(f"*{sid}*"))
    return list(CGROUP_ROOT.glob(f"*/{PARENT_CGROUP}/*{sid}*"))


def jail_spec(base: Path, **kw: object) -> JailSpec:
    assert PAIR is not None
    jailer, fc = PAIR
    # No uid given: the jail gets one of the session's own (vmm/sandbox.py), not the shared `nobody`.
    return JailSpec(jailer=jailer, firecracker=fc, chroot_base=base, memory_limit_mib=256, cpu_quota=1.0,
                    **kw)  # type: ignore[arg-type]


def test_jailed_lifecycle(tmp_path: Path, chroot_base: Path) -> None:
    assert PAIR is not None
    cfg = make_config(tmp_path / "ws", tmp_path / "st")
    kernel, disk = tiny_elf(tmp_path / "vmlinux"), make_ext4(tmp_path / "disk.ext4", "16M")
    contract = Contract()
    with inside_new_netns(), transaction(cfg, purpose="jail test") as s:
        add_upstream()
        sid = s.session_id
        gn = attach_network(s)  # a root-owned tap: the backend hands it to the jail user
        spec = MachineSpec(sid, kernel, disk, s.state_path, cmdline=("console=ttyS0", *gn.kernel_args()),
                           memory_mib=32, nets=(NetAttachment(gn.tap, gn.mac),))
        opts = FirecrackerOptions(binary=PAIR[1], jail=jail_spec(chroot_base), on_request=contract.check,
                                  vsock_cid=3, shutdown_grace=3.0)
        vmm = FirecrackerVmm(spec, opts)
        vmm.start(s.journal)
        assert vmm.jail is not None and vmm.pid is not None
        assert wait_for(lambda: GUEST_LINE in spec.console_log.read_bytes()), vmm.console_tail()
        # Really jailed: another root, the jail user, our cgroups with the limits.
        # (pivot_root in its own mount namespace: its / is the jail root, with none of the host's files)
        seen = set(os.listdir(f"/proc/{vmm.pid}/root"))
        assert {"rootfs.ext4", "vmlinux", PAIR[1].name, "dev", "run"} <= seen and "etc" not in seen
        status = open(f"/proc/{vmm.pid}/status").read()  # noqa: SIM115
        uid = vmm.jail.ids[0]
        assert uid >= sandbox.UID_BASE and f"Uid:\t{uid}\t{uid}" in status and f"Gid:\t{uid}\t{uid}" in status
        groups = jail_cgroups(sid)
        assert groups, "the jail's cgroups exist"
        for g in groups:
            assert str(vmm.pid) in (g / "cgroup.procs").read_text().split()
        mem = next(g for g in groups if "memory" in str(g) or cgroup_version() == 2)
        limit = (mem / ("memory.max" if cgroup_version() == 2 else "memory.limit_in_bytes")).read_text().strip()
        assert int(limit) == 256 << 20
        assert (vmm.jail.root / "dev" / "kvm").exists() and (vmm.jail.root / "dev" / "net" / "tun").exists()
        assert os.stat(vmm.jail.root / "rootfs.ext4").st_ino == os.stat(disk).st_ino, "the session disk, linked"

        snap = vmm.snapshot(s.state_path / "snap")
        assert snap.state.exists() and snap.mem.stat().st_size == 32 << 20
        vmm.stop(timeout=4)
        assert processes_mentioning(f"dispo-{sid}") == []
        assert b"putGuestDriveByID" in vmm.log_path.read_bytes() or vmm.log_path.stat().st_size > 0, \
            "the jail's log is kept with the session"
        assert not vmm.jail.base_dir.exists() and jail_cgroups(sid) == []

        # Load into a fresh jailed process (the jail is rebuilt, the snapshot files placed inside).
        spec2 = dataclasses.replace(spec, workdir=s.state_path / "restored")
        vmm2 = FirecrackerVmm(spec2, opts)
        vmm2.restore(s.journal, snap)
        assert vmm2.api is not None and vmm2.api.describe_instance()["state"] == "Running"
        vmm2.stop(timeout=10)
        assert GUEST_BYE in spec2.console_log.read_bytes(), vmm2.console_tail()
        assert vmm2.jail is not None and not vmm2.jail.base_dir.exists()
    assert processes_mentioning(f"dispo-{sid}") == []
    assert jail_cgroups(sid) == []
    assert list(chroot_base.glob(f"*/*{sid}*")) == []
    assert not (cfg.state_dir / "sessions" / sid).exists()
    assert all(sid not in n for n in links())


def test_gc_removes_jail_and_cgroups_after_a_crash(tmp_path: Path, chroot_base: Path) -> None:
    """dispo dies (the journal is released without unwinding): gc kills the jailed VMM and removes the jail."""
    assert PAIR is not None
    cfg = make_config(tmp_path / "ws", tmp_path / "st")
    kernel, disk = tiny_elf(tmp_path / "vmlinux"), make_ext4(tmp_path / "disk.ext4", "16M")
    sid = new_session_id()  # random: another test may be using any fixed id right now
    j = journal_mod.Journal.create(cfg.state_dir, sid, {"purpose": "crash"})
    spec = MachineSpec(j.session_id, kernel, disk, j.path, memory_mib=32)
    vmm = FirecrackerVmm(spec, FirecrackerOptions(binary=PAIR[1], jail=jail_spec(chroot_base)))
    vmm.start(j)
    assert vmm.jail is not None and vmm.jail.base_dir.exists() and jail_cgroups(j.session_id)
    j.release()  # as if dispo was SIGKILLed: the flock goes, the journal stays
    report = journal_mod.gc(cfg.state_dir)
    assert report.reclaimed == [sid]
    assert processes_mentioning(f"dispo-{sid}") == []
    assert not vmm.jail.base_dir.exists() and jail_cgroups(sid) == []


def test_backend_jails_when_the_pair_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert PAIR is not None
    monkeypatch.setenv("DISPO_JAILER", str(PAIR[0]))
    monkeypatch.setenv("DISPO_JAILER_FIRECRACKER", str(PAIR[1]))
    cfg = make_config(tmp_path / "ws", tmp_path / "st")
    spec = MachineSpec("00000001", tmp_path / "k", tmp_path / "d", tmp_path)
    jailed = backend.create(cfg, spec)
    assert jailed.jail is not None and jailed.options.binary == PAIR[1]
    assert jailed.jail.spec.chroot_base == spec.rootfs.parent / "jail", "beside the disk, to hard-link it"
    assert jailed.jail.spec.memory_limit_mib == spec.memory_mib + backend.MEMORY_OVERHEAD_MIB
    off = dataclasses.replace(cfg, firecracker=FirecrackerConfig(jail=JailMode.OFF))
    assert backend.create(off, spec).jail is None


def test_jail_mode_on_without_a_matching_firecracker_is_an_error(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from dispo.errors import NotFound

    assert PAIR is not None
    monkeypatch.setenv("DISPO_JAILER", str(PAIR[0]))
    monkeypatch.delenv("DISPO_JAILER_FIRECRACKER", raising=False)
    fake = tmp_path / "firecracker"
    fake.write_text("#!/bin/sh\necho 'Firecracker v0.0.1'\n")
    fake.chmod(0o755)
    cfg: Config = dataclasses.replace(make_config(tmp_path / "ws", tmp_path / "st"),
                                      firecracker=FirecrackerConfig(binary=str(fake), jail=JailMode.ON))
    with pytest.raises(NotFound, match="jailer's version"):
        backend.create(cfg, MachineSpec("00000001", tmp_path / "k", tmp_path / "d", tmp_path))
    auto = dataclasses.replace(cfg, firecracker=FirecrackerConfig(binary=str(fake)))
    # auto: no jailer of its version, so dispo's own sandbox (never root; test_firecracker.py runs it).
    jail = backend.create(auto, MachineSpec("00000001", tmp_path / "k", tmp_path / "d", tmp_path)).jail
    assert jail is not None and jail.spec.own


def test_root_never_follows_a_link_the_jailed_process_planted(tmp_path: Path) -> None:
    """The chroot belongs to the jail user: links planted there (by a compromised firecracker) must never
    make root chown, write or read a file outside it."""
    from dispo.errors import VmmError
    from dispo.vmm.firecracker.jailer import Jail

    victim = tmp_path / "victim"
    victim.write_text("root's secret\n")
    os.chmod(victim, 0o600)
    spec = JailSpec(jailer=tmp_path / "jailer", firecracker=tmp_path / "firecracker", chroot_base=tmp_path / "jails",
                    uid=4321, gid=4321)
    jail = Jail(spec, "0badc0de")
    jail.root.mkdir(parents=True)
    # A planted log file: made fresh and handed over, the victim untouched.
    (jail.root / "firecracker.log").symlink_to(victim)
    made = jail.make_file(Path("/firecracker.log"))
    assert not made.is_symlink() and made.stat().st_uid == 4321
    # A planted link where a file is placed: replaced by the real content, owned by the jail user.
    kernel = tmp_path / "vmlinux"
    kernel.write_bytes(b"\x7fELF kernel")
    (jail.root / "vmlinux").symlink_to(victim)
    jail.place(kernel, "vmlinux", writable=False)
    assert (jail.root / "vmlinux").read_bytes() == b"\x7fELF kernel" and not (jail.root / "vmlinux").is_symlink()
    # A snapshot "written" as a link to the victim: refused, nothing of the victim leaves with it.
    (jail.root / "snapshot.state").symlink_to(victim)
    with pytest.raises((VmmError, OSError)):
        jail.take_out(Path("/snapshot.state"), tmp_path / "state")
    assert not (tmp_path / "state").exists()
    assert victim.read_text() == "root's secret\n" and victim.stat().st_uid == 0
