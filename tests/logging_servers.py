"""The "internet" side of the quiet-browser test: a DNS server and a web server that log everything asked of
them, one JSON line per query or request. Run inside the test's netns:

    python -m tests.logging_servers dns ADDR LOG NAME=IPV4 [NAME=IPV4 ...]
    python -m tests.logging_servers http ADDR PORT DIR LOG

The DNS server answers A queries for the names given, and every other question with an empty answer (NOERROR
for a known name's other types, NXDOMAIN otherwise), so a browser that looks something up on its own is seen
here and gets nowhere. The web server serves DIR and logs each request's path and headers.
"""

from __future__ import annotations

import http.server
import json
import socket
import struct
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any


def _log(path: Path, entry: dict[str, Any]) -> None:
    with path.open("a") as f:
        f.write(json.dumps({"time": time.time(), **entry}) + "\n")


def _question(data: bytes) -> tuple[str, int, int] | None:
    """(name, qtype, end offset) of the first question, or None."""
    labels, i = [], 12
    while i < len(data):
        n = data[i]
        i += 1
        if n == 0:
            break
        if n & 0xC0 or i + n > len(data):
            return None
        labels.append(data[i:i + n].decode("ascii", "backslashreplace"))
        i += n
    if i + 4 > len(data):
        return None
    return ".".join(labels).lower(), struct.unpack("!H", data[i:i + 2])[0], i + 4


def serve_dns(addr: str, log: Path, names: dict[str, str]) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((addr, 53))
    while True:
        data, peer = sock.recvfrom(4096)
        q = _question(data) if len(data) >= 12 else None
        if q is None:
            _log(log, {"peer": peer[0], "malformed": data[:64].hex()})
            continue
        name, qtype, end = q
        _log(log, {"peer": peer[0], "name": name, "qtype": qtype})
        known = name.rstrip(".") in names
        answer = b""
        if known and qtype == 1:
            answer = b"\xc0\x0c" + struct.pack("!HHIH", 1, 1, 60, 4) + socket.inet_aton(names[name.rstrip(".")])
        flags = 0x8180 | (0 if known else 3)  # a response, recursion available; NXDOMAIN for unknown names
        header = data[:2] + struct.pack("!HHHHH", flags, 1, 1 if answer else 0, 0, 0)
        sock.sendto(header + data[12:end] + answer, peer)


class _Handler(http.server.SimpleHTTPRequestHandler):
    log_file: Path

    def do_GET(self) -> None:
        _log(self.log_file, {"peer": self.client_address[0], "path": self.path, "headers": dict(self.headers)})
        if self.path.startswith("/report"):
            self.send_response(204)
            self.end_headers()
            return
        if self.path.startswith("/attachment?"):
            # /attachment?file=F&name=N: the file F of the served directory, as a download named N (any text,
            # "../" included: what a hostile site would send).
            query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
            data = (Path(self.directory) / Path(query["file"][0]).name).read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Content-Disposition", f'attachment; filename="{query["name"][0]}"')
            self.end_headers()
            self.wfile.write(data)
            return
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_http(addr: str, port: int, directory: Path, log: Path) -> None:
    handler = type("Handler", (_Handler,), {"log_file": log})

    def make(*args: Any) -> _Handler:
        made: _Handler = handler(*args, directory=str(directory))
        return made

    http.server.ThreadingHTTPServer((addr, port), make).serve_forever()


def main() -> int:
    what = sys.argv[1]
    if what == "dns":
        names = dict(a.split("=", 1) for a in sys.argv[4:])
        serve_dns(sys.argv[2], Path(sys.argv[3]), names)
    elif what == "http":
        serve_http(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]))
    return 2


if __name__ == "__main__":
    sys.exit(main())
