"""Warm starts: make a template from a session, and restore sessions from templates instead of booting.

Both are edits of the one step list, `BOOT` (steps.py), for the same runtime, not a second path:

    restore:         BOOT with validate, disk, vmm.start and app swapped for their template versions,
                     volume and identity dropped, guest.identity inserted after vmm.restore
                     -> template.validate, template.disk, network, vmm.restore, guest.identity, guest.ready, app
    template build:  BOOT with volume dropped, vmm.start swapped for one with the agent's channel, app
                     swapped for template.save (a profile's: app.template, then template.save)
                     -> validate, disk, identity, network, vmm.start, guest.ready, [app.template,] template.save

`vmm.restore` loads the template's memory into a new VMM and leaves the guest paused; `guest.identity`
resumes it and has the in-guest agent give it a fresh identity (entropy and RNG reseed, clock, hostname,
SSH keys, its own address) before anything else talks to it. For a profile, the template holds the app
already running on its display on a blank page; the clone's app step hands it the session's URL.

An automation session (a browser driven over its debugging port) restores only from an *automation
template* (`dispo template build chromium --automation`): its browser was started with the debugging port on
the guest's loopback before the save, because a running browser cannot open one later. A normal template's
browser never has the port, so neither have its clones; an automation template serves automation sessions
only (its key ends in "+automation", storage/templates.py). The clone's channel to the port, the ssh forward
of <state>/automation.sock, is made at restore time, in the app step, with the display's (steps.web_display).

`template_for(cfg, request)` finds the template a request could restore from; which start a request gets
is decided in runtime/plan.py.
"""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from dispo.config import Config
from dispo.errors import InvalidInput, NotFound, VmmError
from dispo.infra.proc import run
from dispo.names import format_size
from dispo.profiles import DisplayMode
from dispo.runtime.app import DEFAULT_GEOMETRY
from dispo.runtime.events import EventKind
from dispo.runtime.request import SessionRequest, find_image
from dispo.runtime.steps import (
    BOOT,
    Bringup,
    Step,
    Steps,
    app,
    guest_ready,
    keep_agent,
    machine_spec,
    new_vmm,
    vmm_start,
    web_display,
)
from dispo.storage import disks, templates, workspace
from dispo.storage.images import ImageStore
from dispo.storage.layout import ROOTFS
from dispo.storage.templates import Template, TemplateKind, TemplateStore
from dispo.vmm.base import Capability, VmmKind
from dispo.vmm.registry import kernel_for, vmm_version

SETTLE_S = 120          # at most this long for a profile's app to finish starting before its template is saved


def template_for(cfg: Config, request: SessionRequest) -> tuple[Template | None, str]:
    """The template a request could restore from, or None and why not."""
    if request.keep:
        return None, f"it keeps the volume {request.keep!r}, which the guest mounts as it boots"
    store = TemplateStore(cfg)
    kind, name = ((TemplateKind.PROFILE, request.profile) if request.profile
                  else (TemplateKind.IMAGE, request.image))
    auto = bool(request.automation)
    build_hint = f"dispo template build {name}{' --automation' if auto else ''}"
    t = store.find(kind, name, automation=auto)
    if t is None:
        # An automation session's browser needs its debugging port from its start: a normal template's has none.
        what = ("automation template", " (a normal template's browser has no debugging port; ") if auto else (
            "template", " (")
        return None, f"no {what[0]} of {kind.value} {name!r}{what[1]}make one with '{build_hint}')"
    try:
        image = ImageStore(cfg).get(t.image)
    except NotFound:
        image = None
    if (stale := t.stale_reason(image, vmm_version(cfg, VmmKind(t.backend)))) is not None:
        return None, f"template {t.key} is stale: {stale} (rebuild it with '{build_hint}')"
    if t.image != request.image:
        return None, f"template {t.key} is of image {t.image!r}, the session asks for {request.image!r}"
    mismatch = [f"{what} {mine} (template: {theirs})" for what, mine, theirs in (
        ("memory_mib", request.memory_mib, t.memory_mib), ("vcpus", request.vcpus, t.vcpus),
        ("shm_mib", request.shm_mib, t.shm_mib), ("display", request.display.value, t.display)) if mine != theirs]
    if request.cmdline() != t.guest_args:
        mismatch.append(f"guest settings {' '.join(request.cmdline()) or '-'} (template: "
                        f"{' '.join(t.guest_args) or '-'})")
    if request.backend not in ("auto", t.backend):
        mismatch.append(f"backend {request.backend} (template: {t.backend})")
    if request.automation != t.automation:  # the key says it already; the record must agree
        mismatch.append(f"automation {request.automation or '-'} (template: {t.automation or '-'})")
    if mismatch:
        return None, f"template {t.key} does not fit: {', '.join(mismatch)}"
    return t, ""


# -- restore ----------------------------------------------------------------------------------------
def restore_steps(t: Template) -> Steps:
    """BOOT, restoring from `t`: the disk is the template's, the memory too; the guest's identity is renewed
    by its agent after the restore instead of written into the disk before the boot; a --keep volume is
    never restored (template_for sends such a request to BOOT)."""
    return (BOOT.swap("validate", Step("template.validate", partial(validate_template, t)))
            .swap("disk", Step("template.disk", disk_from_template))
            .drop("volume")
            .drop("identity")
            .swap("vmm.start", Step("vmm.restore", vmm_restore))
            .insert_after("vmm.restore", Step("guest.identity", guest_identity))
            .swap("app", Step("app", app_restored)))


def validate_template(t: Template, b: Bringup) -> None:
    image = find_image(b.cfg, t.image)
    if (stale := t.stale_reason(image, vmm_version(b.cfg, VmmKind(t.backend)))) is not None:
        flag = " --automation" if t.automation else ""
        raise InvalidInput(f"template {t.key} is stale: {stale}",
                           hint=f"rebuild it with 'dispo template build {t.name}{flag}', or start with --cold")
    b.image, b.kind, b.template = image, VmmKind(t.backend), t
    b.kernel = kernel_for(image, b.kind)
    if b.kernel is None or not b.kernel.is_file():
        raise NotFound(f"image {image.name!r} has no kernel file for {t.backend}", hint="rebuild the image")


def disk_from_template(b: Bringup) -> None:
    assert b.template is not None
    b.disk_dir = disks.clone_template(b.tx, b.template)


def vmm_restore(b: Bringup) -> None:
    """A new VMM with the template's machine, its memory loaded, the guest paused (`vmm.start` swapped)."""
    assert b.template is not None
    vmm = new_vmm(b, machine_spec(b, agent=True))
    if Capability.SNAPSHOT not in vmm.capabilities:
        raise VmmError(f"the {vmm.kind.value} backend cannot restore templates", hint="start with --cold")
    vmm.load_state(b.tx.journal, b.template.path)
    b.vmm = vmm


def guest_identity(b: Bringup) -> None:
    assert b.vmm is not None and b.net is not None
    b.identity, link = b.machinery.renew_identity(b.tx, b.vmm, b.net, b.request.ready_timeout_s, b.alive)
    keep_agent(b, link)  # the agent answered after applying the identity: the guest is ready for a command


def app_restored(b: Bringup) -> None:
    """The clone's app: its running browser handed the session's URL, and, for an automation session (from
    an automation template), the forward to its debugging port made now, with the display's."""
    if b.request.display is DisplayMode.WEB:
        web_display(b, attach=True)
    else:
        app(b)


# -- template build ---------------------------------------------------------------------------------
def template_steps(kind: TemplateKind, name: str) -> Steps:
    """BOOT, saved as template NAME once ready: with the agent's channel (its clones need it), no volume
    (a template is of an image or a profile, never of a kept volume), and for a profile its app started on
    its display before the save (with its debugging port when the request is an automation one: an
    automation template, build_request(automation=True))."""
    name, _ = templates.split_name(name)  # an automation template is the request's to say (build_request)
    save = Step("template.save", partial(save_template, kind, name))
    steps = (BOOT.drop("volume").swap("vmm.start", Step("vmm.start", partial(vmm_start, agent=True, template=True)))
             # Ready over SSH: the clones must find sshd running, to re-execute it on their new host key.
             .swap("guest.ready", Step("guest.ready", partial(guest_ready, ssh_too=True))))
    if kind is TemplateKind.PROFILE:
        return steps.swap("app", Step("app.template", app_template)).insert_after("app.template", save)
    return steps.swap("app", save)


def app_template(b: Bringup) -> None:
    """The profile's app on its display, on its start page, detached from SSH (it must outlive this
    connection and the template's host), then wait until the guest is idle: the app finished starting."""
    assert b.channel is not None
    b.cancel.check()
    argv = b.channel.display_detached(b.request.command, geometry=DEFAULT_GEOMETRY, settle_s=SETTLE_S)
    proc = run(argv, check=False, timeout=SETTLE_S + 60)
    if proc.returncode != 0:
        tail = " ".join((proc.stderr or proc.stdout or "").split())[-300:]
        raise VmmError(f"template: the app did not start on its display (status {proc.returncode}): {tail}",
                       hint="check the profile's command with a cold 'dispo run' first")
    b.emit(EventKind.NOTICE, f"{b.request.profile or 'the app'} runs on its display; saving the template")


def save_template(kind: TemplateKind, name: str, b: Bringup) -> None:
    """Pause the ready guest, save its memory and device state and its disk, seal, record, put in place."""
    assert b.vmm is not None and b.disk_dir is not None and b.image is not None and b.net is not None
    vmm = b.vmm
    if Capability.SNAPSHOT not in vmm.capabilities:
        raise VmmError(f"the {vmm.kind.value} backend cannot save templates")
    # Its clones need the agent: check it answers now rather than fail every restore later.
    try:
        b.machinery.agent_check(vmm, 60.0, b.alive)
    except VmmError as e:
        raise vmm.failure(e.message) from None  # with the console, where the agent says what it found
    t0 = time.monotonic()
    build = templates.begin(b.tx, kind, name, workspace.storage_backend(b.cfg), b.request.automation)
    vmm.save_state(build.tmp)               # the vCPUs stop here and stay stopped
    templates.put_disk(build, b.disk_dir / ROOTFS)
    saved = time.monotonic() - t0
    r = b.request
    t = templates.finish(b.tx, build, b.image, backend=vmm.kind.value, vmm_version=vmm_version(b.cfg, vmm.kind),
                         memory_mib=r.memory_mib, vcpus=r.vcpus,
                         shm_mib=r.shm_mib, display=r.display.value, mac=b.net.mac, profile=r.profile,
                         guest_args=list(r.cmdline()),
                         build_s=round(time.monotonic() - b.t0, 3), save_s=round(saved, 3))
    b.finished = f"template {t.key} saved"
    b.emit(EventKind.NOTICE, f"template {t.key}: {format_size(t.size)} ({', '.join(sorted(t.files))}), saved in "
                             f"{saved:.1f} s", template=t.key, size=t.size, save_s=round(saved, 3))


def build_request(cfg: Config, name: str, *, kind: str = "auto", backend: str | None = None,
                  automation: bool = False, **numbers: Any) -> tuple[SessionRequest, TemplateKind]:
    """The session that makes template NAME: a profile's (its app on a blank page) or an image's (a shell).
    `automation` (or NAME ending in "+automation"): an automation template, its browser started with its
    debugging port (on the guest's loopback; its clones are automation sessions' only)."""
    from dispo import profiles
    from dispo.runtime.request import build

    name, suffixed = templates.split_name(name)
    automation = automation or suffixed
    if automation and kind == "image":
        raise InvalidInput(f"dispo template build: an automation template is of a profile, {name!r} is an image",
                           hint="dispo template build chromium --automation")

    chosen: TemplateKind | None = None
    if kind in ("auto", "profile"):
        try:
            profiles.find(name, cfg.profiles_dir)
            chosen = TemplateKind.PROFILE
        except NotFound:
            if kind == "profile":
                raise
    if chosen is None:
        chosen = TemplateKind.IMAGE
    if chosen is TemplateKind.PROFILE:
        req = build(cfg, profile=name, backend=backend, where="dispo template build: ", automation=automation,
                    **numbers)
    else:
        if automation:
            raise InvalidInput(f"dispo template build: an automation template is of a profile, {name!r} is an "
                               f"image", hint="dispo template build chromium --automation")
        # No app: the template is the booted guest; its clones run each session's own command.
        req = build(cfg, image=name, command=("true",), backend=backend, where="dispo template build: ", **numbers)
    if req.display is DisplayMode.X11:
        raise InvalidInput(f"profile {name!r} shows its app over X11 forwarding, which cannot be saved in a template",
                           hint="templates are for display = \"web\" profiles and images")
    return req, chosen


__all__ = ["build_request", "restore_steps", "template_for", "template_steps"]
