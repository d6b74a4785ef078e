"""`dispo template build|ls|rm`: templates for warm starts (runtime/warm.py, storage/templates.py)."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from dispo.cli.common import add_setting_option, print_table
from dispo.cli.run import Printer, exit_code, wait_until_ended
from dispo.config import Config
from dispo.errors import NotFound
from dispo.names import format_size
from dispo.runtime import Event, EventKind, Runtime, warm
from dispo.storage.images import ImageStore
from dispo.storage.templates import AUTOMATION, TemplateStore, split_name
from dispo.vmm.base import VmmKind
from dispo.vmm.registry import vmm_version


def register(sub: Any) -> None:
    p = sub.add_parser("template", help="templates for warm starts (a ready guest saved from memory)")
    tsub = p.add_subparsers(dest="template_command", metavar="ACTION", required=True)

    b = tsub.add_parser("build", help="boot NAME (a profile: up to its app on a blank page; an image: to a "
                                      "shell), then save it as a template; 'dispo run' restores from it, with "
                                      "the template's backend, memory and vCPUs")
    b.add_argument("name", metavar="NAME", help="a profile or an image")
    b.add_argument("--image", dest="kind", action="store_const", const="image", default="auto",
                   help="NAME is an image even if a profile has that name")
    b.add_argument("--automation", action="store_true",
                   help="an automation template: the profile's browser saved with its debugging port (on the "
                        "guest's loopback), for automation sessions only ('NAME+automation'; normal sessions "
                        "never restore from it)")
    for key in ("backend", "memory_mib", "vcpus"):  # every clone gets the template's
        add_setting_option(b, key, None)
    b.set_defaults(func=cmd_build)

    ls = tsub.add_parser("ls", help="list templates, and whether each is current")
    ls.set_defaults(func=cmd_ls)

    rm = tsub.add_parser("rm", help="remove templates")
    rm.add_argument("names", nargs="+", metavar="NAME")
    rm.set_defaults(func=cmd_rm)


class BuildPrinter(Printer):
    """`dispo run`'s lines, plus each step as it finishes: a build takes a while and says where it is."""

    def __call__(self, e: Event) -> None:
        if e.kind is EventKind.STEP:
            self._say(f"template: {e.fields.get('step')} done ({float(e.fields.get('seconds', 0)):.1f} s)")
        elif e.kind is EventKind.READY:
            self._say(f"template: guest {e.message}")
        else:
            super().__call__(e)


def cmd_build(args: argparse.Namespace, cfg: Config) -> int:
    req, kind = warm.build_request(cfg, args.name, kind=args.kind, backend=args.backend, memory_mib=args.memory,
                                   vcpus=args.vcpus, automation=args.automation)
    printer = BuildPrinter()
    what = "automation template" if req.automation else "template"
    printer.notice(f"building the {what} of {kind.value} {args.name!r} ({req.image}, {req.memory_mib} MiB, "
                   f"{req.vcpus} vCPU, {req.backend}); it boots once, then every session restores it")
    rt = Runtime(cfg, owner=f"dispo template build (pid {os.getpid()})")
    live = rt.start(req, steps=warm.template_steps(kind, args.name), sink=printer)
    wait_until_ended(live)
    rc = exit_code(live.exit_status, live.error)
    name, _ = split_name(args.name)
    t = TemplateStore(cfg).find(kind, name, automation=bool(req.automation))
    if t is not None:
        print(f"template {t.key}: {format_size(t.size)}, built in {t.build_s:.1f} s")
    return rc


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    images = ImageStore(cfg)
    rows = []
    for t in TemplateStore(cfg).list():
        try:
            image = images.get(t.image)
        except NotFound:
            image = None
        stale = t.stale_reason(image, vmm_version(cfg, VmmKind(t.backend)))
        built = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.created))
        name = t.name + (AUTOMATION if t.automation else "")  # as 'dispo template rm' and the pool take it
        rows.append((name, t.kind.value, t.image, t.backend, f"{t.memory_mib} MiB", format_size(t.size), built,
                     f"stale: {stale}" if stale else "current"))
    print_table(("NAME", "KIND", "IMAGE", "BACKEND", "MEMORY", "SIZE", "BUILT", "STATE"), rows)
    return 0


def cmd_rm(args: argparse.Namespace, cfg: Config) -> int:
    store = TemplateStore(cfg)
    for name in args.names:
        store.get(name)  # check all names before removing any
    for name in args.names:
        t = store.remove(name)
        print(f"removed template {t.key}")
    return 0
