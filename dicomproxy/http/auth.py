"""Optional HTTP basic authentication (``Authentication:Users``).

When users are configured every route but ``/dicomproxy/health`` (and CORS preflights) needs a
valid user; the
username reaches the Lua hooks (``request.User``) through ``scope["user"]``. The client's
``Authorization`` header is the gateway's, so it is not forwarded to the PACS.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

HEALTH_PATH = "/dicomproxy/health"


def _is_preflight(scope: dict[str, Any]) -> bool:
    """A CORS preflight: browsers send it without credentials (Fetch standard), so it cannot be
    asked for them; it carries no body and changes nothing. Any other OPTIONS needs a user."""
    if scope.get("method") != "OPTIONS":
        return False
    names = {k for k, _ in scope.get("headers", ())}
    return b"origin" in names and b"access-control-request-method" in names


class BasicAuthMiddleware:
    def __init__(self, app: Any, users: dict[str, str], realm: str = "DicomProxy") -> None:
        self.app = app
        self.users = users
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
        if scope["type"] != "http" or _is_preflight(scope):
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
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"authorization"]
        await self.app(scope, receive, send)
