"""Running the app: `serve` blocks (the CLI), `serve_in_thread` returns a running server (tests, notebooks)."""

from __future__ import annotations

import socket
import threading
import time

from ..errors import SjeaError
from .media import MAX_PIXELS, MAX_UPLOAD_BYTES
from .state import StoreHolder


def bind(host: str, port: int) -> socket.socket:
    """A listening socket, or one line saying why not (port in use, unknown host)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit it: uvicorn writes a response's headers and body separately,
        # and with Nagle's algorithm the body waited for the client's delayed ACK (~40 ms a request)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
    except OSError as e:
        raise SjeaError(f"cannot listen on {host}:{port} ({e.strerror or e}); pass another --port or --host.") from None
    sock.listen(2048)
    return sock


def make_server(store, host: str = "127.0.0.1", port: int = 8000, run=None, onnx=None,
                max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS,
                log_level: str = "warning", allow_hosts=()):
    """(uvicorn server, bound socket, URL). The store is loaded first, so a store that cannot be
    served (no index, stale index, a --run/--onnx model that does not load) is one error line
    before anything listens. Only requests whose Host header names the bound address, a loopback
    name (with the port) or one of `allow_hosts` are answered."""
    import uvicorn

    from ..embed.runner import release_freed_buffers_promptly
    from .app import allowed_host_values, create_app

    release_freed_buffers_promptly()  # a freed upload's buffers go back to the OS, not to the heap
    holder = StoreHolder(store, run=run, onnx=onnx)
    loaded = holder.current()
    if holder.source and loaded.embedder is None:  # the model asked for: never serve without it
        raise SjeaError(f"cannot serve with {'--run' if run else '--onnx'} {run or onnx}: "
                        f"{loaded.embedder_error}")
    sock = bind(host, port)
    app = create_app(holder, max_upload_bytes=max_upload_bytes, max_pixels=max_pixels,
                     allowed_hosts=allowed_host_values(host, sock.getsockname()[1], allow_hosts))
    config = uvicorn.Config(app, log_level=log_level, access_log=log_level in ("info", "debug", "trace"),
                            timeout_graceful_shutdown=5)
    host_shown = f"[{host}]" if ":" in host else host
    return uvicorn.Server(config), sock, f"http://{host_shown}:{sock.getsockname()[1]}/"


def serve(store, host: str = "127.0.0.1", port: int = 8000, run=None, onnx=None,
          max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int = MAX_PIXELS, log_level: str = "warning",
          on_ready=None, allow_hosts=()) -> None:
    """Serve the search page and API for `store` until interrupted; on_ready(url) once it listens."""
    server, sock, url = make_server(store, host, port, run, onnx, max_upload_bytes, max_pixels, log_level,
                                    allow_hosts)
    if on_ready is not None:
        on_ready(url)
    server.run(sockets=[sock])


def serve_in_thread(store, host: str = "127.0.0.1", port: int = 0, **options):
    """(url, stop) of a server running in a background thread; port 0 picks a free port."""
    server, sock, url = make_server(store, host, port, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise SjeaError(f"the server at {url} did not start.")

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        sock.close()

    return url, stop
