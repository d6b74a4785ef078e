"""A local HTTP server laid out like the public artifacts bucket (no internet here).

It serves files from a directory, answers S3 ListObjectsV2 queries (?list-type=2&prefix=&delimiter=,
paged by max-keys with continuation tokens), honours Range requests, and can cut a response short once
(to test resume). It stands in for S3 only because S3 cannot be reached from the test machine.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlparse
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"


@dataclass
class Bucket:
    root: Path
    page_size: int = 3                    # small, so listings really page
    cut_after: int | None = None          # cut the next file response after this many bytes
    log: list[tuple[str, str]] = field(default_factory=list)   # (path+query, Range header)

    def keys(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*") if p.is_file())


def _listing(bucket: Bucket, query: dict[str, list[str]]) -> bytes:
    prefix = query.get("prefix", [""])[0]
    delim = query.get("delimiter", [""])[0]
    start = query.get("continuation-token", [""])[0]
    keys, prefixes = [], set()
    for k in bucket.keys():  # noqa: SIM118 - Bucket.keys() is a method, not a dict
        if not k.startswith(prefix):
            continue
        rest = k[len(prefix):]
        if delim and delim in rest:
            prefixes.add(prefix + rest.split(delim, 1)[0] + delim)
        else:
            keys.append(k)
    entries = sorted([("k", k) for k in keys] + [("p", p) for p in prefixes], key=lambda e: e[1])
    entries = [e for e in entries if e[1] > start] if start else entries
    page, more = entries[:bucket.page_size], len(entries) > bucket.page_size
    body = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{NS}">',
            "<Name>spec.ccfc.min</Name>", f"<Prefix>{escape(prefix)}</Prefix>",
            f"<IsTruncated>{'true' if more else 'false'}</IsTruncated>"]
    if more:
        body.append(f"<NextContinuationToken>{escape(page[-1][1])}</NextContinuationToken>")
    for kind, name in page:
        if kind == "k":
            body.append(f"<Contents><Key>{escape(name)}</Key><Size>{(bucket.root / name).stat().st_size}</Size>"
                        "</Contents>")
        else:
            body.append(f"<CommonPrefixes><Prefix>{escape(name)}</Prefix></CommonPrefixes>")
    body.append("</ListBucketResult>")
    return "".join(body).encode()


def _handler(bucket: Bucket) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_: object) -> None:
            pass

        def do_GET(self) -> None:
            url = urlparse(self.path)
            bucket.log.append((self.path, self.headers.get("Range", "")))
            query = parse_qs(url.query)
            if query.get("list-type") == ["2"]:
                self._send(200, _listing(bucket, query), "application/xml")
                return
            path = bucket.root / unquote(url.path).lstrip("/")
            if not path.is_file() or ".." in url.path:
                self._send(404, b"<Error><Code>NoSuchKey</Code></Error>", "application/xml")
                return
            data = path.read_bytes()
            start, status = 0, 200
            rng = self.headers.get("Range", "")
            if rng.startswith("bytes=") and rng.endswith("-"):
                start = int(rng[6:-1])
                if start >= len(data):
                    self._send(416, b"", "text/plain")
                    return
                status = 206
            body = data[start:]
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(body)))
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if bucket.cut_after is not None:
                self.wfile.write(body[:bucket.cut_after])
                bucket.cut_after = None
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def _send(self, status: int, body: bytes, ctype: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


@contextlib.contextmanager
def serve(bucket: Bucket) -> Iterator[str]:
    """Serve `bucket` on 127.0.0.1 (an ephemeral port); yields the base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(bucket))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
