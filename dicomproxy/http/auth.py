"""Optional HTTP basic authentication (``Authentication:Users``).

When users are configured every route but ``/dicomproxy/health`` needs a valid user; nothing
else is let through, CORS preflights included: those are answered before this layer by the
gateway's CORS policy (``http/cors.py``) and never reach a route or the PACS. The user name
reaches the Lua hooks (``request.User``) and the features through ``scope["user"]``, the user's
roles through ``scope["roles"]``. The client's ``Authorization`` header is the gateway's, so it
is not forwarded to the PACS.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

HEALTH_PATH = "/dicomproxy/health"


class BasicAuthMiddleware:
    def __init__(
        self, app: Any, users: dict[str, str], realm: str = "DicomProxy",
        roles: dict[str, tuple[str, ...]] | None = None,
    ) -> None:
        self.app = app
        self.users = users
        self.roles = roles or {}
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode()

    def _user(self, scope: dict[str, Any]) -> str | None:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                scheme, _, token = v.partition(b" ")
                if scheme.lower() != b"basic":
                    return None
                try:
                    name, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
                except (binascii.Error, UnicodeDecodeError):
                    return None
                expected = self.users.get(name)
                if expected is not None and hmac.compare_digest(expected.encode(), password.encode()):
                    return name
                return None
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        user = self._user(scope)
        if user is None and scope["path"] == HEALTH_PATH:
            # open to load balancers, but only the summary: see api.health
            await self.app({**scope, "anonymous": True}, receive, send)
            return
        if user is None:
            body = b'{"error": "authentication required"}'
            await send({"type": "http.response.start", "status": 401, "headers": [
                (b"www-authenticate", self.challenge), (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})
            return
        scope = dict(scope)
        scope["user"] = user
        scope["roles"] = self.roles.get(user, ())
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        await self.app(scope, receive, send)
