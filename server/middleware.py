"""Pure ASGI middleware: request body size limit (413)."""

from __future__ import annotations

import json
from typing import Any, Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import INVALID_REQUEST, error_body


class BodySizeLimitMiddleware:
    """Refuse bodies over `max_bytes` with 413 before the app sees them.

    A declared Content-Length over the limit is refused at once. Otherwise the body is
    read (counting bytes as they stream in, so chunked uploads cannot slip past) and
    replayed to the app; later `receive()` calls go to the server, so disconnect
    detection keeps working.
    """

    def __init__(self, app: ASGIApp, max_bytes: int,
                 on_reject: Callable[[Scope], None] | None = None) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await self._reply(scope, send, 400, "invalid Content-Length header")
                    return
                if declared > self.max_bytes:
                    await self._too_large(scope, send)
                    return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # client gone before sending its body
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._too_large(scope, send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replay: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                                  "more_body": False}]

        async def replay_receive() -> Message:
            if replay:
                return replay.pop()
            return await receive()

        await self.app(scope, replay_receive, send)

    async def _too_large(self, scope: Scope, send: Send) -> None:
        if self.on_reject is not None:
            self.on_reject(scope)
        await self._reply(scope, send, 413,
                          f"request body too large: the limit is {self.max_bytes} bytes",
                          code="request_too_large")

    @staticmethod
    async def _reply(scope: Scope, send: Send, status: int, message: str,
                     code: Any = None) -> None:
        payload = json.dumps(error_body(message, INVALID_REQUEST, None, code)).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})
