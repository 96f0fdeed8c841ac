"""OpenAI-compatible HTTP server over the engine (the `serve` extra: fastapi, uvicorn, prometheus-client)."""

from compiled_llm.server.app import build_app
from compiled_llm.server.http_server import serve

__all__ = ["build_app", "serve"]
