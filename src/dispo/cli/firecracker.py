"""`dispo doctor`, `dispo firecracker install`, and `dispo image fetch` (registered under `image`)."""

from __future__ import annotations

import argparse
from typing import Any

from dispo.config import Config
from dispo.names import format_size


def register(sub: Any) -> None:
    doc = sub.add_parser("doctor", help="what this host runs (architectures) and whether Firecracker can run here "
                                         "(binaries, /dev/kvm, a real boot)")
    doc.add_argument("--no-boot", action="store_true", help="skip booting the probe guest")
    doc.set_defaults(func=cmd_doctor)

    fc = sub.add_parser("firecracker", help="manage the Firecracker binaries")
    fsub = fc.add_subparsers(dest="fc_command", metavar="ACTION", required=True)
    inst = fsub.add_parser("install", help="install an official release (checked against its SHA256SUMS)")
    inst.add_argument("--version", required=True, help="release version, e.g. 1.7.0")
    inst.add_argument("--url", help="tarball URL; {version} and {arch} are filled in "
                                    "(default: firecracker.release_url from the config)")
    inst.add_argument("--quiet", action="store_true")
    inst.set_defaults(func=cmd_install)


def register_image_action(isub: Any) -> None:
    f = isub.add_parser("fetch", help="download the Firecracker CI kernel + rootfs (+ SSH key) as an image")
    f.add_argument("--name", required=True)
    f.add_argument("--ci-version", help="bucket folder, e.g. v1.10 (default: the newest)")
    f.add_argument("--arch", help="x86_64 or aarch64 (amd64, arm64), the bucket's <arch> folder (default: the host's)")
    f.add_argument("--url", help="bucket base URL (default: firecracker.artifacts_url)")
    f.add_argument("--quiet", action="store_true", help="no progress output")
    f.set_defaults(func=cmd_fetch)


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.vmm.firecracker.doctor import Status, run_checks

    checks = run_checks(cfg, boot=not args.no_boot)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{c.status.value:<4}  {c.name:<{width}}  {c.detail}")
    return 1 if any(c.status is Status.FAIL for c in checks) else 0


def cmd_install(args: argparse.Namespace, cfg: Config) -> int:
    from dispo.vmm.firecracker.install import install

    done = install(cfg, args.version, url=args.url, quiet=args.quiet)
    jailer = f", jailer at {done.jailer}" if done.jailer else " (no jailer in the release)"
    print(f"installed firecracker v{done.version} at {done.firecracker}{jailer}")
    return 0


def cmd_fetch(args: argparse.Namespace, cfg: Config) -> int:
    import json

    from dispo.fetch import fetch_image

    image = fetch_image(cfg, args.name, base=args.url, arch=args.arch, folder=args.ci_version, quiet=args.quiet)
    upstream = json.loads((image.path / "image.json").read_text()).get("upstream", {})
    print(f"fetched {image.name}: {upstream.get('folder', '?')} {upstream.get('kernel', '?').rsplit('/', 1)[-1]} + "
          f"{upstream.get('rootfs', '?').rsplit('/', 1)[-1]}, {format_size(image.size)}")
    return 0
