"""`dispo image ...`"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from dispo.cli.common import print_table
from dispo.config import Config
from dispo.infra.progress import Progress
from dispo.names import format_size, parse_size
from dispo.storage.images import ImageStore


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="manage known-good images")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    imp = isub.add_parser("import", help="import a raw ext4 root filesystem as a read-only image")
    imp.add_argument("path", type=Path)
    imp.add_argument("--name", required=True)
    imp.add_argument("--size", help="grow the filesystem to this size (e.g. 6G)")
    imp.add_argument("--quiet", action="store_true", help="no progress output")
    imp.set_defaults(func=cmd_import)

    ls = isub.add_parser("ls", help="list images")
    ls.set_defaults(func=cmd_ls)

    rm = isub.add_parser("rm", help="remove images")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=cmd_rm)

    verify = isub.add_parser("verify", help="check that an image still has the hash recorded at import")
    verify.add_argument("name")
    verify.set_defaults(func=cmd_verify)

    from dispo.cli import build  # `dispo image build RECIPE` lives with the image builder

    build.register_image_action(isub)

    from dispo.cli import firecracker  # `dispo image fetch` lives with the Firecracker backend

    firecracker.register_image_action(isub)


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    size = parse_size(args.size) if args.size else None
    t0 = time.monotonic()
    image = ImageStore(cfg).import_(args.path, args.name, size, quiet=args.quiet)
    print(f"imported {image.name}: {format_size(image.size)}, {image.storage.value}, "
          f"sha256 {image.sha256[:16]}…, {time.monotonic() - t0:.1f} s")
    return 0


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    rows = [(i.name, i.arch, format_size(i.size), i.storage.value,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)), i.sha256[:12]) for i in ImageStore(cfg).list()]
    print_table(("NAME", "ARCH", "SIZE", "STORAGE", "IMPORTED", "SHA256"), rows)
    return 0


def cmd_rm(args: argparse.Namespace, cfg: Config) -> int:
    store = ImageStore(cfg)
    for name in args.names:
        store.get(name)  # check all names before removing any
    for name in args.names:
        store.remove(name)
        print(f"removed {name}")
    return 0


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    if ImageStore(cfg).verify(args.name, Progress(f"hashing {args.name}")):
        print(f"{args.name}: OK")
        return 0
    print(f"{args.name}: CHANGED (the image no longer matches the hash recorded at import)")
    return 1
