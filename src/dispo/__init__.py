"""dispo: disposable sessions inside microVMs."""

__version__ = "0.1.0"
