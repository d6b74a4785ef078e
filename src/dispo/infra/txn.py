"""A journaled transaction: a journal, an ExitStack and an id; every recorded object is undone at the end.

The bare form of a session, used for any work that must leave nothing behind if it fails (an image import,
a build, a probe). Transactions compose: `transaction(cfg, join=outer)` does not open a second journal but
records into the caller's, so an image import inside a fetch or a build is undone by the caller's unwind
if the caller fails later, and the caller sees one journal in `dispo ls`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dispo.config import Config
from dispo.infra.journal import Journal
from dispo.names import new_session_id


@dataclass
class Transaction:
    cfg: Config
    journal: Journal
    stack: contextlib.ExitStack

    @property
    def session_id(self) -> str:
        return self.journal.session_id

    @property
    def state_path(self) -> Path:
        """Per-session directory for sockets, logs and keys; removed with the journal."""
        return self.journal.path


@contextlib.contextmanager
def transaction(cfg: Config, *, purpose: str, join: Transaction | None = None, session_id: str | None = None,
                **meta: Any) -> Iterator[Transaction]:
    """A journal whose recorded objects are all undone when the block ends, however it ends.

    With `join`, the caller's transaction is used as it is: its journal records, its unwind undoes."""
    if join is not None:
        yield join
        return
    sid = session_id or new_session_id()
    journal = Journal.create(cfg.state_dir, sid, {"purpose": purpose, **meta})
    with contextlib.ExitStack() as stack:
        # Registered first so it runs last: after every context the block entered has closed.
        stack.callback(journal.unwind)
        yield Transaction(cfg, journal, stack)
