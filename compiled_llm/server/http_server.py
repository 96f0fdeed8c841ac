"""Running the app: uvicorn, with a graceful shutdown on SIGTERM or Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading

from compiled_llm.llm import LLM
from compiled_llm.server.errors import DEFAULT_MAX_REQUEST_BYTES

log = logging.getLogger("compiled_llm.server")


def serve(llm: LLM, model_name: str, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          max_waiting: int = 1024, shutdown_timeout_s: float = 30.0, log_level: str = "info",
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, metrics_require_key: bool = False) -> None:  # fmt: skip
    """Serve until SIGTERM/SIGINT. Then: stop accepting connections, let running requests finish for up to
    `shutdown_timeout_s`, cancel (abort) the rest, return."""
    import uvicorn

    from compiled_llm.server.app import build_app

    app = build_app(llm, model_name, api_key, max_waiting, max_request_bytes, metrics_require_key)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=shutdown_timeout_s)
    log.info("serving %r on http://%s:%d (OpenAI API under /v1)", model_name, host, port)
    if threading.current_thread() is threading.main_thread():
        # uvicorn shuts down gracefully on these, then re-raises them to the handlers it found: make those
        # no-ops, so that a requested shutdown ends the process with status 0 instead of death by signal.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
    uvicorn.Server(config).run()
    log.info("server stopped")
