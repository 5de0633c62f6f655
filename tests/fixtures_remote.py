"""A loopback HTTP server for the remote-source tests: serves a folder on 127.0.0.1 from a daemon thread, counts the
requests per path, and can fail the first N requests of chosen paths (HTTP 503) or stall forever on them."""

from __future__ import annotations

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

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/"


@contextmanager
def serve(root: Path) -> Iterator[_Server]:
    """Serve `root` over HTTP on a free loopback port until the block ends."""
    server = _Server(root)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
