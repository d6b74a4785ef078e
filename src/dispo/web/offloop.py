"""`blocking(fn, *args)`: a call that blocks (the file system, a guest command, a session's thread) run off
dispod's event loop, in the loop's default executor, so one slow disk or guest never stalls the server."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, functools.partial(fn, *args))
