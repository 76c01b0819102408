"""Optional HTTP basic authentication (``Authentication:Users``).

When users are configured every route but ``/dicomproxy/health`` needs a valid user; nothing
else is let through, CORS preflights included: those are answered before this layer by the
gateway's CORS policy (``http/cors.py``) and never reach a route or the PACS. The user name
reaches the Lua hooks (``request.User``) and the features through ``scope["user"]``, the user's
roles through ``scope["roles"]``. The client's ``Authorization`` header is the gateway's, so it
is not forwarded to the PACS.

Each login that presented credentials goes to the audit trail (``audit.login``: successes
de-duplicated there, failures all recorded and watched for bursts); a request without an
``Authorization`` header is not a login attempt (browsers send one only after the 401).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from dicomproxy.audit.trail import AuditTrail

HEALTH_PATH = "/dicomproxy/health"


class BasicAuthMiddleware:
    def __init__(
        self, app: Any, users: dict[str, str], realm: str = "DicomProxy",
        roles: dict[str, tuple[str, ...]] | None = None, audit: AuditTrail | None = None,
    ) -> None:
        self.app = app
        self.audit = audit
        self.users = users
        self.roles = roles or {}
        self.challenge = f'Basic realm="{realm}", charset="UTF-8"'.encode()

    def _user(self, scope: dict[str, Any]) -> str | None:
        for k, v in scope.get("headers", ()):
            if k == b"authorization":
                return self._check(scope, v)
        return None

    def _check(self, scope: dict[str, Any], value: bytes) -> str | None:
        """The user the ``Authorization`` value proves, or None; either way a login for the audit."""
        scheme, _, token = value.partition(b" ")
        name, ok, why = "", False, "not basic authentication"
        if scheme.lower() == b"basic":
            try:
                name, _, password = base64.b64decode(token.strip(), validate=True).decode("utf-8").partition(":")
                expected = self.users.get(name)
                ok = expected is not None and hmac.compare_digest(expected.encode(), password.encode())
                why = "" if ok else "unknown user or wrong password"
            except (binascii.Error, UnicodeDecodeError):
                why = "malformed credentials"
        if self.audit is not None:
            client = scope.get("client")
            self.audit.login(name, client[0] if client else "", ok, via="HTTP basic authentication", reason=why)
        return name if ok else None

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
