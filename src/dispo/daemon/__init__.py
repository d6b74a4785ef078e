"""dispod: the long-running service that owns many sessions through one Runtime.

    paths.py   where dispod keeps its socket, lock, token and URL in the state dir
    dispod.py  the service's life: lock, reclaim, listen, serve, stop
    main.py    the `dispod` command: options, signals, printing, exit status
"""
