"""Images and per-session disks: btrfs snapshots, reflink copies or plain copies, chosen by probing."""
