"""`dispo image build RECIPE`"""

from __future__ import annotations

import argparse
import time
from typing import Any

from dispo.config import Config
from dispo.imagebuild import build_image
from dispo.imagebuild.recipes import RECIPES
from dispo.names import format_size


def register_image_action(isub: Any) -> None:
    p = isub.add_parser("build", help="build a bootable image from Debian packages (mmdebstrap)",
                        description="Build a small bootable Debian image (root filesystem, kernel, initrd) from "
                                    "the host's apt sources with mmdebstrap, cache the build under "
                                    "$DISPO_CACHE_DIR (default /var/cache/dispo) and import it.")
    p.add_argument("recipe", choices=sorted(RECIPES))
    p.add_argument("--name", help="image name (default: the recipe's name; with --from: SOURCE-RECIPE)")
    p.add_argument("--from", dest="from_image", metavar="NAME",
                   help="install the recipe's app into a copy of image NAME instead of building from scratch")
    p.add_argument("--arch", choices=("amd64", "arm64", "x86_64", "aarch64"),
                   help="the guest's architecture (default: the host's; another one is built through qemu-user "
                        "and runs under QEMU's emulation); the image is named RECIPE-ARCH unless --name says")
    p.add_argument("--rebuild", action="store_true", help="ignore the cached build")
    p.add_argument("--force", action="store_true", help="replace an existing image of that name")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_build)


def cmd_build(args: argparse.Namespace, cfg: Config) -> int:
    t0 = time.monotonic()
    if args.from_image:
        from dispo.imagebuild.into import build_from

        if args.arch:
            from dispo.errors import InvalidInput

            raise InvalidInput("--arch and --from do not go together: the image keeps its source's architecture",
                               hint="build from scratch with --arch, or --from an image of that architecture")
        image = build_from(cfg, args.recipe, args.from_image, name=args.name, force=args.force, quiet=args.quiet)
    else:
        image = build_image(cfg, args.recipe, name=args.name, rebuild=args.rebuild, force=args.force,
                            quiet=args.quiet, arch=args.arch)
    print(f"image {image.name}: {image.arch}, {format_size(image.size)}, kernel {image.kernel}, {image.storage.value}, "
          f"{time.monotonic() - t0:.1f} s")
    return 0
