"""The HTTP server in the coordinator's process: uvicorn on a thread of its own.

`HttpServer(options).start()` binds the socket first (a port in use is refused at once,
before any model is loaded) and serves `/health` with 503 "Loading model" while the ranks
load; `engine.attach(...)` makes it ready. The engine loop stays on the main thread (it
answers the signals: SIGTERM / Ctrl-C drain), uvicorn's loop on this one; runtime.live
joins them. `stop()` lets uvicorn finish the open responses (graceful, `grace_s` at most).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
from dataclasses import dataclass

import uvicorn

from partitioner.errors import AdaptLinkError
from runtime.http_api import build_app
from runtime.live import LiveEngine, ServeLimits

log = logging.getLogger(__name__)

API_KEY_ENV = "ADAPTLINK_API_KEY"  # how the launcher hands --api-key to the coordinator's process
# The server's thread and the engine's share the GIL: a thread that wants it waits until the
# holder lets go, at most this long (CPython's default is 5 ms). 1 ms keeps the engine thread,
# the pipeline's critical path, from waiting behind the server's Python (serve_load, 16
# clients: +2% tokens/s over the default, on top of parsing text bodies on the loop).
GIL_SWITCH_S = 0.001


@dataclass(frozen=True)
class HttpOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    model_name: str = "adaptlink"
    api_key: str | None = None
    max_waiting: int = 64
    keepalive_s: float = 10.0
    drain_s: float = 10.0             # SIGTERM: what runs gets this long, then it is cancelled
    remote_images: bool = False       # --allow-remote-images
    media_dir: str | None = None      # --media-dir


def read_api_key(key: str | None, key_file: str | None) -> str | None:
    """--api-key, else --api-key-file's first line, else $ADAPTLINK_API_KEY, else None."""
    if key:
        return key
    if key_file:
        try:
            with open(key_file) as f:
                key = f.readline().strip()
        except OSError as e:
            raise AdaptLinkError(f"--api-key-file {key_file}: cannot be read: {e.strerror or e}") from None
        if not key:
            raise AdaptLinkError(f"--api-key-file {key_file}: is empty")
        return key
    return os.environ.get(API_KEY_ENV) or None


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or AdaptLinkError naming the flag."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(2048)
    except OSError as e:
        raise AdaptLinkError(f"--host {host} --port {port}: cannot listen: {e.strerror or e}") from None
    return sock


class HttpServer:
    def __init__(self, options: HttpOptions):
        self.options = options
        self.engine = LiveEngine(model_name=options.model_name, limits=ServeLimits(options.max_waiting))
        app = build_app(self.engine, api_key=options.api_key, keepalive_s=options.keepalive_s)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                                    timeout_graceful_shutdown=5, access_log=False))
        self.sock: socket.socket | None = None
        self._switch: float | None = None  # the GIL switch interval before start()
        self.thread: threading.Thread | None = None

    def start(self) -> "HttpServer":
        self.sock = bind(self.options.host, self.options.port)
        self._switch = sys.getswitchinterval()
        sys.setswitchinterval(min(self._switch, GIL_SWITCH_S))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       name="http", daemon=True)
        self.thread.start()
        host, port = self.sock.getsockname()[:2]
        log.warning("serving %s on http://%s:%d/v1 (loading)", self.options.model_name, host, port)
        return self

    def stop(self, grace_s: float = 10.0) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(grace_s)
        if self.sock is not None:
            self.sock.close()
        if self._switch is not None:
            sys.setswitchinterval(self._switch)
            self._switch = None
