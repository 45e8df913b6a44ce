"""gibbs behind an HTTP server: a client that goes away cancels its call, and
gibbs's errors become the HTTP answers a client can act on.

Plain ASGI (no dependency): works with any ASGI server and framework.

* :class:`CancelOnDisconnect` runs the endpoint in a task of its own and
  reads the server's messages for it; when the server reports that the
  client disconnected, the endpoint is cancelled, and with it the
  ``hub.request`` it awaits: a queued call leaves the queue, a running async
  model gets ``CancelledError`` in the worker. An
  :class:`~gibbs.OverloadedError` that escapes the endpoint before the
  response started becomes a 503 with ``Retry-After``, a
  :class:`~gibbs.DeadlineExceededError` a 504.
  A request's ``X-Request-ID`` header (at most 200 bytes) becomes the
  request id of the gibbs calls its endpoint makes (:func:`gibbs.request_id`
  reads it there and in the model), so that a web request and its calls
  are found in the logs by one id.
* :func:`install` (FastAPI, Starlette): ``app.add_middleware`` of it, which
  places it inside Starlette's own error middleware (which would answer 500).
"""

from __future__ import annotations

import asyncio
import json
import math
from typing import Any, Awaitable, Callable, MutableMapping, Optional

from .errors import DeadlineExceededError, OverloadedError
from .protocol import MAX_REQUEST_ID
from .worker import _REQUEST_ID

__all__ = ["CancelOnDisconnect", "install", "error_response"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def error_response(exc: BaseException) -> Optional[tuple[int, dict[str, str], bytes]]:
    """(status, headers, JSON body) for a gibbs error a client can act on:
    overload -> 503 with ``Retry-After`` (whole seconds, at least 1), a
    passed deadline -> 504. None for any other exception."""
    if isinstance(exc, OverloadedError):
        status, headers = 503, {"retry-after": str(max(1, math.ceil(exc.retry_after)))}
    elif isinstance(exc, DeadlineExceededError):
        status, headers = 504, {}
    else:
        return None
    headers["content-type"] = "application/json"
    return status, headers, json.dumps({"detail": str(exc)}).encode()


class CancelOnDisconnect:
    """ASGI middleware: cancel the endpoint when its client disconnects; map
    gibbs's overload and deadline errors to 503/504 (see the module)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # One reader of the server's messages: the endpoint gets them from
        # this queue, and a disconnect cancels it wherever it waits.
        inbox: asyncio.Queue[Message] = asyncio.Queue()
        started = False
        gone = False

        async def app_receive() -> Message:
            return await inbox.get()

        async def app_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        rid = _header_request_id(scope)
        if rid is None:
            task = asyncio.ensure_future(self.app(scope, app_receive, app_send))
        else:
            token = _REQUEST_ID.set(rid)  # the endpoint's task copies it
            try:
                task = asyncio.ensure_future(self.app(scope, app_receive, app_send))
            finally:
                _REQUEST_ID.reset(token)

        async def pump() -> None:
            nonlocal gone
            while True:
                message = await receive()
                inbox.put_nowait(message)
                if message["type"] == "http.disconnect":
                    gone = True
                    task.cancel()
                    return

        reader = asyncio.ensure_future(pump())
        try:
            try:
                await asyncio.wait((task,))
            except asyncio.CancelledError:
                task.cancel()  # we are cancelled (the server stops): so is the endpoint
                raise
            if task.cancelled():
                if gone:
                    return  # its client went: nobody to answer
                raise asyncio.CancelledError()
            exc = task.exception()
            if exc is None:
                return
            mapped = error_response(exc)
            if mapped is None or started:
                raise exc
            status, headers, body = mapped
            await send({
                "type": "http.response.start",
                "status": status,
                "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
            })
            await send({"type": "http.response.body", "body": body})
        finally:
            reader.cancel()


def _header_request_id(scope: Scope) -> Optional[str]:
    """The request's ``X-Request-ID``, when it has one a call can carry."""
    for name, value in scope.get("headers") or ():
        if name.lower() == b"x-request-id":
            if 0 < len(value) <= MAX_REQUEST_ID:
                try:
                    return bytes(value).decode()
                except UnicodeDecodeError:
                    return None
            return None
    return None


def install(app: Any) -> Any:
    """FastAPI or Starlette ``app``: cancel endpoints whose client goes, and
    answer OverloadedError with 503 (``Retry-After``) and
    DeadlineExceededError with 504. Returns ``app``."""
    app.add_middleware(CancelOnDisconnect)
    return app
