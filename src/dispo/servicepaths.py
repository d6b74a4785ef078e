"""Where dispod keeps its files: all in the root-only state dir, named once here for dispod and its clients (the
CLI, client.py, the SDK), below all of them: a client finds dispod by these names without importing dispod."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

OWNER = "dispod"  # the owner a session's journal names when dispod runs it (dispo ls, dispo stop)


@dataclass(frozen=True)
class ServicePaths:
    state_dir: Path

    @property
    def socket(self) -> Path:
        """The API without a token (mode 0600)."""
        return self.state_dir / "dispod.sock"

    @property
    def lock(self) -> Path:
        """flock'd by the running dispod: one per state dir."""
        return self.state_dir / "dispod.lock"

    @property
    def token(self) -> Path:
        """The access token for TCP and the dashboard (mode 0600)."""
        return self.state_dir / "dispod.token"

    @property
    def url(self) -> Path:
        """The dashboard URL with the token (mode 0600)."""
        return self.state_dir / "dispod.url"
