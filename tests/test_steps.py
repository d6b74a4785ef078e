"""The step lists: `BOOT` is the one list; a restore, a template build and a guest held in the warm pool are
edits of it (swap, drop, insert_after). Pins what each edit changes. Pure data: no root, no VM."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dispo.config import StorageBackend
from dispo.runtime import STEPS, warm
from dispo.runtime.pool import HOLD, pool_steps
from dispo.runtime.record import with_recording
from dispo.runtime.steps import BOOT, Step, Steps
from dispo.storage.templates import Template, TemplateKind

SRC = Path(__file__).resolve().parents[1] / "src" / "dispo"


def _template() -> Template:
    return Template(name="minimal", kind=TemplateKind.IMAGE, path=Path("/nonexistent"), image="minimal",
                    image_sha256="0" * 64, image_created=0.0, backend="qemu", memory_mib=512, vcpus=1, shm_mib=0,
                    display="none", mac="02:00:00:00:00:01", created=0.0, agent="x",
                    storage=StorageBackend.COPY)


def _same(a: Steps, b: Steps) -> list[str]:
    """The steps of `a` that are `b`'s own (the very same step, not one of the same name)."""
    return [s.name for s in a if s.name in b.names and b[s.name] is s]


def test_boot_is_the_one_list_and_steps_its_old_name() -> None:
    assert STEPS is BOOT
    assert BOOT.names == ("validate", "disk", "volume", "identity", "network", "vmm.start", "guest.ready", "app")


def test_the_edits_make_new_lists_and_refuse_what_is_not_there() -> None:
    extra = Step("extra", lambda b: None)
    assert BOOT.insert_after("disk", extra).names[:3] == ("validate", "disk", "extra")
    assert BOOT.drop("volume").names == tuple(n for n in BOOT.names if n != "volume")
    swapped = BOOT.swap("app", extra)
    assert swapped.names[-1] == "extra" and swapped["extra"] is extra and len(swapped) == len(BOOT)
    assert "extra" not in BOOT.names and BOOT["app"].name == "app"  # the original is a value: unchanged
    with pytest.raises(ValueError, match="no step 'nope'"):
        BOOT.drop("nope")
    with pytest.raises(ValueError, match="no step 'nope'"):
        BOOT.insert_after("nope", extra)
    with pytest.raises(ValueError, match="appear twice"):
        BOOT.insert_after("disk", Step("network", lambda b: None))


def test_restore_is_boot_with_four_steps_swapped_two_dropped_and_identity_after_the_restore() -> None:
    restore = warm.restore_steps(_template())
    assert restore.names == ("template.validate", "template.disk", "network", "vmm.restore", "guest.identity",
                             "guest.ready", "app")
    # Unchanged: the network and the wait for the guest, BOOT's very steps.
    assert _same(restore, BOOT) == ["network", "guest.ready"]
    # Swapped in place: validate, disk, vmm.start and app (the app attaches to the one already running).
    assert restore["app"] is not BOOT["app"]
    # Dropped: a --keep volume (mounted at boot) and the identity written into the disk before a boot; the
    # agent gives the identity after the restore instead.
    assert {"volume", "identity", "validate", "disk", "vmm.start"}.isdisjoint(restore.names)
    assert restore.names.index("guest.identity") == restore.names.index("vmm.restore") + 1


def test_a_template_build_is_boot_with_the_agent_and_a_save_instead_of_the_app() -> None:
    image = warm.template_steps(TemplateKind.IMAGE, "minimal")
    assert image.names == ("validate", "disk", "identity", "network", "vmm.start", "guest.ready", "template.save")
    assert _same(image, BOOT) == ["validate", "disk", "identity", "network"]
    assert image["vmm.start"] is not BOOT["vmm.start"]  # the same start, with the agent's channel
    assert image["guest.ready"] is not BOOT["guest.ready"]  # ready over SSH too: its clones restart sshd
    profile = warm.template_steps(TemplateKind.PROFILE, "chromium")
    assert profile.names == (*image.names[:-1], "app.template", "template.save")


def test_a_pool_guest_is_the_restore_held_after_guest_ready() -> None:
    t = _template()
    restore, held = warm.restore_steps(t), pool_steps(t)
    # The recorder after the app: the claiming request decides whether it records (runtime/record.py).
    assert held.names == (*restore.names[:-1], "pool.hold", "app", "record")
    assert held["pool.hold"] is HOLD
    assert with_recording(restore).names == (*restore.names, "record")
    assert with_recording(held) == held and with_recording(warm.template_steps(TemplateKind.IMAGE, "x")).names == \
        warm.template_steps(TemplateKind.IMAGE, "x").names
    assert _same(held, BOOT) == ["network", "guest.ready"]


def test_no_other_step_list_is_written_out_in_the_code() -> None:
    lists = [(p.relative_to(SRC), m.group(0)) for p in SRC.rglob("*.py")
             for m in re.finditer(r"\bSteps\(\(", p.read_text())]
    assert lists == [(Path("runtime/steps.py"), "Steps((")], lists
    tuples = [p.relative_to(SRC) for p in SRC.rglob("*.py")
              if "tuple[Step," in p.read_text() and p.name != "steps.py"]  # steps.py: the Steps value itself
    assert tuples == [], tuples
