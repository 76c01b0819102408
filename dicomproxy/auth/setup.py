"""The authentication layer, built from :class:`~dicomproxy.config.model.Settings`.

:func:`build_auth` turns ``Authentication:*`` into the verifiers, the policy and the limiter,
logs a start-up warning per user whose password is stored in clear text, and returns an
:class:`Auth` the gateway wraps its app with (and starts, for the issuer's keys). With no
scheme configured there is no layer at all: the gateway is open and the client's
``Authorization`` header is the PACS's business, as before roles existed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from dicomproxy.audit.trail import AuditTrail
from dicomproxy.auth.apikeys import ApiKeyVerifier
from dicomproxy.auth.basic import BasicVerifier
from dicomproxy.auth.bearer import BearerVerifier, ClaimMapping
from dicomproxy.auth.identity import clean_roles
from dicomproxy.auth.jwks import IssuerKeys, http_fetcher
from dicomproxy.auth.middleware import AuthMiddleware, Schemes
from dicomproxy.auth.passwords import Kind, parse_stored
from dicomproxy.auth.policy import Policy, Rule, builtin_rules
from dicomproxy.auth.ratelimit import FailureLimiter
from dicomproxy.config.model import AuthenticationSettings, OidcSettings, Settings

log = logging.getLogger("dicomproxy.auth")


@dataclass
class Auth:
    """What the gateway holds: the schemes, the policy, the limiter; ``keys`` is a component."""

    schemes: Schemes
    policy: Policy
    limiter: FailureLimiter
    realm: str
    keys: IssuerKeys | None = None

    def wrap(self, app: Any, audit: AuditTrail | None = None) -> Any:
        return AuthMiddleware(app, self.schemes, self.policy, self.limiter, self.realm,
                              retry_unavailable=int(self.keys.min_interval) if self.keys else 30, audit=audit)


def build_auth(settings: Settings) -> Auth | None:
    """The layer for ``Authentication:*``; None when no scheme is configured."""
    conf = settings.authentication
    if not conf.enabled:
        return None
    keys = _issuer_keys(conf.oidc) if conf.oidc.issuer else None
    schemes = Schemes(basic=_basic(conf), api_keys=_api_keys(conf), bearer=_bearer(conf.oidc, keys))
    site = [Rule(r.path, frozenset(r.methods), frozenset(r.roles)) for r in conf.rules]
    policy = Policy(site, builtin_rules(settings.tus.base_path))
    attempts = conf.failed_attempts
    limiter = FailureLimiter(attempts.burst, attempts.per_minute, attempts.max_addresses)
    return Auth(schemes, policy, limiter, conf.realm, keys)


def _basic(conf: AuthenticationSettings) -> BasicVerifier | None:
    if not conf.users:
        return None
    users = {}
    for name, user in conf.users.items():
        stored = parse_stored(user.password)
        if stored.kind is Kind.PLAIN:
            log.warning("Authentication:Users:%s: the password is stored in clear text; store a hash instead "
                        "(dicomproxy hash-password)", name)
        users[name] = (stored, clean_roles(user.roles))
    return BasicVerifier.from_passwords(users)


def _api_keys(conf: AuthenticationSettings) -> ApiKeyVerifier | None:
    if not conf.api_keys:
        return None
    return ApiKeyVerifier({name: (k.hash, clean_roles(k.roles)) for name, k in conf.api_keys.items()})


def _issuer_keys(oidc: OidcSettings) -> IssuerKeys:
    return IssuerKeys(oidc.issuer, http_fetcher(oidc.timeout, oidc.ca_file), max_age=oidc.jwks_max_age,
                      min_interval=oidc.jwks_min_refresh, allow_http=oidc.allow_http)


def _bearer(oidc: OidcSettings, keys: IssuerKeys | None) -> BearerVerifier | None:
    if keys is None:
        return None
    mapping = ClaimMapping(oidc.user_claim, oidc.roles_claim, dict(oidc.role_map), clean_roles(oidc.default_roles))
    return BearerVerifier(keys, audience=oidc.audience, algorithms=oidc.algorithms, leeway=oidc.leeway,
                          mapping=mapping, cache_size=oidc.token_cache_size)
