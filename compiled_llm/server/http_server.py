"""Running the app: uvicorn, with a graceful shutdown on SIGTERM or Ctrl-C, and an exit status that says
how the server ended (0: asked to stop; 1: forced by a second signal, or the engine failed)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import threading
from typing import TYPE_CHECKING

from compiled_llm.llm import LLM
from compiled_llm.server.errors import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_READ_TIMEOUT_S
from compiled_llm.server.shutdown import Drain

if TYPE_CHECKING:
    from compiled_llm.engine_core import EngineCoreClient

log = logging.getLogger("compiled_llm.server")

# uvicorn's own deadline comes this much after ours, so that requests failed at ours get their answers out.
UVICORN_GRACE_S = 5.0


def _server_class():
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, draining through `drain` on the first signal, forced out by a second (SIGTERM
        too, not only SIGINT), and stopped with status 1 if the engine fails."""

        def __init__(self, config, llm: LLM | EngineCoreClient, drain: Drain):
            super().__init__(config)
            self.llm, self.drain = llm, drain
            self.exit_code = 0

        def handle_exit(self, sig, frame) -> None:
            if self.should_exit:  # a second signal: stop now, and say so in the exit status
                self.force_exit = True
                self.exit_code = 1
                log.warning("second signal: failing running requests and exiting")
                # Fail what runs now (answers, error events): its connections close, which uvicorn still
                # waits for on Python >= 3.12 (server.wait_closed) even when forced.
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().call_soon_threadsafe(self.drain.expire)
                return
            super().handle_exit(sig, frame)
            try:
                asyncio.get_running_loop().call_soon_threadsafe(self.drain.begin)
            except RuntimeError:  # no loop running yet (a signal during startup)
                pass

        async def on_tick(self, counter: int) -> bool:
            if self.llm.engine_failure is not None and not self.should_exit:
                log.error("the engine failed (%r): stopping the server", self.llm.engine_failure)
                self.exit_code = 1
                self.should_exit = True
                self.drain.begin()
            return await super().on_tick(counter)

    return Server


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) for the server to listen on: bound before the model compiles, so that a
    port in use or not ours to take fails in a second, not after minutes of compiling (vLLM does the same)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]  # fmt: skip
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise ValueError(f"--host {host!r}: {error.strerror or error}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait out TIME_WAIT
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def _exit_with_status_1(signum, frame) -> None:
    log.warning("signal %d while stopping: exiting with status 1", signum)
    raise SystemExit(1)


def serve(llm: LLM | EngineCoreClient, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 1024, shutdown_timeout_s: float = 30.0, log_level: str = "info",
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics_require_key: bool = False,
          request_timeout_s: float | None = None, read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
          sock: socket.socket | None = None) -> int:  # fmt: skip
    """Serve until SIGTERM/SIGINT. Then: stop accepting connections, give running requests up to
    `shutdown_timeout_s` to finish, fail the rest with 503s and stream error events, return the exit
    status (0, or 1 after a second signal or an engine failure). `sock`: listening_socket's, bound already (host and
    port are then its)."""
    import uvicorn

    from compiled_llm.server.app import build_app

    drain = Drain(shutdown_timeout_s)
    app = build_app(llm, model_name, api_key, max_waiting, max_request_bytes, metrics_require_key, drain,
                    request_timeout_s, read_timeout_s)  # fmt: skip
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                            timeout_graceful_shutdown=shutdown_timeout_s + UVICORN_GRACE_S)  # fmt: skip
    server = _server_class()(config, llm, drain)
    if sock is not None:
        host, port = sock.getsockname()[:2]  # port 0: the one the system gave
    log.info("serving %r on http://%s:%d (OpenAI API under /v1)", model_name, host, port)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on these, then re-raises them to the handlers it found: make those
        # no-ops, so that a requested shutdown ends the process with our status instead of death by signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    # The app, the tokenizer and the imported libraries are long-lived: out of the cyclic collector, whose full
    # passes over them stopped every stream for 120-150 ms every few seconds under load (4-7 ms after this).
    gc.collect()
    gc.freeze()
    try:
        server.run(sockets=None if sock is None else [sock])
    finally:
        if threading.current_thread() is threading.main_thread():
            # A signal while tearing down (the requests done, the engine core stopping) is a second signal too:
            # it exits at once with status 1, not by death from the signal's default action.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, _exit_with_status_1)
    log.info("server stopped (exit status %d)", server.exit_code)
    return server.exit_code
