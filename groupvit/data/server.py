"""A loopback HTTP server for local image folders, so img2dataset downloads them exactly as it would internet urls.

Used by the download stage for the embedded synthetic world (its url list points at http://127.0.0.1:<port>/) and by
the tests, which also serve failure cases (404, non-image bytes, truncated JPEG) and read the request log.
"""
from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path
from types import TracebackType

from groupvit.errors import DataError


class _Handler(http.server.SimpleHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        with self.server.lock:
            self.server.requests.append(self.path)
        if self.server.owner.delay:
            threading.Event().wait(self.server.owner.delay)
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # one line per image would flood the logs
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    # listen() backlog: socketserver's default of 5 is far below img2dataset's 2 processes x 32 threads; refused SYNs
    # are retried by the kernel after 1, 3, 7 s, and a few requests then hit the 10 s timeout (3 of 40,000 in a
    # fresh-clone run), which changes the shards and so every model trained on them
    request_queue_size = 1024

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        # A client that goes away mid-response (img2dataset killed or timing out) is not a server error.
        import sys

        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    requests: list[str]
    lock: threading.Lock
    owner: LoopbackImageServer


class LoopbackImageServer:
    """Serve `directory` on a loopback `host:port` for the duration of a `with` block (stopped whatever happens).

    Args:
        directory: folder whose files are served at `/<name>`.
        host: a loopback address (`127.0.0.1`, `localhost`, `::1`).
        port: TCP port; 0 picks a free one (read `.port`).
        delay: seconds to wait before answering each request (tests use it to slow a download down; settable).

    Attributes:
        requests: request paths in arrival order (e.g. `/000000003.jpg`).
    """

    def __init__(self, directory: str | Path, host: str = "127.0.0.1", port: int = 0, delay: float = 0.0):
        self.directory = Path(directory)
        self.host = "127.0.0.1" if host == "localhost" else host
        self.port = port
        self.delay = delay
        self.requests: list[str] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> LoopbackImageServer:
        if not self.directory.is_dir():
            raise DataError(f"{self.directory}: folder to serve not found")
        handler = functools.partial(_Handler, directory=str(self.directory))
        try:
            server = _Server((self.host, self.port), handler)
        except OSError as e:
            raise DataError(f"cannot serve {self.directory} on {self.host}:{self.port} ({e}); is another download "
                            f"running? The port comes from the url list (synth.url_base)") from None
        server.requests, server.lock, server.owner = self.requests, threading.Lock(), self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="loopback-image-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> LoopbackImageServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
