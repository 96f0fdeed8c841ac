"""What every request meets before a route: its id, the API key, the request-size limit.

Both checks are plain ASGI middleware, not `@app.middleware("http")`: that wrapper runs the route behind a
stream of its own, and a route behind it never saw the client leave (`request.is_disconnected()` stayed
False), so an abandoned non-streaming request ran to its end.
"""

from __future__ import annotations

import asyncio
import hmac
import uuid

from fastapi.responses import JSONResponse

from compiled_llm.server.errors import error_response

class ApiKeyGuard:
    """401 for /v1/ requests without `Authorization: Bearer KEY` (compared in constant time); /health and,
    unless `guard_metrics`, /metrics stay open."""

    def __init__(self, app, api_key: str, guard_metrics: bool = False):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.guard_metrics = guard_metrics

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path.startswith("/v1/") or (self.guard_metrics and path == "/metrics"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                response = error_response(401, "invalid or missing API key (Authorization: Bearer KEY)", "invalid_api_key")
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


class RequestSizeLimit:
    """413 for a request body over `max_bytes`: told by Content-Length at once, else counted as it arrives;
    408 for a body that stops arriving for `read_timeout_s` (or at all once the server drains: a stalled
    upload must not hold the shutdown); nothing for a client that leaves while sending. The body is read
    here and replayed to the route; later messages (a disconnect) pass."""

    def __init__(self, app, max_bytes: int, read_timeout_s: float = 30.0, drain=None):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.drain = drain

    async def _receive(self, receive):
        """The next message, or None if none came within the read timeout (or the server is draining)."""
        waited = 0.0
        while waited < self.read_timeout_s and not (self.drain is not None and self.drain.draining and waited > 0):
            step = min(1.0, self.read_timeout_s - waited)
            try:
                return await asyncio.wait_for(receive(), step)
            except asyncio.TimeoutError:
                waited += step
        return None

    def _too_large(self, size: str) -> JSONResponse:
        return error_response(413, f"the request body ({size}) exceeds the server's limit of {self.max_bytes} bytes "
                              "(--max-request-bytes)", "request_too_large", headers={"Connection": "close"})  # fmt: skip

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(f"{int(length)} bytes")(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await self._receive(receive)
            if message is None:
                response = error_response(408, f"the request body stopped arriving (nothing for {self.read_timeout_s:g} s, "
                                          "or the server is shutting down)", "request_timeout",
                                          headers={"Connection": "close"})  # fmt: skip
                return await response(scope, receive, send)
            if message["type"] != "http.request":  # the client left while sending: nobody to answer
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await self._too_large(f"over {self.max_bytes} bytes")(scope, receive, send)
            chunks.append(message)
            if not message.get("more_body", False):
                break
        replay = [{"type": "http.request", "body": b"".join(m.get("body", b"") for m in chunks), "more_body": False}]

        async def replayed():
            return replay.pop(0) if replay else await receive()

        await self.app(scope, replayed, send)


class RequestId:
    """X-Request-Id: the client's (printable, at most 128 characters) or a new one, kept in the request's
    state for the log line and echoed on the response; each response's status is reported to `on_status`."""

    def __init__(self, app, on_status=None):
        self.app = app
        self.on_status = on_status

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"x-request-id", b"").decode("latin-1")
        request_id = given if 0 < len(given) <= 128 and given.isprintable() else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
                if self.on_status is not None:
                    self.on_status(message["status"])
            await send(message)

        await self.app(scope, receive, send_with_id)
