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
from dispo.storage.images import ImageStore, saved_image_file


def register(sub: Any) -> None:
    p = sub.add_parser("image", help="manage known-good images")
    isub = p.add_subparsers(dest="image_command", metavar="ACTION", required=True)

    # One verb each way, for both kinds of file: `import` takes a file from `export` (a sealed image, checked by
    # its sha256 while it is read) or a raw ext4 root filesystem (with --name), told apart by their first bytes.
    # `save` and `load` are the same verbs under docker's names.
    imp = isub.add_parser("import", aliases=["load"],
                          help="import an image: a file from 'dispo image export' (checked by its sha256; '-' for "
                               "standard input), or a raw ext4 root filesystem as a read-only image (with --name)")
    imp.add_argument("path", help="the file to read")
    imp.add_argument("--name", help="the image's name here (a raw ext4 file needs one; an exported image keeps "
                                    "the name it was exported with unless given one)")
    imp.add_argument("--sha256", metavar="HEX", help="an exported image only: refuse the file unless the image's "
                                                     "sha256 is this one (from 'dispo image ls --digests' where it "
                                                     "was exported)")
    imp.add_argument("--size", help="a raw ext4 file only: grow the filesystem to this size (e.g. 6G)")
    imp.add_argument("--quiet", action="store_true", help="no progress output")
    imp.set_defaults(func=cmd_import)

    ls = isub.add_parser("ls", help="list images (SHA256: the content digest, the same on every host)")
    ls.add_argument("--digests", action="store_true", help="show the full sha256 of each image")
    ls.set_defaults(func=cmd_ls)

    export = isub.add_parser("export", aliases=["save"],
                             help="write a sealed image to one file (a zstd'd tar with its sha256 manifest), to "
                                  "import it on another host")
    export.add_argument("name")
    export.add_argument("file", help="the file to write; '-' for standard output")
    export.add_argument("--uncompressed", action="store_true", help="a plain tar, without zstd")
    export.add_argument("--quiet", action="store_true", help="no progress output")
    export.set_defaults(func=cmd_export)

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
    path = Path(args.path)
    if args.path == "-" or (path.is_file() and saved_image_file(path)):
        if args.size:
            raise InvalidInput("--size is for a raw ext4 file; an exported image keeps the size it was sealed with",
                               hint="leave out --size")
        return _import_exported(args, cfg)
    if args.sha256:
        raise InvalidInput(f"{path} is not a file from 'dispo image export', so it has no sha256 to check",
                           hint="leave out --sha256 for a raw ext4 file ('dispo image verify NAME' checks it later)")
    if not args.name:
        raise InvalidInput(f"a raw ext4 file needs a name: dispo image import {path} --name NAME",
                           hint="or give a file written by 'dispo image export', which carries its name")
    size = parse_size(args.size) if args.size else None
    t0 = time.monotonic()
    image = ImageStore(cfg).import_(path, args.name, size, quiet=args.quiet)
    print(f"imported {image.name}: {format_size(image.size)}, {image.storage.value}, "
          f"sha256 {image.sha256[:16]}…, {time.monotonic() - t0:.1f} s")
    return 0


def cmd_ls(args: argparse.Namespace, cfg: Config) -> int:
    rows = [(i.name, i.arch, format_size(i.size), i.storage.value,
             time.strftime("%Y-%m-%d %H:%M", time.localtime(i.created)), i.digest if args.digests else i.digest[:12])
            for i in ImageStore(cfg).list()]
    print_table(("NAME", "ARCH", "SIZE", "STORAGE", "IMPORTED", "SHA256"), rows)
    return 0


def cmd_export(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.storage import imagefile

    image = ImageStore(cfg).get(args.name)
    progress = Progress(f"exporting {image.name}", quiet=args.quiet)
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
    print(f"exported {image.name} to {where}: sha256 {image.digest}, {time.monotonic() - t0:.1f} s", file=report)
    return 0


def _import_exported(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.storage import imagefile

    store = ImageStore(cfg)
    progress = Progress("importing", quiet=args.quiet)
    t0 = time.monotonic()
    if args.path == "-":
        if sys.stdin.isatty():
            raise InvalidInput("standard input is a terminal", hint="pipe the image file in, or give FILE")
        image = imagefile.load(store, sys.stdin.buffer, name=args.name, expect=args.sha256, source="standard input",
                               progress=progress)
    else:
        path = Path(args.path)
        try:
            src = open(path, "rb")  # noqa: SIM115 (closed below; a directory or a missing file is one line)
        except OSError as e:
            raise InvalidInput(f"cannot read {path}: {e.strerror}", hint="give the path of a file written by "
                               "'dispo image export'") from None
        with src:
            image = imagefile.load(store, src, name=args.name, expect=args.sha256, source=str(path.resolve()),
                                   progress=progress)
    print(f"imported {image.name}: {format_size(image.size)}, {image.storage.value}, sha256 {image.digest}, "
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
