"""Who a request is, and what it may do: the gateway's authentication and role policy.

One module per concept, none importing the configuration (``setup`` builds them from it):

* :mod:`.identity` — the one identity model (name, scheme, roles, claims) every scheme produces;
* :mod:`.passwords` — stored password formats (plain, argon2, bcrypt, pbkdf2) and their check;
* :mod:`.basic` — HTTP basic users, with verified hashes cached by a keyed digest;
* :mod:`.apikeys` — ``X-API-Key`` keys stored as SHA-256 hashes;
* :mod:`.jwks` — an OpenID issuer's discovery document and key set, fetched and refreshed;
* :mod:`.bearer` — ``Authorization: Bearer`` JWTs validated against that key set, cached;
* :mod:`.policy` — which roles a method and canonical path need;
* :mod:`.ratelimit` — failed attempts per source address (a bounded token-bucket table);
* :mod:`.middleware` — the pure ASGI layer that ties them together;
* :mod:`.setup` — all of the above from :class:`~dicomproxy.config.model.Settings`.
"""
