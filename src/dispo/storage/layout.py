"""The names of an image's files, for every module that reads or moves images (images.py imports them, and so
does the storage pool's move of old images, which images.py itself uses: one home, no import circle)."""

from __future__ import annotations

ROOTFS = "rootfs.ext4"  # the root filesystem
META = "image.json"     # what dispo recorded about it (sealed with it)
