"""A loopback HTTP(S) server for the remote-source tests: serves a folder on 127.0.0.1 from a daemon thread, counts the
requests per path, and can fail the first N requests of chosen paths (HTTP 503) or stall on them."""

from __future__ import annotations

import shutil
import ssl
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        server = self.server
        with server.lock:
            server.requests[self.path] += 1
            seen = server.requests[self.path]
        if self.path in server.stall:
            time.sleep(server.stall_s)  # longer than the client's timeout: it gives up first
            return
        if seen <= server.fail_first.get(self.path, 0):
            self.send_error(503, "injected failure")
            return
        super().do_GET()

    def log_message(self, *args: object) -> None:  # keep pytest's output clean
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, root: Path):
        super().__init__(("127.0.0.1", 0), partial(_Handler, directory=str(root)))
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.fail_first: dict[str, int] = {}
        self.stall: set[str] = set()
        self.stall_s = 5.0
        self.scheme = "http"

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}/"


def self_signed_cert(folder: Path) -> tuple[Path, Path] | None:
    """(cert, key) of a one-day certificate for 127.0.0.1 made by the openssl command; None where it is missing."""
    if shutil.which("openssl") is None:
        return None
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@contextmanager
def serve(root: Path, tls: tuple[Path, Path] | None = None) -> Iterator[_Server]:
    """Serve `root` over HTTP (HTTPS with `tls` = (cert, key)) on a free loopback port until the block ends."""
    server = _Server(root)
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.scheme = "https"
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
