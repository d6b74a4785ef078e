"""`dispo image ...`"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from dispo.cli.common import print_table
from dispo.config import Config
from dispo.errors import InvalidInput
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

    ls = isub.add_parser("ls", help="list images (SHA256: the content digest, the same on every host)")
    ls.add_argument("--digests", action="store_true", help="show the full sha256 of each image")
    ls.set_defaults(func=cmd_ls)

    # save/load, not export/import: `import` already takes a raw ext4 file (as `docker import` takes a filesystem
    # tarball, while `docker save`/`load` move whole images): one verb, one kind of file.
    save = isub.add_parser("save", help="write a sealed image to one file (a zstd'd tar with its sha256 manifest), "
                                        "to load it on another host")
    save.add_argument("name")
    save.add_argument("file", help="the file to write; '-' for standard output")
    save.add_argument("--uncompressed", action="store_true", help="a plain tar, without zstd")
    save.add_argument("--quiet", action="store_true", help="no progress output")
    save.set_defaults(func=cmd_save)

    load = isub.add_parser("load", help="load an image written by 'dispo image save', checking its sha256")
    load.add_argument("file", help="the file to read; '-' for standard input")
    load.add_argument("--name", help="the name to give it here (default: the name it was saved with)")
    load.add_argument("--sha256", metavar="HEX", help="refuse the file unless the image's sha256 is this one "
                                                      "(from 'dispo image ls --digests' where it was saved)")
    load.add_argument("--quiet", action="store_true", help="no progress output")
    load.set_defaults(func=cmd_load)

    rm = isub.add_parser("rm", help="remove images")
    rm.add_argument("names", nargs="+")
    rm.set_defaults(func=cmd_rm)

    verify = isub.add_parser("verify", help="check that every file of an image still has the hash recorded at import")
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
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)), i.digest if args.digests else i.digest[:12])
            for i in ImageStore(cfg).list()]
    print_table(("NAME", "ARCH", "SIZE", "STORAGE", "IMPORTED", "SHA256"), rows)
    return 0


def cmd_save(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.storage import imagefile

    image = ImageStore(cfg).get(args.name)
    progress = Progress(f"saving {image.name}", quiet=args.quiet)
    t0 = time.monotonic()
    if args.file == "-":
        if sys.stdout.isatty():
            raise InvalidInput("standard output is a terminal", hint="redirect it to a file, or give FILE")
        sys.stdout.flush()
        imagefile.save(image, sys.stdout.buffer, compress=not args.uncompressed, progress=progress)
        where, report = "standard output", sys.stderr
    else:
        dest = Path(args.file)
        imagefile.save_to_path(image, dest, compress=not args.uncompressed, progress=progress)
        where, report = f"{dest} ({format_size(dest.stat().st_size)})", sys.stdout
    print(f"saved {image.name} to {where}: sha256 {image.digest}, {time.monotonic() - t0:.1f} s", file=report)
    return 0


def cmd_load(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.storage import imagefile

    store = ImageStore(cfg)
    progress = Progress("loading", quiet=args.quiet)
    t0 = time.monotonic()
    if args.file == "-":
        if sys.stdin.isatty():
            raise InvalidInput("standard input is a terminal", hint="pipe the image file in, or give FILE")
        image = imagefile.load(store, sys.stdin.buffer, name=args.name, expect=args.sha256, source="standard input",
                               progress=progress)
    else:
        path = Path(args.file)
        try:
            src = open(path, "rb")  # noqa: SIM115 (closed below; a directory or a missing file is one line)
        except OSError as e:
            raise InvalidInput(f"cannot read {path}: {e.strerror}", hint="give the path of a file written by "
                               "'dispo image save'") from None
        with src:
            image = imagefile.load(store, src, name=args.name, expect=args.sha256, source=str(path.resolve()),
                                   progress=progress)
    print(f"loaded {image.name}: {format_size(image.size)}, {image.storage.value}, sha256 {image.digest}, "
          f"{time.monotonic() - t0:.1f} s")
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
