"""Running the app: listen, load the models, serve with uvicorn until Ctrl-C or SIGTERM, drain, exit 0.

Startup problems (a bad --model, a port in use) are LLMErrors: one line and exit status 2, as for every
`llm` command; the port is bound before the models load, so a port in use fails at once. The first
Ctrl-C or SIGTERM stops accepting connections and lets the requests in flight finish (up to
`drain_timeout` seconds); the process then exits 0. A second Ctrl-C stops at once (130). Either way the
stop is bounded: a model step still running on the worker thread when the time is up (a thread cannot
be interrupted) is left behind, and the process exits without waiting for it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator

from llm.errors import INTERRUPTED, LLMError, os_reason


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or an LLMError naming why not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise LLMError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise LLMError(f"cannot listen on {host}:{port}: {os_reason(exc)}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}"


class _NoCancelledTraceback(logging.Filter):
    """uvicorn logs each request it cancels when the drain timeout is up as an "Exception in ASGI
    application" with a CancelledError traceback, and after a second Ctrl-C the lifespan's cancelled
    wait as a traceback's text: that is the stop, not a bug. Its one line "Cancel N running task(s),
    timeout graceful shutdown exceeded" stays."""

    def filter(self, record: logging.LogRecord) -> bool:
        import asyncio

        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return False
        text = record.getMessage()
        return not (text.startswith("Traceback") and text.rstrip().endswith("CancelledError"))


def serve(app, sock: socket.socket, prog: str, drain_timeout: float = 60.0) -> int:
    """Serve `app` on `sock` until a signal; 0 after a drain, 130 when a second Ctrl-C cut it short."""
    import asyncio

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn's own raises the signal again after shutting down, which ends the process with
            # 130 or 143; a server that drained its requests as asked exits 0 instead.
            handled = (signal.SIGINT, signal.SIGTERM)
            original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
            try:
                yield
            finally:
                for sig, handler in original.items():
                    signal.signal(sig, handler)

        stopping_since: float | None = None  # time.monotonic() of the first Ctrl-C or SIGTERM

        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                self.stopping_since = time.monotonic()
                state = app.state.scheduler.stats()
                running = state["active"] + state["queued"]
                print(f"{prog}: stopping: finishing {running} request(s) in flight (Ctrl-C again to stop now)",
                      file=sys.stderr, flush=True)  # fmt: skip
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=drain_timeout,
        lifespan="on",
    )
    server = Server(config)
    logging.getLogger("uvicorn.error").addFilter(_NoCancelledTraceback())
    asyncio.run(server.serve(sockets=[sock]))
    code = INTERRUPTED if server.force_exit else 0
    # The drain is over (or was cut short): the worker may still run a step of a request that was
    # cancelled. Wait for it only while the drain timeout lasts, and not at all after a second Ctrl-C.
    since = server.stopping_since if server.stopping_since is not None else time.monotonic()
    left = 0.0 if server.force_exit else since + drain_timeout - time.monotonic()
    app.state.scheduler.close()  # again (idempotent): a second Ctrl-C skips the app's shutdown
    stopped = app.state.scheduler.join(max(0.0, left))
    if code == 0:
        print(f"{prog}: stopped", file=sys.stderr, flush=True)
    if not stopped:  # the interpreter would wait for the worker thread at exit: leave without it
        with contextlib.suppress(OSError):
            sys.stdout.flush()
        os._exit(code)
    return code
