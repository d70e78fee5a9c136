"""The request size limit, enforced before a body reaches the app: 413 over ``max_bytes``.

Why: a line PC must stay up when a misconfigured camera posts a 2 GB file or streams without end. The limit is
checked on the declared ``Content-Length`` and counted as a chunked body streams, as ASGI middleware, so no route
ever buffers an oversized body. The per-request image count is checked where the form is parsed
(:mod:`inspector.service.uploads`).
"""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from inspector.service.schemas import ErrorResponse


async def _send_error(send: Send, status: int, detail: str) -> None:
    """Answer with an :class:`ErrorResponse` straight on the ASGI channel and close the connection."""
    payload = json.dumps(ErrorResponse(detail=detail).model_dump()).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload})


class _TooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """413 for a body over ``max_bytes``: declared (Content-Length) or counted as it streams (chunked uploads).

    The rest of an oversized body is read and dropped (up to ``drain_bytes``) before answering, so an ordinary
    client that writes its whole request before reading sees the 413 instead of a reset connection.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = 64 * 1024 * 1024) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    def _too_large(self, size: str) -> str:
        return f"request body {size} is over the limit of {self.max_bytes} bytes"

    async def _drain(self, receive: Receive, more: bool) -> None:
        drained = 0
        while more and drained < self.drain_bytes:
            message = await receive()
            if message["type"] != "http.request":
                return
            drained += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                await _send_error(send, 400, "invalid Content-Length header")
                return
            if int(declared) > self.max_bytes:
                await self._drain(receive, True)
                await _send_error(send, 413, self._too_large(f"of {int(declared)} bytes"))
                return

        received = 0
        responded = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, responded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    if not started and not responded:
                        await self._drain(receive, message.get("more_body", False))
                        responded = True
                        await _send_error(send, 413, self._too_large(f"of more than {self.max_bytes} bytes"))
                    raise _TooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if responded:
                return  # the 413 has gone out: whatever the app makes of the aborted body is dropped
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not responded:
                raise
