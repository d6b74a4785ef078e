"""The Firecracker backend against the real binary: the whole lifecycle with a tiny ELF guest.

Each test builds its world: a network namespace it enters (the taps and the VMM live there), a state
dir, an ext4 session disk, the guest. Every request the backend sends is checked against the OpenAPI
spec on the way out. "Nothing left behind" is proven by listing processes, files, taps and journals
before and after.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from dispo.config import Config
from dispo.errors import ApiError, DispoError, InvalidInput, NotFound, PermissionProblem, VmmError
from dispo.infra import journal as journal_mod
from dispo.infra.processes import GATE_EOF_EXIT
from dispo.infra.txn import Transaction, transaction
from dispo.net import attach_network
from dispo.vmm.base import MachineSpec, NetAttachment
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm, Snapshot
from tests.fcworld import (
    GUEST_BYE,
    GUEST_LINE,
    Contract,
    GuestMode,
    add_upstream,
    firecracker_or_skip_reason,
    inside_new_netns,
    links,
    make_tap,
    processes_mentioning,
    tiny_elf,
    wait_for,
)
from tests.tiers import tier
from tests.worlds import make_config, make_ext4

FC, WHY = firecracker_or_skip_reason()
pytestmark = [pytest.mark.firecracker, pytest.mark.root, pytest.mark.vm,
              pytest.mark.skipif(FC is None, reason=WHY)]
CONTRACT = Contract()


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path / "ws", tmp_path / "st")


@pytest.fixture
@tier("root")
def netns() -> Iterator[str]:
    with inside_new_netns() as name:
        add_upstream()
        yield name


def options(**kw: object) -> FirecrackerOptions:
    assert FC is not None
    base: dict[str, object] = {"binary": FC, "on_request": CONTRACT.check, "shutdown_grace": 3.0}
    base.update(kw)
    return FirecrackerOptions(**base)  # type: ignore[arg-type]


def machine(s: Transaction, tmp: Path, *, mode: GuestMode = GuestMode.CTRL_ALT_DEL, taps: tuple[str, ...] = (),
            workdir: Path | None = None) -> MachineSpec:
    kernel = tmp / f"vmlinux-{mode.value}"
    if not kernel.exists():
        tiny_elf(kernel, mode=mode)
    disk = tmp / "disk.ext4"
    if not disk.exists():
        make_ext4(disk, "16M")
    nets = tuple(NetAttachment(t, f"06:00:ac:14:00:{i + 6:02x}") for i, t in enumerate(taps))
    return MachineSpec(session_id=s.session_id, kernel=kernel, rootfs=disk, workdir=workdir or s.state_path,
                       cmdline=("console=ttyS0", "reboot=k", "panic=1"), memory_mib=32, nets=nets)


def console_has(vmm: FirecrackerVmm, text: bytes, timeout: float = 5.0) -> bool:
    return wait_for(lambda: text in vmm.spec.console_log.read_bytes(), timeout)


def leftovers(cfg: Config, sid: str) -> dict[str, object]:
    return {
        "processes": processes_mentioning(f"dispo-{sid}"),
        "journals": sorted(p.name for p in (cfg.state_dir / "sessions").glob("*")) if cfg.state_dir.exists() else [],
        "taps": sorted(n for n in links() if sid in n),
    }


def test_lifecycle_boot_pause_snapshot_load_stop(cfg: Config, netns: str, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        gn = attach_network(s)  # the session's own tap (and lease, and nftables rules), journaled
        tap, tap2 = gn.tap, make_tap(f"dsq-{sid}")
        assert tap == f"dsp-{sid}" and tap in links()
        spec = dataclasses.replace(machine(s, tmp_path), nets=(NetAttachment(gn.tap, gn.mac),),
                                   cmdline=machine(s, tmp_path).cmdline + gn.kernel_args())
        vmm = FirecrackerVmm(spec, options(vsock_cid=3, entropy=True))
        vmm.start(s.journal)
        assert vmm.pid is not None and processes_mentioning(f"dispo-{sid}") == [vmm.pid]
        kinds = [e.kind for e in s.journal.entries]
        assert "process" in kinds, "the VMM process is journaled"
        assert console_has(vmm, GUEST_LINE), vmm.console_tail()
        assert vmm.api is not None
        assert vmm.api.describe_instance()["state"] == "Running"
        assert vmm.vsock_path.is_socket() and vmm.socket.is_socket()
        vm = vmm.api.get_vm_config()  # what firecracker itself says it was configured with
        assert [d["drive_id"] for d in vm["drives"]] == ["rootfs"]
        assert [(n["host_dev_name"], n["guest_mac"]) for n in vm["network-interfaces"]] == [(gn.tap, gn.mac)]
        assert vm["vsock"]["guest_cid"] == 3 and vm["entropy"] is not None
        assert vmm.api.get_machine_config()["mem_size_mib"] == 32
        vmm.api.flush_metrics()
        assert vmm.metrics_path.stat().st_size > 0

        snap = vmm.snapshot(s.state_path / "snap")
        assert vmm.api.describe_instance()["state"] == "Paused"
        assert snap.state.stat().st_size > 0 and snap.mem.stat().st_size == 32 << 20
        vmm.stop(timeout=4)  # paused: SendCtrlAltDel cannot be served, SIGTERM ends it
        assert vmm.wait_exit(0) is not None
        assert processes_mentioning(f"dispo-{sid}") == []
        assert not vmm.socket.exists() and not vmm.vsock_path.exists(), "SIGTERM leaves the socket: stop removes it"

        # A fresh process on the snapshot, with another tap (network override) and a new vsock path.
        spec2 = machine(s, tmp_path, taps=(tap2,), workdir=s.state_path / "restored")
        vmm2 = FirecrackerVmm(spec2, options(vsock_cid=3))
        vmm2.restore(s.journal, snap, resume=True)
        assert vmm2.api is not None and vmm2.api.describe_instance()["state"] == "Running"
        assert vmm2.pid != vmm.pid
        # Graceful stop: the restored guest is still polling the i8042, sees Ctrl-Alt-Del, says so, resets.
        vmm2.stop(timeout=10)
        # The guest handled Ctrl-Alt-Del (it says so on its console): no signal was needed.
        assert GUEST_BYE in spec2.console_log.read_bytes(), vmm2.console_tail()
        assert GUEST_LINE not in spec2.console_log.read_bytes(), "the restored guest did not boot again"
        assert processes_mentioning(f"dispo-{sid}") == []
        assert [e.kind for e in s.journal.entries if e.kind == "process"] == []
    # The session's tap went with the session; only the test's own second tap (in its netns) is left.
    assert leftovers(cfg, sid) == {"processes": [], "journals": [], "taps": [tap2]}


def test_stop_escalates_to_sigterm_for_a_guest_that_ignores_ctrl_alt_del(cfg: Config, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path, mode=GuestMode.HALT), options(shutdown_grace=0.5))
        vmm.start(s.journal)
        assert console_has(vmm, GUEST_LINE)
        vmm.stop(timeout=4)
        # It ignored the key press (no goodbye on its console) and is gone all the same: signals did it.
        assert GUEST_BYE not in vmm.spec.console_log.read_bytes()
        assert processes_mentioning(f"dispo-{s.session_id}") == []
        assert not vmm.socket.exists()


def test_guest_that_resets_ends_the_vmm_and_wait_exit_sees_it(cfg: Config, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path, mode=GuestMode.RESET), options())
        vmm.start(s.journal)
        assert vmm.wait_exit(5) is not None
        vmm.stop()
        assert not vmm.socket.exists()
    assert leftovers(cfg, s.session_id)["journals"] == []


def test_diff_snapshot_with_dirty_page_tracking(cfg: Config, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path), options(track_dirty_pages=True))
        vmm.start(s.journal)
        assert console_has(vmm, GUEST_LINE)
        from dispo.vmm.firecracker.api import SnapshotType

        full = vmm.snapshot(s.state_path / "snap", kind=SnapshotType.FULL)
        vmm.resume()
        diff = vmm.snapshot(s.state_path / "snap", kind=SnapshotType.DIFF)
        assert full.mem != diff.mem
        # A diff memory file holds only dirtied pages: sparse, far smaller on disk than the full one.
        assert diff.mem.stat().st_blocks < full.mem.stat().st_blocks
        vmm.stop(timeout=2)


# -- failure paths: a one-line error and nothing left behind ----------------------------------------
def _assert_clean_failure(cfg: Config, err: DispoError, sid: str) -> None:
    assert "\n" not in err.one_line()
    assert processes_mentioning(f"dispo-{sid}") == []


def test_missing_binary(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(NotFound) as e, transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        FirecrackerVmm(machine(s, tmp_path), options(binary=tmp_path / "no-firecracker")).start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)
    assert "dispo firecracker install" in e.value.one_line()
    assert leftovers(cfg, sid)["journals"] == []


def test_kernel_not_elf(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as e, transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        spec = machine(s, tmp_path)
        bz = tmp_path / "bzImage"
        bz.write_bytes(b"MZ" + bytes(4096))
        FirecrackerVmm(MachineSpec(sid, bz, spec.rootfs, spec.workdir), options()).start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)
    assert "not an ELF vmlinux" in e.value.one_line()


@pytest.mark.parametrize("fault", ["cmdline", "tap"])
def test_api_fault_on_a_call_stops_the_process(cfg: Config, tmp_path: Path, fault: str) -> None:
    """Spec-valid requests the server refuses: a kernel command line over the limit, a tap name too long."""
    with pytest.raises(ApiError) as e, transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        spec = machine(s, tmp_path)
        if fault == "cmdline":
            spec = dataclasses.replace(spec, cmdline=("x" * 5000,))
        else:
            nic = NetAttachment("dsp-much-too-long-for-ifnamsiz", "06:00:00:00:00:01")
            spec = dataclasses.replace(spec, nets=(nic,))
        vmm = FirecrackerVmm(spec, options())
        vmm.start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)
    assert e.value.operation == {"cmdline": "putGuestBootSource", "tap": "putGuestNetworkInterfaceByID"}[fault]
    assert not vmm.running() and not vmm.socket.exists()
    assert leftovers(cfg, sid)["journals"] == []
    assert not (cfg.state_dir / "sessions" / sid).exists()


def test_missing_disk_is_caught_before_anything_starts(cfg: Config, tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="disk file") as e, transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        spec = dataclasses.replace(machine(s, tmp_path), rootfs=tmp_path / "no-such-disk.ext4")
        vmm = FirecrackerVmm(spec, options())
        vmm.start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)
    assert vmm.pid is None


def test_api_fault_after_boot_names_the_call(cfg: Config, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path), options())
        vmm.start(s.journal)
        assert vmm.api is not None
        with pytest.raises(ApiError, match="createSnapshot"):
            vmm.api.snapshot_create(s.state_path / "s", s.state_path / "m")  # not paused: refused
        with pytest.raises(ApiError, match="putGuestBootSource"):
            vmm.api.put_boot_source(vmm.spec.kernel)  # pre-boot only
        vmm.stop(timeout=3)


def test_no_kvm_access(cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, m, **kw: False if str(p) == "/dev/kvm" else real_access(p, m))
    with pytest.raises(PermissionProblem) as e, transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        FirecrackerVmm(machine(s, tmp_path), options()).start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)
    assert "/dev/kvm" in e.value.one_line()


def test_stale_socket_is_removed_before_start(cfg: Config, tmp_path: Path) -> None:
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path), options())
        vmm.socket.parent.mkdir(parents=True, exist_ok=True)
        vmm.socket.write_text("left by a SIGTERMed firecracker")
        vmm.start(s.journal)
        assert console_has(vmm, GUEST_LINE)
        vmm.stop(timeout=3)


def test_firecracker_exiting_early_is_reported_with_its_log(cfg: Config, tmp_path: Path) -> None:
    # A socket path inside a missing directory: firecracker exits 1 before the socket appears.
    with pytest.raises(VmmError, match="exited with code") as e, transaction(cfg, purpose="fc test") as s:
        sid = s.session_id
        vmm = FirecrackerVmm(machine(s, tmp_path), options())
        vmm.socket = s.state_path / "missing-dir" / "fc.sock"
        vmm.start(s.journal)
    _assert_clean_failure(cfg, e.value, sid)


def test_gc_after_sigkill_of_dispo_cleans_the_vmm(cfg: Config, tmp_path: Path) -> None:
    """A child 'dispo' starts a VMM and is SIGKILLed; `gc` finds the journal and removes everything."""
    assert FC is not None
    script = f"""
import sys, time
from pathlib import Path
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from tests.fcworld import tiny_elf
from tests.worlds import make_config
from dispo.infra.txn import transaction
from dispo.vmm.base import MachineSpec
from dispo.vmm.firecracker.process import FirecrackerOptions, FirecrackerVmm
cfg = make_config(Path({str(cfg.workspace)!r}), Path({str(cfg.state_dir)!r}))
with transaction(cfg, purpose="victim") as s:
    k = tiny_elf(Path({str(tmp_path)!r}) / "k")
    d = Path({str(tmp_path)!r}) / "d"; d.write_bytes(b"\\0" * 4096)
    vmm = FirecrackerVmm(MachineSpec(s.session_id, k, d, s.state_path), FirecrackerOptions(binary=Path({str(FC)!r})))
    vmm.start(s.journal)
    print(s.session_id, vmm.pid, vmm.socket, flush=True)
    time.sleep(60)
"""
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        sid, pid, sock = child.stdout.readline().split()
        assert processes_mentioning(f"dispo-{sid}") == [int(pid)] and Path(sock).exists()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # The VMM dies with its dispo (parent-death signal); its socket and journal wait for gc.
    assert wait_for(lambda: processes_mentioning(f"dispo-{sid}") == [], 5)
    assert Path(sock).exists()
    report = journal_mod.gc(cfg.state_dir)
    assert report.reclaimed == [sid]
    assert not Path(sock).exists()
    assert leftovers(cfg, sid)["journals"] == []


def test_snapshot_from_another_process_restores_in_a_new_session(cfg: Config, tmp_path: Path) -> None:
    """The warm-start building block: a snapshot taken in one session, loaded by another."""
    with transaction(cfg, purpose="firecracker test") as s:
        vmm = FirecrackerVmm(machine(s, tmp_path), options())
        vmm.start(s.journal)
        assert console_has(vmm, GUEST_LINE)
        taken = vmm.snapshot(tmp_path / "kept")
        vmm.stop(timeout=3)
    snap = Snapshot(taken.state, taken.mem, taken.kind, (), None)
    with transaction(cfg, purpose="firecracker test") as s2:
        vmm2 = FirecrackerVmm(machine(s2, tmp_path, workdir=s2.state_path), options())
        vmm2.restore(s2.journal, snap)
        assert vmm2.api is not None and vmm2.api.describe_instance()["state"] == "Running"
        vmm2.stop(timeout=5)
        assert GUEST_BYE in vmm2.spec.console_log.read_bytes()


def test_the_process_is_journaled_before_firecracker_runs(cfg: Config, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """If recording the process fails, the gated child never becomes firecracker and nothing is left."""
    with transaction(cfg, purpose="firecracker test") as s:
        real_record, real_record_all = s.journal.record, s.journal.record_all

        def failing(kind: str, **args: str) -> object:
            if kind == "process":
                raise DispoError("journal is full")
            return real_record(kind, **args)

        def failing_all(items: list[tuple[str, dict[str, str]]]) -> object:  # the process with its files
            if any(kind == "process" for kind, _ in items):
                raise DispoError("journal is full")
            return real_record_all(items)

        vmm = FirecrackerVmm(machine(s, tmp_path), options())
        monkeypatch.setattr(s.journal, "record", failing)
        monkeypatch.setattr(s.journal, "record_all", failing_all)
        with pytest.raises(DispoError, match="journal is full"):
            vmm.start(s.journal)
        monkeypatch.undo()
        assert vmm.pid is not None and wait_for(lambda: vmm.wait_exit(0) is not None, 3)
        assert vmm.wait_exit(0) == GATE_EOF_EXIT, "the gate saw EOF and exited without exec"
        console = vmm.spec.console_log
        assert not console.exists() or b"Firecracker" not in console.read_bytes(), "firecracker never ran"
        assert processes_mentioning(f"dispo-{s.session_id}") == []


def test_firecracker_vmm_implements_the_vmm_interface(cfg: Config, tmp_path: Path) -> None:
    from dispo.vmm.base import Vmm, VmmKind

    with transaction(cfg, purpose="firecracker test") as s:
        vmm: Vmm = FirecrackerVmm(machine(s, tmp_path), options())  # mypy checks the protocol here
        assert vmm.kind is VmmKind.FIRECRACKER and vmm.pid is None
        vmm.start(s.journal)
        assert console_has(vmm, GUEST_LINE)  # type: ignore[arg-type]
        assert GUEST_LINE.decode().strip() in vmm.console_tail(5)
        vmm.kill()
        assert vmm.wait_exit(1) is not None
        vmm.stop()  # idempotent: nothing left to stop, nothing raised
        assert processes_mentioning(f"dispo-{s.session_id}") == []
        assert [e.kind for e in s.journal.entries if e.kind == "process"] == []


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: v.strip() for k, _, v in (line.partition(":") for line in lines)}


def test_without_a_jailer_firecracker_runs_in_dispos_own_sandbox(cfg: Config, netns: str, tmp_path: Path) -> None:
    """No jailer of its version: firecracker gets QEMU's sandbox (its own uid/gid, no capabilities, no new
    privileges, a mount namespace of its own with a private /dev, cgroups of its own), and the guest runs."""
    from dispo.vmm.firecracker.jailer import JailSpec

    assert FC is not None
    with transaction(cfg, purpose="firecracker test") as s:
        sid = s.session_id
        spec = machine(s, tmp_path, taps=(make_tap(f"dsq-{sid}"),))
        jail = JailSpec(jailer=tmp_path / "no-jailer", firecracker=FC, chroot_base=tmp_path / "jail",
                        memory_limit_mib=spec.memory_mib + 256, cpu_quota=1.0, own=True)
        vmm = FirecrackerVmm(spec, options(jail=jail, vsock_cid=3))
        vmm.start(s.journal)  # the jail's path is longer than a socket address: dispo connects through an fd
        assert vmm.pid is not None and vmm.jail is not None and len(str(vmm.jail.socket)) > 108
        assert console_has(vmm, GUEST_LINE), vmm.console_tail()
        uid = vmm.jail.ids[0]
        st = _status(vmm.pid)
        assert st["Uid"].split() == [str(uid)] * 4 and st["Gid"].split() == [str(uid)] * 4
        assert uid >= 1 << 30 and st["Groups"] == ""
        assert int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0 and int(st["CapPrm"], 16) == 0
        assert st["NoNewPrivs"] == "1"
        assert os.readlink(f"/proc/{vmm.pid}/ns/mnt") != os.readlink("/proc/self/ns/mnt")
        assert f"/dispo/dispo-{sid}" in Path(f"/proc/{vmm.pid}/cgroup").read_text()
        assert vmm.jail.cgroups and all(str(vmm.pid) in (d / "cgroup.procs").read_text().split()
                                        for d in vmm.jail.cgroups)
        # What it sees of the host: its own /dev, none of the host's data directories.
        root = Path(f"/proc/{vmm.pid}/root")
        assert sorted(p.name for p in (root / "dev").iterdir()) == ["kvm", "net", "null", "urandom"]
        assert (root / "dev/kvm").stat().st_uid == uid
        assert list((root / "tmp").iterdir()) == []
        assert vmm.api is not None  # it opened its tap (owned by its uid) by name, without CAP_NET_ADMIN
        assert vmm.api.get_vm_config()["network-interfaces"][0]["host_dev_name"] == f"dsq-{sid}"
        snap = vmm.snapshot(s.state_path / "snap")  # written where it may write, taken out by dispo
        assert snap.mem.stat().st_size == 32 << 20 and snap.mem.stat().st_uid == 0
        vmm.stop(timeout=4)
        assert processes_mentioning(f"dispo-{sid}") == []
        assert not vmm.jail.base_dir.exists() and not any(d.exists() for d in vmm.jail.cgroups)
    assert leftovers(cfg, sid)["journals"] == []
