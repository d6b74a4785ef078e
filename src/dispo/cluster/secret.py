"""The per-cluster secret: what the gateway's requests to its nodes carry instead of a user's token. One file,
root-only (0600, owned by this user, a regular file, one token), the same on the gateway and every node."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from dispo.errors import ConfigError

HOW_TO_MAKE = ("make it once: umask 077; python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > FILE "
               "(or start the gateway first: it makes it), then copy it to every node ([cluster] secret_file)")


def read(path: Path, *, make: bool = False) -> str:
    """The secret in `path`; with `make`, a new one written there when there is none. ConfigError otherwise."""
    # Late import: the token file checks live with dispod's own token (daemon/dispod.py).
    from dispo.infra.private import kept_token, write_private

    found, why = kept_token(path)
    if found is not None:
        return found
    if why or not make:
        raise ConfigError(f"the cluster secret {path} cannot be used: {why or 'there is no such file'}",
                          hint=HOW_TO_MAKE)
    value = secrets.token_urlsafe(32)
    os.makedirs(path.parent, mode=0o700, exist_ok=True)
    write_private(path, value + "\n")
    return value
