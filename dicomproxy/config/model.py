"""The configuration model: every key of ``appsettings.json`` declared once.

Each field is one key: its name in the file (``key("ReadTimeoutSeconds", ...)``), its kind
(``Annotated[float, Number(above=0)]``: parsing, message, the README's type), its default and
its description, and ``secret=True`` for values that must never show. Everything else is
derived from these declarations: the loader's case-insensitive matching and its unknown-key
messages, the README table (``python -m dicomproxy.config.docs``), the defaults in the
repository's ``appsettings.json`` (a test compares them), ``dicomproxy config``, the masked
views that Lua, logs and the API may see.

The attribute names are the ones the rest of the code has always used
(``settings.upstream.read_timeout``, ``settings.tus.upload_folder``, ``settings.host``); values
that are computed from keys (``host``/``port`` from ``Urls``, ``lua.fail_open_hooks``) are
properties, and two attributes that live in another section of the file
(``lua.scripts_root`` and ``tus.upload_folder`` are ``ExtraConfig`` keys) are filled in once,
after validation. Every model is frozen.

Safe defaults (what a hospital's security office checks): both listeners on loopback
(``Urls``, ``Dicom:Host``; open them with ``0.0.0.0``), Lua fails closed with time and memory
caps, uploads capped at 20 GiB each and 100 GiB together, SMTP credentials never sent in clear text to a remote host.
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, ClassVar
from urllib.parse import urlsplit

from pydantic import ConfigDict, model_validator
from pydantic_core import PydanticCustomError

from dicomproxy.auth.apikeys import check_hash
from dicomproxy.auth.identity import DEFAULT_USER_ROLES
from dicomproxy.auth.passwords import parse_stored
from dicomproxy.config.fields import (
    REQUIRED,
    VALUE_ERROR,
    AeTitle,
    Choice,
    Cidr,
    Duration,
    Endpoint,
    Flag,
    FlagOrNames,
    FsPath,
    HttpUrl,
    Listen,
    Names,
    Number,
    Section,
    SyslogUrl,
    Text,
    UrlPath,
    Whole,
    WorkerCount,
    collection,
    internal,
    key,
    mask_userinfo,
    section,
)
from dicomproxy.config.tree import ConfigTree, public_view
from dicomproxy.uids import root_problem

GiB = 1 << 30
MiB = 1 << 20
JWT_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")


class UpstreamSettings(Section):
    url: Annotated[str, HttpUrl()] = key(
        "Url", "http://127.0.0.1:8042",
        "the PACS's HTTP root (`http://` or `https://`, may end in a path prefix); DICOMweb and REST are proxied "
        "there. An `https` certificate is verified against the system CAs; for a private CA, start the gateway "
        "with `SSL_CERT_FILE=/path/ca.pem`")
    dicomweb_root: Annotated[str, UrlPath()] = key("DicomWebRoot", "/dicom-web", "STOW/QIDO/WADO root on the upstream")
    connect_timeout: Annotated[float, Number(above=0)] = key(
        "ConnectTimeoutSeconds", 5, "connecting to the upstream; unreachable → 502")
    read_timeout: Annotated[float, Number(above=0)] = key(
        "ReadTimeoutSeconds", 120, "longest wait for upstream bytes; too slow → 504")
    max_connections: Annotated[int, Whole(1)] = key(
        "MaxConnections", 256, "pooled keep-alive connections to the upstream")
    head_timeout: Annotated[float, Number(above=0)] = key(
        "ResponseHeadTimeoutSeconds", 30,
        "from the first byte of an answer to the end of its head (interim 1xx heads included); too slow → 504, "
        "so a trickle of header bytes cannot hold a client")
    max_head_bytes: Annotated[int, Whole(1024)] = key(
        "MaxResponseHeadBytes", 65536, "largest answer head from the upstream (1xx heads included); larger → 502")
    username: Annotated[str, Text()] = key(
        "Username", "", "HTTP basic user for the gateway's own calls to the PACS (Lua `RestApi*`, the change feed, "
        "TUS import, DICOMweb forwarding, health); proxied requests keep the client's own credentials")
    password: Annotated[str, Text()] = key(
        "Password", "", "the password of `Upstream:Username` (or `PasswordFile`)", secret=True)
    preserve_host: Annotated[bool, Flag()] = key(
        "PreserveHost", False, "send the client's `Host` to the PACS instead of the PACS's own (for a PACS that "
        "builds its URLs from `Host`); `Forwarded` and `X-Forwarded-Host` are sent either way")
    rewrite_urls: Annotated[str, Choice("Auto", "Always", "Never")] = key(
        "RewriteUrls", "Auto", "rewrite URLs that point at the PACS into URLs at the gateway: `Location` headers, "
        "and DICOM JSON/XML bodies under `Upstream:DicomWebRoot` (`Auto`) or on every path (`Always`), streamed; "
        "`Never` passes answers as they are")
    public_url: Annotated[str, Text()] = key(
        "PublicUrl", "", "the gateway's URL as clients reach it (`https://pacs.example.org`), when a load balancer "
        "in front of it terminates TLS or renames it; empty: the request's own `Host` and scheme")

    def __repr_args__(self) -> Any:  # a logged Settings never shows the password of a user:password@ in Url
        for name, value in super().__repr_args__():
            yield name, (mask_userinfo(value) if name == "url" and isinstance(value, str) else value)

    @model_validator(mode="after")
    def _one_credential(self) -> UpstreamSettings:
        parts = urlsplit(self.url)
        if (parts.username or parts.password) and (self.username or self.password):
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "credentials are given both in Upstream:Url and in Upstream:Username/Password; "
                            "keep one (better Username/Password: the password can then come from PasswordFile)",
                "key": "Username"})
        if self.password and not self.username:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "Upstream:Password is set without Upstream:Username; set both", "key": "Username"})
        if self.public_url:
            public = urlsplit(self.public_url)
            if public.scheme not in ("http", "https") or not public.hostname or public.path.strip("/") \
                    or public.query or public.username:
                raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                    "expected": "Upstream:PublicUrl must be an origin like https://gateway.example.org[:port] "
                                "(no path, no credentials)", "key": "PublicUrl"})
        return self


class ExtraConfigSettings(Section):
    """Known folders, plus any key a site adds for its scripts (``Config["ExtraConfig:Site"]``)."""

    model_config = ConfigDict(extra="allow")

    scripts_root: Annotated[Path, FsPath()] = key(
        "ScriptsRoot", "lua", "folder of `main.lua`, `main-transient.lua`, `main-task.lua`")
    tus_upload_folder: Annotated[Path, FsPath()] = key(
        "TusUploadFolder", "data/tus", "TUS upload store (tusd `filestore` layout)")
    data_folder: Annotated[Path, FsPath()] = key("DataFolder", "data", "task queue, DICOM spool and other state")


class LuaSettings(Section):
    timeout_ms: Annotated[int, Whole(1)] = key(
        "TimeoutMs", 5000, "time budget of one hook call (a loop inside its own `pcall` is aborted too)")
    task_timeout_ms: Annotated[int, Whole(1)] = key("TaskTimeoutMs", 60000, "time budget of one background task")
    max_memory_mb: Annotated[int, Whole(1)] = key("MaxMemoryMB", 64, "memory cap of each Lua runtime")
    fail_open_rule: Annotated[bool | tuple[str, ...], FlagOrNames()] = key(
        "FailOpen", False,
        "a failing hook: `false` fails closed (HTTP: 500 JSON; DICOM: a failure status), `true` logs and carries "
        "on as if the hook were not there; or a list of callback names that fail open, e.g. `[\"onHttpResponse\"]` "
        "(per hook, for `onHttpRequest`, `onHttpResponse`, `IncomingHttpRequestFilter` and `ReceivedInstanceFilter` "
        "on HTTP uploads)")
    reload_interval_ms: Annotated[int, Whole(50)] = key(
        "ReloadIntervalMs", 1000, "how often script files are checked for edits")
    background_workers: Annotated[int, Whole(1)] = key("BackgroundWorkers", 2, "tasks run at once")
    os_execute_timeout: Annotated[float, Number(above=0)] = key(
        "OsExecuteTimeoutSeconds", 60, "`OsExecute` kills a program running longer")
    native_path: Annotated[str, Text()] = key(
        "NativePath", "/usr/lib/x86_64-linux-gnu/lua/5.4/?.so;/usr/local/lib/lua/5.4/?.so",
        "where `requireNative` looks (Lua `cpath` syntax)")
    full_libraries: Annotated[bool, Flag()] = key(
        "FullLibraries", False,
        "give scripts the whole standard library: `os.execute`, `io.popen` (both awaited, within the time budget), "
        "`io.*` and `dofile`/`loadfile` on any path, `os.getenv` (without `DICOMPROXY__*`), `os.remove`... "
        "(README: Lua trust model)")
    task_max_restarts: Annotated[int, Whole(0)] = key(
        "TaskMaxRestarts", 3,
        "a task found `running` at start-up more often than this (the process died under it each time) is "
        "quarantined as failed")
    shared_dict_max_keys: Annotated[int, Whole(1)] = key(
        "SharedDictMaxKeys", 10000, "most entries in `SharedDict` (data shared by every engine)")
    shared_dict_max_mb: Annotated[float, Number(above=0)] = key(
        "SharedDictMaxMB", 16, "most megabytes in `SharedDict` (keys, values, 64 bytes per entry); when full, `set` "
        "evicts the least recently used entries, `add` and `incr` answer `nil, \"no memory\"`")
    scripts_root: Path = internal(Path("lua"))  # ExtraConfig:ScriptsRoot

    @property
    def fail_open(self) -> bool:
        """Every hook fails open (``Lua:FailOpen: true``)."""
        return self.fail_open_rule is True

    @property
    def fail_open_hooks(self) -> frozenset[str]:
        """The callbacks named in ``Lua:FailOpen: [...]`` (empty for true/false)."""
        return frozenset(self.fail_open_rule) if isinstance(self.fail_open_rule, tuple) else frozenset()


class UserEntry(Section):
    """One HTTP user: a password string, or ``{"Password"|"PasswordFile": ..., "Roles": [...]}``."""

    shorthand: ClassVar[str | None] = "Password"
    noun: ClassVar[str] = "a password string or an object with Password or PasswordFile (and Roles)"

    password: Annotated[str, Text(nonempty=True)] = key(
        "Password", REQUIRED, "the user's password, or better its hash: `$argon2id$…`, `$2b$…` (bcrypt), "
        "`$pbkdf2-sha256$…` (passlib) or `pbkdf2_sha256$…` (Django); `dicomproxy hash-password` makes one. A plain "
        "password logs a warning at start-up", secret=True)
    roles: Annotated[tuple[str, ...], Names()] = key(
        "Roles", DEFAULT_USER_ROLES, "the user's roles (`viewer`: proxied reads; `uploader`: TUS and proxied writes; "
        "`admin`: every route, others' uploads and tasks; scripts see them as `request.Roles`)")

    @model_validator(mode="after")
    def _known_hash(self) -> UserEntry:
        try:
            parse_stored(self.password)
        except ValueError as e:  # the value is never shown: it may be a password
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": f"looks like a password hash but is not {e}", "key": "Password"}) from None
        return self


class ApiKeyEntry(Section):
    """One ``X-API-Key`` key: its hash and roles (auth/apikeys.py)."""

    noun: ClassVar[str] = "an object with Hash (or HashFile) and Roles"

    hash: Annotated[str, Text(nonempty=True)] = key(
        "Hash", REQUIRED, "`sha256:<hex>` of the key (`dicomproxy new-api-key` makes a key and its hash)", secret=True)
    roles: Annotated[tuple[str, ...], Names(nonempty=True)] = key("Roles", REQUIRED, "the key's roles")

    @model_validator(mode="after")
    def _hash_form(self) -> ApiKeyEntry:
        try:
            check_hash(self.hash)
        except ValueError as e:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {"expected": f"expected {e}", "key": "Hash"}) from None
        return self


ALGORITHM_NAMES = Names(Choice(*JWT_ALGORITHMS))
ALGORITHM_NAMES.noun = "a list of " + ", ".join(JWT_ALGORITHMS)


class OidcSettings(Section):
    """``Authorization: Bearer`` JWTs from one OpenID issuer (auth/jwks.py, auth/bearer.py)."""

    issuer: Annotated[str, Text()] = key(
        "Issuer", "", "the issuer's URL exactly as its tokens' `iss` (its discovery document is read from "
        "`{Issuer}/.well-known/openid-configuration`); empty: bearer tokens are not accepted")
    audience: Annotated[tuple[str, ...], Names()] = key(
        "Audience", (), "accepted `aud` values (required with an issuer)")
    algorithms: Annotated[tuple[str, ...], ALGORITHM_NAMES] = key(
        "Algorithms", ("RS256", "ES256"), "accepted signature algorithms")
    leeway: Annotated[float, Number(minimum=0)] = key(
        "LeewaySeconds", 30, "clock skew allowed on `exp`, `nbf` and `iat`")
    user_claim: Annotated[str, Text(nonempty=True)] = key(
        "UserClaim", "sub", "the claim that names the user (`request.User`), e.g. `preferred_username`")
    roles_claim: Annotated[str, Text()] = key(
        "RolesClaim", "roles", "the claim holding the roles (a list or a space-separated string); a dotted "
        "path reaches into an object (`realm_access.roles`)")
    role_map: dict[str, Annotated[tuple[str, ...], Names()]] = collection(
        "RoleMap", "`{\"claim value\": [\"gateway role\", ...]}`; when set, only mapped values give roles; "
        "empty: the claim's values are the roles", {})
    default_roles: Annotated[tuple[str, ...], Names()] = key(
        "DefaultRoles", (), "roles every valid token gets besides its own")
    allow_http: Annotated[bool, Flag()] = key(
        "AllowHttp", False, "allow an `http://` issuer and key set (tests only: keys fetched in clear text can "
        "be replaced on the way)")
    ca_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "CaFile", "", "a PEM bundle to trust for the issuer instead of the system's")
    timeout: Annotated[float, Number(above=0)] = key(
        "TimeoutSeconds", 10, "fetching the discovery document or the key set")
    jwks_max_age: Annotated[float, Number(minimum=1)] = key(
        "JwksMaxAgeSeconds", 3600, "the key set is fetched again when older than this")
    jwks_min_refresh: Annotated[float, Number(minimum=1)] = key(
        "JwksMinRefreshSeconds", 30, "a token with an unknown `kid` refetches the key set at most this often")
    token_cache_size: Annotated[int, Whole(0)] = key(
        "TokenCacheSize", 10000, "accepted tokens remembered until they expire (their digests; ~300 bytes each)")

    @model_validator(mode="after")
    def _issuer(self) -> OidcSettings:
        if not self.issuer:
            return self
        scheme = urlsplit(self.issuer).scheme
        if scheme not in ("http", "https") or not urlsplit(self.issuer).hostname:
            raise PydanticCustomError(VALUE_ERROR, "expected {expected}, got {got}", {
                "expected": "an https URL", "got": repr(self.issuer), "key": "Issuer"})
        if scheme == "http" and not self.allow_http:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": f"{self.issuer!r} is not https: keys fetched in clear text can be replaced on the way "
                            "(use https, or set Authentication:Oidc:AllowHttp for a test issuer)", "key": "Issuer"})
        if not self.audience:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "required with Authentication:Oidc:Issuer (the `aud` this gateway accepts)",
                "key": "Audience"})
        return self


class RuleEntry(Section):
    """One role rule (auth/policy.py)."""

    noun: ClassVar[str] = "an object with Path (and Methods, Roles)"

    path: Annotated[str, UrlPath()] = key("Path", REQUIRED, "the canonical path prefix it covers (`/dicomproxy/tasks`)")
    methods: Annotated[tuple[str, ...], Names(upper=True)] = key(
        "Methods", (), "the methods it covers (empty: all)")
    roles: Annotated[tuple[str, ...], Names()] = key(
        "Roles", (), "any one of these roles (or `admin`) is needed; empty: any authenticated caller")


class FailedAttemptsSettings(Section):
    """The failed-attempt limiter (auth/ratelimit.py)."""

    burst: Annotated[int, Whole(0)] = key(
        "Burst", 10, "failed attempts an address may make before 429 (`0`: no limit)")
    per_minute: Annotated[float, Number(above=0)] = key("PerMinute", 6, "attempts an address regains per minute")
    max_addresses: Annotated[int, Whole(1)] = key(
        "MaxAddresses", 10000, "addresses remembered (the one that failed longest ago is forgotten first)")


class AuthenticationSettings(Section):
    users: dict[str, UserEntry] = collection(
        "Users", "`{\"name\": \"password\"}` or `{\"name\": {\"Password\": \"…\", \"Roles\": [\"admin\"]}}` "
        "(`PasswordFile` instead of `Password`: read from a file): HTTP basic users", {})
    api_keys: dict[str, ApiKeyEntry] = collection(
        "ApiKeys", "`{\"name\": {\"Hash\": \"sha256:…\", \"Roles\": [\"uploader\"]}}`: keys clients send as "
        "`X-API-Key`", {})
    oidc: OidcSettings = section("Oidc", "bearer tokens from an OpenID issuer")
    rules: tuple[RuleEntry, ...] = collection(
        "Rules", "role rules `[{\"Path\": \"/dicomproxy/metrics\", \"Methods\": [\"GET\"], \"Roles\": "
        "[\"admin\"]}]` over the built-in ones (the longest matching Path wins; see Authentication)", ())
    failed_attempts: FailedAttemptsSettings = section("FailedAttempts", "failed attempts per source address")
    realm: Annotated[str, Text()] = key("Realm", "DicomProxy", "the realm browsers show")

    @property
    def enabled(self) -> bool:
        """Any scheme configured: then every route but `/dicomproxy/health` needs a credential."""
        return bool(self.users or self.api_keys or self.oidc.issuer)

    @model_validator(mode="after")
    def _rules_need_a_scheme(self) -> AuthenticationSettings:
        if self.rules and not self.enabled:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "role rules without Users, ApiKeys or Oidc:Issuer would never apply (configure a "
                            "scheme, or remove the rules)", "key": "Rules"})
        return self


class ServerSettings(Section):
    """Limits on what an HTTP client may hold before a request reaches the app (http/server.py)."""

    max_head_bytes: Annotated[int, Whole(1024)] = key(
        "MaxHeadBytes", 65536, "largest request head (request line + headers; 431 past it)")
    max_url_bytes: Annotated[int, Whole(256)] = key("MaxUrlBytes", 8192, "largest URL (414 past it)")
    head_timeout: Annotated[float, Number(minimum=0.1)] = key(
        "HeadTimeoutSeconds", 20, "a new connection, or the next request on a kept-alive one, must deliver its "
        "whole head within this (408, then closed)")
    max_connections: Annotated[int, Whole(1)] = key(
        "MaxConnections", 1000, "open HTTP connections served at once (503 past it), lowered to the open-file "
        "limit minus `Server:ReservedFileDescriptors`")
    reserved_fds: Annotated[int, Whole(0)] = key(
        "ReservedFileDescriptors", 256, "descriptors kept for the spool, the DICOM side and the upstream pool")
    shutdown_timeout: Annotated[float, Number(minimum=2)] = key(
        "ShutdownTimeoutSeconds", 30, "after SIGTERM the process exits within this (match systemd's "
        "`TimeoutStopSec`, Kubernetes' `terminationGracePeriodSeconds`): the drain delay, then in-flight HTTP "
        "requests, TUS PATCHes and DICOM associations may finish, then the components stop; what is still running "
        "then is cut short and logged")
    drain_delay: Annotated[float, Number(minimum=0)] = key(
        "DrainDelaySeconds", 0, "after SIGTERM, keep serving this long (part of `Server:ShutdownTimeoutSeconds`) "
        "while `/dicomproxy/health/ready` answers 503, so load balancers stop sending before the listeners close")
    workers: Annotated[int, WorkerCount()] = key(
        "Workers", 1, "HTTP worker processes sharing the `Urls` listeners, each with its own Lua singleton "
        "(`auto`: one per core). The DICOM port, the spool forwarder, background tasks, the Orthanc change feed, "
        "TUS expiry and mail rules run in worker 0 only; a worker that dies is restarted")
    ready_requires_upstream: Annotated[bool, Flag()] = key(
        "ReadyRequiresUpstream", True, "`/dicomproxy/health/ready` answers 503 while the upstream monitor finds the "
        "PACS down")

    @model_validator(mode="after")
    def _drain_fits(self) -> ServerSettings:
        if self.drain_delay > self.shutdown_timeout / 2:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": f"at most half of Server:ShutdownTimeoutSeconds ({self.shutdown_timeout:g}), the rest is "
                            "for in-flight work and the components", "key": "DrainDelaySeconds"})
        return self


CLIENT_CERTIFICATE_MODES = ("None", "Optional", "Required")


class HttpsSettings(Section):
    """The TLS side of the `https://` entries of ``Urls`` (http/tls.py, http/renewal.py, http/hsts.py)."""

    certificate_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "CertificateFile", "", "the server certificate, PEM: the certificate first, then its intermediates (the "
        "file may hold the key too)")
    key_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "KeyFile", "", "its private key, PEM (empty: the key is in `Https:CertificateFile`)")
    key_password: Annotated[str, Text()] = key("KeyPassword", "", "the password of an encrypted key", secret=True)
    pkcs12_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "Pkcs12File", "certificate.pfx", "a PKCS#12 bundle (`.pfx`/`.p12`: certificate, intermediates and key, as "
        "Windows exports it), used when `Https:CertificateFile` is empty; by default `certificate.pfx` in "
        "`ConfigRoot`")
    pkcs12_password: Annotated[str, Text()] = key(
        "Pkcs12Password", "", "the PKCS#12 bundle's password", secret=True)
    minimum_version: Annotated[str, Choice("1.2", "1.3")] = key(
        "MinimumTlsVersion", "1.2", "the oldest TLS version accepted (`1.2` or `1.3`; older ones never are)")
    client_certificate_mode: Annotated[str, Choice(*CLIENT_CERTIFICATE_MODES)] = key(
        "ClientCertificateMode", "None", "client certificates (mutual TLS): `None` (not asked for), `Optional` "
        "(asked for; one that is sent must verify), `Required` (a connection without a valid one is refused)")
    client_ca_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "ClientCaFile", "", "PEM bundle of the CAs client certificates must chain to (required with "
        "`Https:ClientCertificateMode`)")
    reload_interval: Annotated[float, Number(minimum=0)] = key(
        "ReloadIntervalSeconds", 60, "how often the certificate, key and CA files are checked for a renewal, "
        "loaded for new connections without a restart (`0`: never)")
    redirect_http: Annotated[bool, Flag()] = key(
        "RedirectHttp", False, "the `http://` listeners answer 308 to the first `https://` one "
        "(`/dicomproxy/health` and its `/live` and `/ready` probes excepted); needs both in `Urls`")
    hsts: Annotated[bool, Flag()] = key(
        "Hsts", False, "send `Strict-Transport-Security` on every `https` response (never over plain HTTP)")
    hsts_max_age: Annotated[int, Whole(0)] = key(
        "HstsMaxAgeSeconds", 31536000, "its `max-age`: how long browsers use only https for this host")
    hsts_include_subdomains: Annotated[bool, Flag()] = key(
        "HstsIncludeSubDomains", False, "add `includeSubDomains` (only if every host under this name serves https)")

    @property
    def uses_pkcs12(self) -> bool:
        """The certificate comes from the PKCS#12 bundle (no PEM certificate given)."""
        return self.certificate_file is None

    @model_validator(mode="after")
    def _consistent(self) -> HttpsSettings:
        if self.key_file is not None and self.certificate_file is None:
            raise _problem("KeyFile", "needs Https:CertificateFile (the certificate the key belongs to)")
        if self.certificate_file is not None and "pkcs12_file" in self.model_fields_set and self.pkcs12_file:
            raise _problem("Pkcs12File", "give either Https:CertificateFile (PEM) or Https:Pkcs12File, not both")
        if self.client_certificate_mode != "None" and self.client_ca_file is None:
            raise _problem("ClientCaFile", "required with Https:ClientCertificateMode "
                           f"{self.client_certificate_mode} (the CAs client certificates are checked against)")
        if self.client_certificate_mode == "None" and self.client_ca_file is not None:
            raise _problem("ClientCaFile", "would never be used: set Https:ClientCertificateMode to Optional or "
                           "Required (or remove Https:ClientCaFile)")
        return self


class CorsSettings(Section):
    """``Cors:*``; empty lists of headers mean the built-in ones (http/cors.py)."""

    allowed_origins: Annotated[tuple[str, ...], Names()] = key(
        "AllowedOrigins", (), "origins allowed cross-origin access (`[\"https://viewer.example.org\"]`, "
        "`[\"*\"]`); empty: every preflight is refused")
    allowed_methods: Annotated[tuple[str, ...], Names(upper=True)] = key(
        "AllowedMethods", ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"), "what a preflight may ask for")
    allowed_headers: Annotated[tuple[str, ...], Names()] = key(
        "AllowedHeaders", (), "request headers a preflight may ask for (empty: those TUS clients and DICOMweb "
        "viewers need)")
    exposed_headers: Annotated[tuple[str, ...], Names()] = key(
        "ExposedHeaders", (), "response headers the browser may read (empty: those TUS clients and DICOMweb "
        "viewers need)")
    allow_credentials: Annotated[bool, Flag()] = key(
        "AllowCredentials", False, "`Access-Control-Allow-Credentials`")
    max_age: Annotated[int, Whole(0)] = key("MaxAgeSeconds", 600, "how long a browser keeps a preflight's answer")
    opener_policy: Annotated[str, Text()] = key(
        "CrossOriginOpenerPolicy", "", "added to every response when set (e.g. `same-origin` for viewers that "
        "need `SharedArrayBuffer`)")
    embedder_policy: Annotated[str, Text()] = key(
        "CrossOriginEmbedderPolicy", "", "added to every response when set (e.g. `require-corp`)")
    resource_policy: Annotated[str, Text()] = key(
        "CrossOriginResourcePolicy", "", "added to every response when set")


class TusS3Settings(Section):
    bucket: Annotated[str, Text()] = key("Bucket", "", "the bucket uploads live in (required with `Tus:Store` `s3`)")
    prefix: Annotated[str, Text()] = key(
        "Prefix", "", "prepended to every object's key (`uploads/`), as tusd's `-s3-object-prefix`")
    endpoint: Annotated[str, Text()] = key(
        "Endpoint", "", "the S3 API's URL for a store that is not AWS (`http://seaweedfs:8333`, MinIO, Ceph); "
        "empty: AWS for `Tus:S3:Region`")
    region: Annotated[str, Text()] = key("Region", "us-east-1", "the bucket's region")
    access_key: Annotated[str, Text()] = key(
        "AccessKey", "", "the access key id (empty: the usual AWS sources, environment, profile, instance role)")
    secret_key: Annotated[str, Text()] = key(
        "SecretKey", "", "its secret (or `SecretKeyFile`)", secret=True)
    part_size_mb: Annotated[float, Number(minimum=5)] = key(
        "PartSizeMB", 8,
        "bytes per S3 part; a PATCH holds at most one part in memory (S3's minimum is 5 MiB; an upload may "
        "have 10 000 parts, so 8 MiB parts reach 78 GiB)")
    quota_reconcile: Annotated[float, Number(minimum=0.5)] = key(
        "QuotaReconcileSeconds", 60,
        "how often `Tus:MaxStorageGB` and `Tus:MaxUploadsPerUser`, counted for all replicas, are recounted from "
        "the bucket (one replica per round; the count drifts when a replica dies mid-request or the bucket's "
        "lifecycle rule aborts uploads); each round lists the prefix and reads every `.info` object; it also "
        "hands over completions a killed replica left pending")

    @property
    def part_size(self) -> int:
        """``Tus:S3:PartSizeMB`` in bytes."""
        return int(self.part_size_mb * MiB)


class ClusterSettings(Section):
    redis: Annotated[str, Text()] = key(
        "Redis", "",
        "`redis://host:6379/0` (or `rediss://` for TLS, `unix:///path`) of a Redis-protocol server the replicas "
        "share: TUS upload locks (with `Tus:Store` `s3`), background tasks, the notification feed and its live "
        "stream, Lua's `SharedDict`; empty: one machine, nothing shared")
    redis_password: Annotated[str, Text()] = key(
        "RedisPassword", "", "the Redis password (or `RedisPasswordFile`); overrides one in the URL", secret=True)
    lock_lease: Annotated[float, Number(minimum=1)] = key(
        "LockLeaseSeconds", 10,
        "how long an upload's lock outlives a replica that died holding it (renewed every third of it while held)")
    lease_seconds: Annotated[float, Number(minimum=1)] = key(
        "TaskLeaseSeconds", 30, "a running task's lease, renewed while it runs; a replica that died holding it "
        "loses it after this long and another replica runs the task again")
    task_keep: Annotated[int, Whole(1)] = key(
        "TaskKeep", 500, "finished tasks kept in Redis (the oldest go first)")

    @model_validator(mode="after")
    def _redis_url(self) -> ClusterSettings:
        if not self.redis:
            return self
        parts = urlsplit(self.redis)
        if parts.scheme not in ("redis", "rediss", "unix") or not (parts.hostname or parts.path):
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "Cluster:Redis must be redis://HOST:PORT/DB, rediss://... (TLS) or unix:///path",
                "key": "Redis"})
        if parts.password:  # config views and logs show this key: the password has its own, secret key
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "Cluster:Redis holds a password: move it to Cluster:RedisPassword (or RedisPasswordFile)",
                "key": "Redis"})
        return self


class TusSettings(Section):
    base_path: Annotated[str, UrlPath(folder=True)] = key("BasePath", "/files/", "the TUS endpoint")
    max_size: Annotated[int, Whole(0)] = key(
        "MaxSize", 20 * GiB,
        "largest upload in bytes, announced as `Tus-Max-Size`; larger: 413 `ERR_MAX_SIZE_EXCEEDED` (default 20 GiB, "
        "which holds the largest single studies, tomosynthesis, whole-slide images, thin-slice CT with priors, as "
        "one ZIP; `0`: no limit)")
    expire_after: Annotated[float, Duration()] = key(
        "ExpireAfter", "1.00:00:00", "unfinished uploads expire after this (seconds or `d.hh:mm:ss`; `0`: never)")
    sweep_interval: Annotated[float, Number(minimum=0.05)] = key(
        "SweepIntervalSeconds", 60, "how often expired uploads are removed")
    keep_after_import: Annotated[bool, Flag()] = key(
        "KeepAfterImport", False, "keep an upload's files after a successful import")
    import_batch_size: Annotated[int, Whole(1)] = key(
        "ImportBatchSize", 50, "instances sent to the PACS per STOW-RS request when an upload is imported")
    lock_timeout: Annotated[float, Number(minimum=0)] = key(
        "LockTimeoutSeconds", 20, "how long a request waits for an upload another request holds")
    fsync: Annotated[str, Choice("complete", "patch", "none")] = key(
        "Fsync", "complete",
        "when stored bytes are fsynced: `complete` (before the final PATCH is answered), `patch` (before every "
        "PATCH is answered), `none` (bytes still reach the kernel before an offset is acknowledged, so they "
        "survive a crash of the process, not of the machine); any case")
    allow_download: Annotated[bool, Flag()] = key(
        "AllowDownload", False,
        "`GET` of an upload (tusd's download), for its owner and admins; off: 405, as tusd's `-disable-download`")
    max_storage_gb: Annotated[float, Number(minimum=0)] = key(
        "MaxStorageGB", 100,
        "GiB all uploads' data files may take together; full: 507 `ERR_STORAGE_FULL` (`0`: no limit)")
    min_free_disk_gb: Annotated[float, Number(minimum=0)] = key(
        "MinFreeDiskGB", 1,
        "GiB kept free on the upload folder's disk (the spool and the task queue usually share it); below: 507 "
        "(`0`: off)")
    max_uploads_per_user: Annotated[int, Whole(0)] = key(
        "MaxUploadsPerUser", 500,
        "unfinished uploads one user may have (without authentication: all clients together); more: 429 "
        "`ERR_TOO_MANY_UPLOADS` (`0`: no limit)")
    write_buffer_mb: Annotated[float, Number(minimum=1)] = key(
        "WriteBufferMB", 64,
        "upload bytes all requests together hold in memory before they are written (each request batches up to "
        "4 MB, twice)")
    write_buffer_wait: Annotated[float, Number(minimum=0.1)] = key(
        "WriteBufferWaitSeconds", 10, "how long a request waits for room in that buffer before 503 `ERR_SERVER_BUSY`")
    zip_max_expanded_gb: Annotated[float, Number(minimum=0)] = key(
        "ZipMaxExpandedGB", 100, "GiB a ZIP's members may expand to together (`0`: no limit)")
    zip_max_ratio: Annotated[float, Number(minimum=0)] = key(
        "ZipMaxRatio", 100,
        "expanded/compressed size allowed per ZIP member (members under 1 MiB are exempt) and for the whole ZIP; "
        "DICOM images compress 2-10 times, a zip bomb about 1000 (`0`: off). A ZIP of mostly empty segmentations "
        "(SEG) can pass 100: raise it for those")
    zip_max_members: Annotated[int, Whole(0)] = key(
        "ZipMaxMembers", 100_000,
        "entries a ZIP may list, checked before its directory is read (each costs ~600 bytes of memory; `0`: no limit)")
    store: Annotated[str, Choice("file", "s3")] = key(
        "Store", "file",
        "where uploads live: `file` (the upload folder, tusd's filestore layout) or `s3` (a bucket, tusd's "
        "s3store layout: replicas behind a load balancer share uploads; see `Cluster:Redis`)")
    s3: TusS3Settings = section("S3", "the bucket of `Tus:Store` `s3`")
    upload_folder: Path = internal(Path("data/tus"))  # ExtraConfig:TusUploadFolder

    @model_validator(mode="after")
    def _s3_bucket(self) -> TusSettings:
        if self.store == "s3" and not self.s3.bucket:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "Tus:Store is s3 but Tus:S3:Bucket is empty; name the bucket", "key": "Store"})
        return self

    @property
    def max_storage(self) -> int:
        """``Tus:MaxStorageGB`` in bytes (0: no limit)."""
        return int(self.max_storage_gb * GiB)

    @property
    def min_free_disk(self) -> int:
        """``Tus:MinFreeDiskGB`` in bytes (0: off)."""
        return int(self.min_free_disk_gb * GiB)

    @property
    def write_buffer(self) -> int:
        """``Tus:WriteBufferMB`` in bytes."""
        return int(self.write_buffer_mb * MiB)

    @property
    def zip_max_expanded(self) -> int:
        """``Tus:ZipMaxExpandedGB`` in bytes (0: no limit)."""
        return int(self.zip_max_expanded_gb * GiB)


class StatusPattern(Text):
    """A DIMSE status pattern: four hex digits, ``x`` for any (``A7xx``)."""

    noun = "a status pattern (four hex digits, x for any: A7xx)"

    def parse(self, value: Any, root: Path) -> str:
        text = super().parse(value, root).strip().upper()
        if not re.fullmatch(r"[0-9A-FX]{4}", text):
            raise self.fail(value)
        return text


INHERIT = "Inherit"
"""A per-AE override left unset: the global setting applies."""


class RemoteAe(Section):
    """A remote DICOM node."""

    noun: ClassVar[str] = "an object with Aet, Host and Port"

    aet: Annotated[str, AeTitle()] = key("Aet", REQUIRED, "its AE title")
    host: Annotated[str, Text(nonempty=True)] = key("Host", REQUIRED, "its host name or IP address")
    port: Annotated[int, Whole(1, 65535)] = key("Port", REQUIRED, "its DICOM port")
    tls: Annotated[bool, Flag()] = key(
        "Tls", False, "associate over TLS (PS3.15 BCP 195 profile: TLS 1.2+, ECDHE with AES-GCM); the peer's "
        "certificate is verified")
    tls_ca: Annotated[Path | None, FsPath(optional=True)] = key(
        "TlsCa", "", "PEM CA bundle the peer's certificate must chain to (empty: the system's CAs)")
    tls_certificate: Annotated[Path | None, FsPath(optional=True)] = key(
        "TlsCertificate", "", "PEM client certificate (chain) the gateway presents to this peer (empty: "
        "`Dicom:Tls:Certificate`, if set)")
    tls_key: Annotated[Path | None, FsPath(optional=True)] = key(
        "TlsKey", "", "PEM private key of `TlsCertificate`")
    tls_key_password: Annotated[str, Text()] = key(
        "TlsKeyPassword", "", "password of an encrypted `TlsKey`", secret=True)
    tls_check_hostname: Annotated[bool, Flag()] = key(
        "TlsCheckHostname", True, "the peer's certificate must name `Host` (DNS name or IP address SAN); turn off "
        "only for a certificate without one, still verified against `TlsCa`")
    transcode: Annotated[str, Choice(INHERIT, "Never", "ToAccepted")] = key(
        "Transcode", INHERIT, "`Dicom:Transcode` for what is sent to this AE (relayed or forwarded to it, a C-MOVE "
        "to it fetched and stored, a C-GET it asks for when its AE title is this entry's, a `send` to it): "
        "`Never`, `ToAccepted`, or `Inherit` (the global `Dicom:Transcode`)")
    transcode_max_mb: Annotated[int, Whole(0)] = key(
        "TranscodeMaxMB", 0, "`Dicom:TranscodeMaxMB` for this AE (`0`: the global one)")

    @model_validator(mode="after")
    def _tls_pair(self) -> RemoteAe:
        if (self.tls_certificate is None) != (self.tls_key is None):
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "TlsCertificate and TlsKey go together: give both or neither", "key": "TlsKey"})
        return self


class DicomTlsSettings(Section):
    """``Dicom:Tls``: the gateway's own TLS port (PS3.15 BCP 195 profile)."""

    enabled: Annotated[bool, Flag()] = key(
        "Enabled", False, "open the DICOM TLS port (storage and Query/Retrieve, the same policy as the plain port)")
    port: Annotated[int, Whole(1, 65535)] = key(
        "Port", 2762, "the TLS port (2762 is IANA's dicom-tls); a port of its own beside `Dicom:Port`, as dcm4chee "
        "does, so modalities move to TLS one at a time")
    only: Annotated[bool, Flag()] = key(
        "Only", False, "serve only the TLS port: `Dicom:Port` is not opened")
    certificate: Annotated[Path | None, FsPath(optional=True)] = key(
        "Certificate", "", "PEM certificate (chain) of the gateway; also its client certificate towards remote AEs "
        "without their own `TlsCertificate`")
    key_file: Annotated[Path | None, FsPath(optional=True)] = key("Key", "", "PEM private key of `Certificate`")
    key_password: Annotated[str, Text()] = key("KeyPassword", "", "password of an encrypted `Key`", secret=True)
    client_ca: Annotated[Path | None, FsPath(optional=True)] = key(
        "ClientCa", "", "PEM CA bundle a modality's client certificate must chain to")
    require_client_certificate: Annotated[bool, Flag()] = key(
        "RequireClientCertificate", True, "refuse a TLS connection without a client certificate from `ClientCa` "
        "(PS3.15's profiles authenticate both nodes); `false`: encryption only, any client")

    @model_validator(mode="after")
    def _complete(self) -> DicomTlsSettings:
        problem = None
        if self.enabled and (self.certificate is None or self.key_file is None):
            problem = "Certificate", "Dicom:Tls:Enabled needs Dicom:Tls:Certificate and Dicom:Tls:Key (PEM files)"
        elif self.certificate is not None and self.key_file is None:
            problem = "Key", "Dicom:Tls:Certificate needs Dicom:Tls:Key"
        elif self.enabled and self.require_client_certificate and self.client_ca is None:
            problem = "ClientCa", ("Dicom:Tls:RequireClientCertificate needs Dicom:Tls:ClientCa (the CA of the "
                                   "modalities' certificates); or set RequireClientCertificate to false")
        elif self.only and not self.enabled:
            problem = "Only", "Dicom:Tls:Only needs Dicom:Tls:Enabled"
        if problem is not None:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {"expected": problem[1], "key": problem[0]})
        return self


class PacsAe(RemoteAe):
    """``Dicom:Upstream``: the PACS's DICOM side (every part has a default, so one can be overridden alone)."""

    aet: Annotated[str, AeTitle()] = key("Aet", "ORTHANC", "the PACS's AE title")
    host: Annotated[str, Text(nonempty=True)] = key("Host", "127.0.0.1", "the PACS's DICOM host")
    port: Annotated[int, Whole(1, 65535)] = key("Port", 4242, "the PACS's DICOM port")
    ae_titles: Annotated[str, Choice("Modality", "Gateway")] = key(
        "AeTitles", "Modality", "the AE titles instances reach the PACS with: `Modality` (the modality's calling AE "
        "title and the called AE title it asked for, so the PACS's per-modality rules and its `RemoteAET`/"
        "`CalledAET` metadata see the modality; the PACS must then accept those titles, e.g. Orthanc's "
        "`DicomAlwaysAllowStore` or an entry per modality in `DicomModalities`) or `Gateway` (`Dicom:Aet` "
        "calling this `Aet`)")


class ModalityAe(RemoteAe):
    """A ``Dicom:Modalities`` entry: a C-MOVE destination (and a ``send`` target)."""

    retrieve: Annotated[str, Choice("Auto", "Relay", "FetchAndStore")] = key(
        "Retrieve", "Auto", "how a C-MOVE to this AE is served: `Relay` passes the C-MOVE to the PACS, which moves "
        "the instances there itself (the PACS must know this AE title), with its status and counts; "
        "`FetchAndStore` fetches them from the PACS with C-GET and stores them there; `Auto` relays and, when the "
        "PACS answers that it cannot move there (0xA801, or 0xC000 before any sub-operation as Orthanc 1.10 does, "
        "when the request does match instances), fetches instead (remembered for 10 minutes)")


BALANCING_MODES = ("Failover", "RoundRobin", "LeastConnections")
DEFAULT_UPSTREAM = "default"


class HealthCheckSettings(Section):
    """How a named upstream's health is checked (active) and judged from traffic (passive)."""

    path: Annotated[str, Text()] = key(
        "Path", "", "HTTP path the gateway GETs on the upstream's `Url` (`/system` for Orthanc, "
        "`/dicom-web/studies?limit=1`); any answer below 500 is healthy. Empty: no HTTP check")
    echo: Annotated[bool, Flag()] = key(
        "Echo", False, "C-ECHO the upstream's DICOM side as a check (needs its `Dicom:Port`)")
    interval: Annotated[float, Number(minimum=0.1)] = key(
        "IntervalSeconds", 5, "time between active checks (also how soon an ejected member is tried again)")
    timeout: Annotated[float, Number(above=0)] = key(
        "TimeoutSeconds", 2, "an active check slower than this failed")
    failures: Annotated[int, Whole(1)] = key(
        "Failures", 3, "consecutive failures (active checks, proxied requests that could not connect or got a "
        "5xx from the upstream itself, associations with its DICOM side that were refused, timed out or rejected) "
        "that eject a member from its groups")
    successes: Annotated[int, Whole(1)] = key(
        "Successes", 2, "consecutive successful active checks that bring an ejected member back")


class ServerAe(PacsAe):
    """A named upstream's DICOM side; ``Port`` 0 (the default) means it has none."""

    host: Annotated[str, Text()] = key("Host", "", "its DICOM host (empty: the host of its `Url`)")
    port: Annotated[int, Whole(0, 65535)] = key("Port", 0, "its DICOM port (`0`: no DICOM side)")


class ServerEntry(UpstreamSettings):
    """An ``Upstreams:Servers`` entry (``servers.json``): one PACS, its HTTP root and DICOM side."""

    noun: ClassVar[str] = "an object with Url (and Dicom, Weight, HealthCheck, the keys of Upstream)"

    url: Annotated[str, HttpUrl()] = key("Url", REQUIRED, "its HTTP root (as `Upstream:Url`)")
    weight: Annotated[int, Whole(1)] = key(
        "Weight", 1, "its share of a `RoundRobin` group's requests (weight 2 gets twice weight 1's)")
    dicom: ServerAe = section("Dicom", "its DICOM side (as `Dicom:Upstream`; `Port` 0: none)")
    health_check: HealthCheckSettings = section("HealthCheck", "its health checks")

    @property
    def dicom_host(self) -> str:
        """Its DICOM host: ``Dicom:Host``, or the host of ``Url``."""
        return self.dicom.host or (urlsplit(self.url).hostname or "")


class GroupEntry(Section):
    """An ``Upstreams:Groups`` entry: upstreams served as one, by a balancing mode."""

    noun: ClassVar[str] = "an object with Members (and Mode, Federated)"

    members: Annotated[tuple[str, ...], Names(nonempty=True)] = key(
        "Members", REQUIRED, "the servers of the group (names from `Upstreams:Servers`, or `default`), in order: "
        "for `Failover` the first healthy one serves")
    mode: Annotated[str, Choice(*BALANCING_MODES)] = key(
        "Mode", "Failover", "`Failover` (the first healthy member in `Members` order: a primary and its "
        "secondaries), `RoundRobin` (healthy members in turn, by `Weight`) or `LeastConnections` (the healthy "
        "member with the fewest requests in flight)")
    federated: Annotated[bool, Flag()] = key(
        "Federated", False, "QIDO-RS and C-FIND on the group ask every healthy member and merge the answers by UID "
        "(a header or a log line names the members that did not answer); C-MOVE/C-GET are served by the member "
        "that holds the data")


class HttpRoute(Section):
    """An ``Upstreams:Routes`` entry: which upstream serves a request (the first matching route wins)."""

    noun: ClassVar[str] = "an object with Upstream (and Path, Host, Header, Methods)"

    path: Annotated[str, UrlPath()] = key(
        "Path", "/", "the canonical path prefix it covers (`/dicom-web/studies`)")
    host: Annotated[str, Text()] = key(
        "Host", "", "the request's `Host` without its port, any case (empty: any)")
    header: Annotated[str, Text()] = key(
        "Header", "", "`Name: value` (that header with exactly that value) or `Name` (present); empty: any")
    methods: Annotated[tuple[str, ...], Names(upper=True)] = key(
        "Methods", (), "the methods it covers (empty: all)")
    upstream: Annotated[str, Text(nonempty=True)] = key(
        "Upstream", REQUIRED, "the server or group that serves what the route matches")


class UpstreamsSettings(Section):
    """``Upstreams`` (or ``servers.json`` beside ``appsettings.json``): several PACS behind one gateway."""

    servers: dict[str, ServerEntry] = collection(
        "Servers", "named upstreams: `{\"archive\": {\"Url\": \"http://pacs1:8042\", \"Dicom\": {\"Aet\": \"PACS1\", "
        "\"Port\": 4242}}}`; `default` is the pair `Upstream` + `Dicom:Upstream` and may not be redefined", {})
    groups: dict[str, GroupEntry] = collection(
        "Groups", "named groups of servers with a balancing mode: `{\"main\": {\"Members\": [\"archive\", "
        "\"backup\"], \"Mode\": \"Failover\"}}`", {})
    default: Annotated[str, Text()] = key(
        "Default", "", "the server or group that serves what no route matches (empty: `default`, i.e. `Upstream`)")
    routes: tuple[HttpRoute, ...] = collection(
        "Routes", "HTTP routing rules, first match wins; a script may choose instead with "
        "`request:SetUpstream(\"name\")` in `onHttpRequest`", ())

    @model_validator(mode="after")
    def _names_resolve(self) -> UpstreamsSettings:
        if DEFAULT_UPSTREAM in self.servers:
            raise _problem(f"Servers:{DEFAULT_UPSTREAM}", "is the pair Upstream + Dicom:Upstream: give this server "
                           "another name")
        clash = sorted(set(self.servers) & set(self.groups))
        if clash:
            raise _problem(f"Groups:{clash[0]}", "a server has this name too: names are shared by servers and "
                           "groups")
        servers = set(self.servers) | {DEFAULT_UPSTREAM}
        for name, group in self.groups.items():
            for member in group.members:
                if member not in servers:
                    raise _problem(f"Groups:{name}:Members", f"{member!r} is not a server (known: "
                                   f"{', '.join(sorted(servers))})")
        known = servers | set(self.groups)
        if self.default and self.default not in known:
            raise _problem("Default", f"{self.default!r} is neither a server nor a group")
        for i, route in enumerate(self.routes):
            if route.upstream not in known:
                raise _problem(f"Routes:{i}:Upstream", f"{route.upstream!r} is neither a server nor a group "
                               f"(known: {', '.join(sorted(known))})")
        return self

    def names(self) -> frozenset[str]:
        """Every server and group name, ``default`` included."""
        return frozenset(self.servers) | frozenset(self.groups) | {DEFAULT_UPSTREAM}

    def dicom_names(self) -> frozenset[str]:
        """Servers with a DICOM side (``default`` always has one) and the groups of only such servers."""
        servers = {n for n, s in self.servers.items() if s.dicom.port} | {DEFAULT_UPSTREAM}
        return frozenset(servers) | frozenset(n for n, g in self.groups.items() if set(g.members) <= servers)


class DicomRoute(Section):
    """A ``Dicom:Routes`` entry: where received instances go (the first matching route wins)."""

    noun: ClassVar[str] = "an object with Destinations (and CallingAet, CalledAet, Modality, Tags)"

    calling_aet: Annotated[str, Text()] = key("CallingAet", "", "the modality's AE title (empty: any)")
    called_aet: Annotated[str, Text()] = key(
        "CalledAet", "", "the AE title the modality called (empty: any): one port can serve several \"virtual "
        "AEs\"; a called AE title named here is accepted by `CheckCalledAet`")
    modality: Annotated[str, Text()] = key("Modality", "", "the instance's Modality (0008,0060) (empty: any)")
    tags: dict[str, Annotated[str, Text()]] = collection(
        "Tags", "other tags, by keyword or `gggg,eeee`, and the value each must have (`*` and `?` wildcards, as in "
        "C-FIND): `{\"InstitutionName\": \"North*\"}`", {})
    destinations: Annotated[tuple[str, ...], Names(nonempty=True)] = key(
        "Destinations", REQUIRED, "where the instances go: upstreams with a DICOM side, groups of them, or "
        "`Dicom:Modalities` names; each destination has its own spool lane, retries and failures")


class DicomSettings(Section):
    aet: Annotated[str, AeTitle()] = key("Aet", "DICOMPROXY", "the gateway's AE title")
    port: Annotated[int, Whole(0, 65535)] = key("Port", 11112, "the DICOM side's port (`0` turns it off)")
    host: Annotated[str, Text(nonempty=True)] = key(
        "Host", "127.0.0.1", "where the DICOM side listens (loopback by default; `0.0.0.0` for all interfaces)")
    upstream: PacsAe = section("Upstream", "the PACS's DICOM side")
    tls: DicomTlsSettings = section("Tls", "the DICOM TLS port")
    modalities: dict[str, ModalityAe] = collection(
        "Modalities", "named remote AEs: `{\"name\":{\"Aet\":..,\"Host\":..,\"Port\":..}}` (C-MOVE destinations; a "
        "C-MOVE to an AE title not listed here is refused with 0xA801)", {})
    allowed_calling_aets: Annotated[tuple[str, ...], Names(AeTitle())] = key(
        "AllowedCallingAets", (), "calling AEs allowed to associate (empty: all; an AE title is not a password, "
        "so keep `Dicom:Host` on a trusted network, or use `Dicom:AllowedAddresses` and `Dicom:Tls`). Refused: "
        "A-ASSOCIATE-RJ permanent, reason 3 \"calling AE title not recognized\"")
    blocked_calling_aets: Annotated[tuple[str, ...], Names(AeTitle())] = key(
        "BlockedCallingAets", (), "calling AEs always refused (A-ASSOCIATE-RJ permanent, reason 3), even when "
        "`AllowedCallingAets` lists them")
    allowed_addresses: Annotated[tuple[str, ...], Names(Cidr())] = key(
        "AllowedAddresses", (), "source addresses or CIDR networks allowed to associate, IPv4 and IPv6 "
        "(`[\"10.1.0.0/16\", \"2001:db8::/32\"]`; empty: any). Refused: A-ASSOCIATE-RJ permanent, reason 1 "
        "\"no reason given\" (PS3.8 has no address reason)")
    check_called_aet: Annotated[bool, Flag()] = key(
        "CheckCalledAet", True, "refuse an association whose called AE title is not `Dicom:Aet` nor the PACS's "
        "`Dicom:Upstream:Aet` (A-ASSOCIATE-RJ permanent, reason 7 \"called AE title not recognized\"; a modality "
        "moved over unchanged still calls the PACS, which the gateway stands in for); Orthanc's "
        "`DicomCheckCalledAet`, but on by default: a modality aimed at the wrong AE is a configuration error worth "
        "seeing")
    ae_permissions: dict[str, Annotated[tuple[str, ...], Names(Choice("store", "find", "move", "get"))]] = collection(
        "AePermissions", "operations per calling AE: `{\"CT1\": [\"store\"], \"VIEWER\": [\"find\", \"move\"], "
        "\"*\": []}`; `*` is every AE not listed; an AE not listed without `*`: everything. C-ECHO is always "
        "allowed. A refused operation is answered 0x0124 \"Refused: Not Authorized\"", {})
    forward_via: Annotated[str, Choice("dimse", "dicomweb")] = key(
        "ForwardVia", "dimse", "forward stored instances by C-STORE (`dimse`) or STOW-RS (`dicomweb`)")
    spool_folder: Annotated[Path, FsPath()] = key("SpoolFolder", "data/spool", "durable store-and-forward spool")
    forward_retry: Annotated[float, Number(minimum=0.01)] = key(
        "ForwardRetrySeconds", 2, "retry delay after a transient failure (doubles up to `ForwardMaxRetrySeconds`)")
    forward_max_retry: Annotated[float, Number(minimum=0.01)] = key(
        "ForwardMaxRetrySeconds", 60, "longest retry delay")
    forward_max_attempts: Annotated[int, Whole(0)] = key(
        "ForwardMaxAttempts", 10, "C-STOREs tried per instance before it goes to `<SpoolFolder>/failed/` (a `.json` "
        "note says why, a `forward.failed` event is raised; `/dicomproxy/spool/failed` retries or discards it). "
        "Counted per instance, each with its own backoff: a failure status in `ForwardRetryStatuses`, an aborted or "
        "timed-out C-STORE, the PACS rejecting the instance's AE titles. A PACS that cannot be reached charges no "
        "instance: forwarding waits for it. `0`: no limit")
    forward_retry_statuses: Annotated[tuple[str, ...], Names(StatusPattern())] = key(
        "ForwardRetryStatuses", ("A7xx", "0110", "0210", "0213"), "C-STORE failure statuses retried (four hex "
        "digits, `x` for any): out of resources, processing failure, duplicate invocation, resource limitation. Any "
        "other failure status (0xA9xx, 0xCxxx, 0x0122, 0x0124...) sends the instance to `failed/` at once")
    forward_concurrency: Annotated[int, Whole(1)] = key(
        "ForwardConcurrency", 4, "studies forwarded in parallel (each study in arrival order); also the most "
        "associations the forwarder holds open to the PACS (one per lane, for one pair of AE titles at a time)")
    store_mode: Annotated[str, Choice("RelayOrSpool", "Relay", "StoreAndForward")] = key(
        "StoreMode", "RelayOrSpool", "`RelayOrSpool`: each modality association is mirrored by one to the PACS "
        "(same AE titles and presentation contexts) and every C-STORE answer is the PACS's own, given after the "
        "PACS's; when the PACS cannot be reached the association is served from the spool instead (success once "
        "spooled, forwarded later). `Relay`: the same, and the association is rejected (transient) when the PACS "
        "cannot be reached. `StoreAndForward`: answer once spooled, forward later (the presentation contexts are "
        "still the PACS's answer, see `NegotiationCacheSeconds`). With `ForwardVia` `dicomweb` there is no DIMSE "
        "association to mirror: every mode stores and forwards")
    negotiation_cache_seconds: Annotated[float, Number(minimum=0)] = key(
        "NegotiationCacheSeconds", 300, "store-and-forward and the spool fallback: the PACS's answer to a "
        "modality's presentation contexts (asked with one association carrying the same proposal) is reused this "
        "long; it is asked again after a forward the PACS refused for its context. `0`: accept every storage SOP "
        "class and transfer syntax without asking")
    transcode: Annotated[str, Choice("Never", "ToAccepted")] = key(
        "Transcode", "Never", "`Never`: instances are sent in the transfer syntax they came in, or not at all "
        "(transparent). `ToAccepted`: when a destination (the PACS, a C-MOVE destination, a `send` target) "
        "accepts the SOP class but not the instance's compressed transfer syntax, the gateway decodes it (pydicom "
        "with pylibjpeg: JPEG, JPEG-LS, JPEG 2000, HTJ2K, RLE) and sends it in a syntax the destination accepted "
        "(Explicit VR Little Endian first, then Implicit); a modality's compressed context is then accepted when "
        "the PACS accepts its SOP class uncompressed. Decoding is lossless: the pixels are those the codec "
        "decodes. The spool keeps the instance as it came. Memory: one decoded instance at a time per association "
        "(see `TranscodeMaxMB`). A destination may override it with its own `Transcode`")
    transcode_max_mb: Annotated[int, Whole(1)] = key(
        "TranscodeMaxMB", 512, "largest decoded pixel data (rows x columns x samples x bits x frames) the gateway "
        "transcodes; a larger instance is refused for that destination with the reason in the log (transcoding "
        "holds the compressed and the decoded instance in memory)")
    artim_seconds: Annotated[float, Number(minimum=0.1)] = key(
        "ArtimSeconds", 30, "ARTIM (PS3.8 9.1.5): a connection must deliver its whole A-ASSOCIATE-RQ within this "
        "many seconds of being accepted, however slowly its bytes come, or it is closed; also how long the gateway "
        "waits for a peer to close after a reject, abort or release")
    max_associations: Annotated[int, Whole(1)] = key(
        "MaxAssociations", 64, "established associations (storage and Query/Retrieve); a request beyond it gets "
        "A-ASSOCIATE-RJ \"local limit exceeded\" (transient). Connections still sending their request do not count")
    max_connections_per_address: Annotated[int, Whole(1)] = key(
        "MaxConnectionsPerAddress", 16, "open connections from one source address; a request on one more gets the "
        "same A-ASSOCIATE-RJ (a silent one is closed after a second). Raise it for many modalities behind one "
        "NAT address")
    max_connections: Annotated[int, Whole(1)] = key(
        "MaxConnections", 256, "open DICOM connections in all; one more is closed at once")
    qr_timeout: Annotated[float, Number(minimum=1)] = key(
        "QueryRetrieveTimeoutSeconds", 300, "during a C-FIND, C-GET or C-MOVE through the gateway, the longest wait "
        "for the PACS's next message (a response, the next piece of an instance), a move destination's or the "
        "requester's answer to a sub-operation, or a peer to read what the gateway sends; past it the operation "
        "fails and its associations are aborted")
    max_dataset_mb: Annotated[int, Whole(1)] = key(
        "MaxDatasetMB", 4096, "largest data set one C-STORE may send; a larger one aborts the association "
        "(nothing is kept). Data sets are streamed to the spool as they arrive, so memory does not grow with "
        "their size")
    routes: tuple[DicomRoute, ...] = collection(
        "Routes", "C-STORE routing rules, first match wins (none matches: `Dicom:Upstream`); `onCStore` may "
        "return destinations instead (`return {\"archive\", \"ai-node\"}`)", ())
    query_upstream: Annotated[str, Text()] = key(
        "QueryUpstream", "", "the upstream or group that C-FIND, C-MOVE and C-GET are served from (a `Federated` "
        "group asks every member); empty: `Dicom:Upstream`")
    uid_root: Annotated[str, Text()] = key(
        "UidRoot", "", "the root of the UIDs `NewUid()` makes (your organisation's, e.g. `1.2.826.0.1.3680043.10.999`, "
        "at most 33 characters); empty: UUID-derived `2.25.` UIDs (PS3.5 B.2)")

    @model_validator(mode="after")
    def _valid_uid_root(self) -> DicomSettings:
        problem = root_problem(self.uid_root) if self.uid_root else None
        if problem is not None:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": f"a UID root (digits and dots, PS3.5 9.1) but {problem}", "key": "UidRoot"})
        return self


class SmtpSettings(Section):
    host: Annotated[str, Text()] = key("Host", "", "the mail server (empty: no mail)")
    port: Annotated[int, Whole(1, 65535)] = key("Port", 25, "its port")
    security: Annotated[str, Choice("None", "StartTls", "Tls")] = key(
        "Security", "None", "`None` (plain text), `StartTls`, `Tls`; a password is sent in plain text only to a "
        "loopback host")
    username: Annotated[str, Text()] = key("Username", "", "login (empty: none)")
    password: Annotated[str, Text()] = key("Password", "", "login password", secret=True)
    sender: Annotated[str, Text()] = key("From", "dicomproxy@localhost", "the sender address")
    timeout: Annotated[float, Number(minimum=0.1)] = key("TimeoutSeconds", 30, "per-attempt timeout")
    retries: Annotated[int, Whole(0)] = key(
        "Retries", 3, "retries after a failed attempt (5xx answers are not retried)")
    retry_delay: Annotated[float, Number(minimum=0)] = key(
        "RetrySeconds", 2, "delay before the first retry (doubles each time)")
    ca_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "CaFile", "", "a PEM bundle to trust for `StartTls`/`Tls` instead of the system's")

    @model_validator(mode="after")
    def _no_clear_text_password(self) -> SmtpSettings:
        if self.password and self.security == "None" and not _is_loopback(self.host):
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": f"would be sent in plain text to {self.host!r} (Smtp:Security is None); "
                            "set Smtp:Security to StartTls or Tls", "key": "Password"})
        return self


class EmailRule(Section):
    noun: ClassVar[str] = "an object with Events and To"

    events: Annotated[tuple[str, ...], Names()] = key(
        "Events", ("*",), "event kinds or globs (`*.failed`, `*`): `upload.imported`, `import.failed`, "
        "`forward.failed`, `script.failed`, `task.failed`, `upstream.down`, `upstream.up`, `mail.failed`, "
        "`certificate.failed`, `audit.buffer_full`")
    to: Annotated[tuple[str, ...], Names(nonempty=True)] = key("To", REQUIRED, "recipients")


class NotificationSettings(Section):
    feed_size: Annotated[int, Whole(1)] = key("FeedSize", 200, "notifications kept in the feed")
    email: tuple[EmailRule, ...] = collection(
        "Email", "mail rules `[{\"Events\": [\"import.failed\"], \"To\": [\"pacs-admin@example.org\"]}]`", ())


class OrthancSettings(Section):
    """The Orthanc-compatible Lua layer (docs/orthanc-compat.md)."""

    heartbeat_period: Annotated[float, Number(minimum=0)] = key(
        "LuaHeartBeatPeriod", 0, "`OnHeartBeat` every N seconds (Orthanc's `LuaHeartBeatPeriod`); `0`: off")
    poll_interval: Annotated[float, Number(minimum=0.05)] = key(
        "PollIntervalSeconds", 1, "how often the PACS's `/changes` (and `/jobs`) are read for the `On*` callbacks")
    execute_lua_enabled: Annotated[bool, Flag()] = key(
        "ExecuteLuaEnabled", False,
        "`POST /tools/execute-script` runs its body in the singleton engine (Orthanc's `ExecuteLuaEnabled`), for "
        "users with the `admin` role only; `false`: the route goes to the PACS like any other")
    execute_lua_anonymous: Annotated[bool, Flag()] = key(
        "ExecuteLuaAllowAnonymous", False,
        "with no `Authentication` configured, let anyone who reaches the gateway run `/tools/execute-script` "
        "(otherwise refused: 403); only for a gateway nobody else can reach")
    lua_scripts: Annotated[tuple[Path, ...], Names(FsPath())] = key(
        "LuaScripts", (), "Orthanc's `LuaScripts`: more scripts loaded into the singleton engine after `main.lua`, "
        "in order (a later definition wins), each hot-reloaded; relative to ConfigRoot")
    filter_header_max_bytes: Annotated[int, Whole(1024)] = key(
        "FilterHeaderMaxBytes", 8388608, "`ReceivedInstanceFilter` over HTTP: the most bytes of one uploaded "
        "instance buffered to read its header (up to the pixel data); an instance whose header is longer is "
        "refused (`POST /instances`: 413; STOW-RS: a failed SOP)")


class LoggingSettings(Section):
    level: Annotated[str, Choice("DEBUG", "INFO", "WARNING", "ERROR")] = key("Level", "INFO", "log level")


class AuditCollector(Section):
    """One syslog collector of the audit trail (``Audit:Collectors`` entry)."""

    shorthand: ClassVar[str | None] = "Url"
    noun: ClassVar[str] = "a URL or an object with Url (and CaFile, CertFile, KeyFile for TLS)"

    url: Annotated[str, SyslogUrl()] = key(
        "Url", REQUIRED, "`tls://host:6514` (RFC 5425, at least once) or `udp://host:514` (RFC 5426, fire and forget)")
    ca_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "CaFile", "", "PEM bundle the collector's certificate is checked against (empty: the system CAs)")
    cert_file: Annotated[Path | None, FsPath(optional=True)] = key(
        "CertFile", "", "the gateway's client certificate (PEM) for mutual TLS")
    key_file: Annotated[Path | None, FsPath(optional=True)] = key("KeyFile", "", "its private key (PEM)")
    key_password: Annotated[str, Text()] = key("KeyPassword", "", "the private key's password", secret=True)
    server_name: Annotated[str, Text()] = key(
        "ServerName", "", "the name the collector's certificate must carry (empty: the URL's host)")
    max_datagram: Annotated[int, Whole(480, 65507)] = key(
        "MaxDatagramBytes", 8192, "UDP: longest message sent (rsyslog's default limit is 8 KB); longer ones are "
        "counted and not sent")

    @model_validator(mode="after")
    def _key_with_cert(self) -> AuditCollector:
        if self.key_file is not None and self.cert_file is None:
            raise PydanticCustomError(VALUE_ERROR, "{expected}", {
                "expected": "a key without a certificate: set CertFile (PEM) next to KeyFile", "key": "KeyFile"})
        return self


class AuditSettings(Section):
    """The IHE ATNA audit trail (dicomproxy/audit/)."""

    enabled: Annotated[bool, Flag()] = key("Enabled", False, "record DICOM PS3.15 A.5 audit messages")
    collectors: tuple[AuditCollector, ...] = collection(
        "Collectors", "syslog collectors: `[{\"Url\": \"tls://audit.example.org:6514\", \"CaFile\": \"ca.pem\"}]` "
        "or `[\"udp://127.0.0.1:514\"]`; each gets every message from its own place in the buffer", ())
    file: Annotated[Path | None, FsPath(optional=True)] = key(
        "File", "", "a local JSON-lines copy of every event (empty: none)")
    file_max_mb: Annotated[float, Number(above=0)] = key("FileMaxMB", 100, "the JSON-lines file is rotated past this")
    file_keep: Annotated[int, Whole(0)] = key("FileKeep", 10, "rotated JSON-lines files kept (`File.1` ...)")
    buffer_folder: Annotated[Path, FsPath()] = key(
        "BufferFolder", "data/audit", "durable buffer of messages not yet delivered to every collector")
    buffer_max_mb: Annotated[float, Number(above=0)] = key(
        "BufferMaxMB", 256, "largest buffer; when full the newest messages are dropped (counted, an "
        "`audit.buffer_full` notification, health degraded, an Audit Recording Stopped alert)")
    enterprise_site_id: Annotated[str, Text()] = key(
        "EnterpriseSiteId", "", "AuditEnterpriseSiteID (the hospital or site; empty: left out)")
    source_id: Annotated[str, Text()] = key(
        "SourceId", "", "AuditSourceID (empty: `<Dicom:Aet>@<host name>`)")
    app_name: Annotated[str, Text()] = key("AppName", "dicomproxy", "the syslog APP-NAME")
    msg_id: Annotated[str, Choice("IHE+RFC-3881", "ATNA")] = key(
        "MsgId", "IHE+RFC-3881", "the syslog MSGID (IHE ITI TF-2 3.20)")
    login_success_interval: Annotated[float, Number(minimum=0)] = key(
        "LoginSuccessIntervalSeconds", 600, "an HTTP user's successful login is recorded once per address and this "
        "many seconds of quiet (basic auth logs in on every request; `0`: every request)")
    failed_login_burst: Annotated[int, Whole(2)] = key(
        "FailedLoginBurst", 5, "this many failed logins from one address within the window raise a Security Alert")
    failed_login_window: Annotated[float, Number(above=0)] = key(
        "FailedLoginWindowSeconds", 60, "the window of `Audit:FailedLoginBurst`")

    @property
    def buffer_max(self) -> int:
        return int(self.buffer_max_mb * MiB)

    @property
    def file_max(self) -> int:
        return int(self.file_max_mb * MiB)


class Settings(Section):
    """The whole configuration, typed. Built once by :func:`~dicomproxy.config.loader.load_settings`."""

    urls: Annotated[str, Listen()] = key(
        "Urls", "http://127.0.0.1:8080", "where the HTTP side listens (loopback by default; `http://0.0.0.0:8080` "
        "for all interfaces); several separated by `;`, e.g. `http://0.0.0.0:8080;https://0.0.0.0:8443` (an "
        "`https://` entry needs a certificate: see `Https`)")
    upstream: UpstreamSettings = section("Upstream", "the PACS's HTTP side")
    upstreams: UpstreamsSettings = section(
        "Upstreams", "several PACS: named servers, groups, HTTP routes (also read from `servers.json` beside "
        "`appsettings.json`, which is reloaded when it changes)")
    extra_config: ExtraConfigSettings = section("ExtraConfig", "folders, and any key a site adds for its scripts")
    lua: LuaSettings = section("Lua", "the Lua engines")
    authentication: AuthenticationSettings = section(
        "Authentication", "who may call the gateway: basic users, API keys, bearer tokens, role rules")
    server: ServerSettings = section("Server", "limits of the HTTP front door, the shutdown deadline")
    https: HttpsSettings = section("Https", "certificates and policy of the `https://` listeners")
    cors: CorsSettings = section("Cors", "the CORS policy")
    tus: TusSettings = section("Tus", "the TUS upload server")
    cluster: ClusterSettings = section(
        "Cluster", "what replicas behind a load balancer share on Redis: TUS upload locks, background tasks, "
        "notifications")
    dicom: DicomSettings = section("Dicom", "the DICOM side")
    smtp: SmtpSettings = section("Smtp", "mail transport")
    notifications: NotificationSettings = section("Notifications", "the notification feed and mail rules")
    orthanc: OrthancSettings = section("Orthanc", "the Orthanc-compatible Lua layer")
    logging: LoggingSettings = section("Logging", "logging")
    audit: AuditSettings = section("Audit", "the IHE ATNA audit trail")

    config_file: Path | None = internal(None)  # the appsettings.json read, if any
    config_root: Path = internal(Path("."))  # its folder (the working directory without one)
    environment: str = internal("")  # DICOMPROXY_ENVIRONMENT / --environment
    files: tuple[Path, ...] = internal(())  # every file read, in layering order

    @model_validator(mode="after")
    def _share_extra_config(self) -> Settings:
        """``lua.scripts_root`` and ``tus.upload_folder`` are ExtraConfig keys; copy them once."""
        extra = self.extra_config
        object.__setattr__(self, "lua", self.lua.model_copy(update={"scripts_root": extra.scripts_root}))
        object.__setattr__(self, "tus", self.tus.model_copy(update={"upload_folder": extra.tus_upload_folder}))
        return self

    @model_validator(mode="after")
    def _https_needs_listeners(self) -> Settings:
        schemes = {e.scheme for e in self.endpoints}
        if self.https.redirect_http and schemes != {"http", "https"}:
            raise _problem("RedirectHttp", "needs an http:// and an https:// entry in Urls (e.g. "
                           "http://0.0.0.0:8080;https://0.0.0.0:8443)", "Https")
        if self.https.hsts and "https" not in schemes:
            raise _problem("Hsts", "would never be sent: Urls has no https:// entry", "Https")
        return self

    @model_validator(mode="after")
    def _dicom_names_resolve(self) -> Settings:
        known = self.upstreams.dicom_names() | frozenset(self.dicom.modalities)
        for i, route in enumerate(self.dicom.routes):
            for name in route.destinations:
                if name not in known:
                    raise _problem(f"Routes:{i}:Destinations", f"{name!r} is no upstream with a DICOM side "
                                   f"(Upstreams:Servers:*:Dicom:Port), group of them or Dicom:Modalities entry "
                                   f"(known: {', '.join(sorted(known))})", "Dicom")
        query = self.dicom.query_upstream
        if query and query not in self.upstreams.dicom_names():
            raise _problem("QueryUpstream", f"{query!r} is no upstream with a DICOM side or group of them "
                           f"(known: {', '.join(sorted(self.upstreams.dicom_names()))})", "Dicom")
        return self

    # -- derived values ---------------------------------------------------------------------
    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        """Every entry of ``Urls``, in order (``*`` and ``+`` mean every interface)."""
        return Listen().endpoints(self.urls)

    @property
    def host(self) -> str:
        """The first listener's address."""
        return self.endpoints[0].host

    @property
    def port(self) -> int:
        """The first listener's port."""
        return self.endpoints[0].port

    @property
    def data_folder(self) -> Path:
        return self.extra_config.data_folder

    @property
    def users(self) -> dict[str, str]:
        """``{name: stored password}`` of the basic users (plain or a hash)."""
        return {name: user.password for name, user in self.authentication.users.items()}

    @property
    def realm(self) -> str:
        return self.authentication.realm

    @property
    def log_level(self) -> str:
        return self.logging.level

    # -- what others may see ----------------------------------------------------------------
    @cached_property
    def tree(self) -> ConfigTree:
        """The effective configuration by colon path, secrets masked (``***``): safe to show anyone."""
        return ConfigTree(public_view(self), str(self.config_file) if self.config_file else "(defaults)")

    def lua_config(self) -> dict[str, Any]:
        """What Lua's ``Config[...]`` sees: every leaf by its colon path (secrets masked), plus ``ConfigRoot``."""
        flat = self.tree.leaves()
        flat["ConfigRoot"] = str(self.config_root)
        return flat


def _problem(key: str, expected: str, section: str = "") -> PydanticCustomError:
    """A model check's failure, reported by the loader as ``<source>: <Section:Key>: <expected>``."""
    return PydanticCustomError(VALUE_ERROR, "{expected}", {"expected": expected,
                                                            "key": f"{section}:{key}" if section else key})


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
