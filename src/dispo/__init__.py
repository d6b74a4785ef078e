"""dispo: disposable sessions inside microVMs.

The SDK's names (`dispo.connect`, `dispo.Client`, `dispo.AsyncClient`, ...: dispo/sdk.py, docs/sdk.md) are
loaded on first use, so `import dispo` (the CLI, dispod, a pytest run with the plugin) stays cheap: no httpx.
"""

from __future__ import annotations

import typing

__version__ = "0.1.0"

if typing.TYPE_CHECKING:
    from dispo.sdk import AsyncClient as AsyncClient
    from dispo.sdk import AsyncSession as AsyncSession
    from dispo.sdk import Client as Client
    from dispo.sdk import Download as Download
    from dispo.sdk import Receipt as Receipt
    from dispo.sdk import Session as Session
    from dispo.sdk import TakeOver as TakeOver
    from dispo.sdk import Token as Token
    from dispo.sdk import connect as connect

_SDK = ("AsyncClient", "AsyncSession", "Client", "Download", "Receipt", "Session", "TakeOver", "Token", "connect")


def __getattr__(name: str) -> typing.Any:
    if name in _SDK:
        from dispo import sdk

        return getattr(sdk, name)
    raise AttributeError(f"module 'dispo' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_SDK} - {"annotations", "typing"})
