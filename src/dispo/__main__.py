"""`python -m dispo ...`: the same as the `dispo` command (tests run it from their own interpreter)."""

from dispo.cli.main import entry

entry()
